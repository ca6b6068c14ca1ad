"""Point-in-time recovery: the state of the WAL archive, base backups and recovery to a
point in time (archive_command and restore_command are in flows.cli.wal)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from cyclopts import Group, Parameter, validators

from flows.cli import render
from flows.cli.common import Result, command, db_url, settings
from flows.cli.options import FlowOutput, Output
from flows.cli.results import ArchiveStatusResult
from flows.cli.wal import wal_target


@command(render.show_archive_status, runs_flow=False)
def archive_status(*, repo: str | None = None, db: str | None = None,
                   output: Output = Output()) -> ArchiveStatusResult:
    """The last archived WAL segment and its age.

    Args:
        repo: repository URL
        db: database name the WAL is archived under
    """
    from pgdr.pitr import walarchive
    from pgdr.pitr.basebackup import list_base_backups, summary

    _, repository, database = wal_target(repo, db)
    backups = list_base_backups(repository, database)
    newest = backups[-1] if backups else None
    if newest is None:
        return {**walarchive.archive_status(repository, database), "base_backup": None}
    base = summary(newest)
    return {**walarchive.archive_status(repository, database, chain_start=newest.start_wal_file,
                                        segment_size=newest.wal_segment_size),
            "base_backup": {"backup_id": base["backup_id"], "finished_at": base["finished_at"],
                            "kind": base["kind"], "parent_backup_id": base["parent_backup_id"]}}


@command(render.show_check, runs_flow=False)
def check(*, db: str | None = None, repo: str | None = None, name: str | None = None,
          timeout: float = 60.0, max_base_age_hours: float = 26.0, output: Output = Output()) -> Result:
    """Check WAL archiving end to end: switch WAL, wait until that segment is stored, find no
    gap since the newest base backup.

    Args:
        db: database URL of the server (default: DATABASE_URL)
        repo: repository URL
        name: database name the WAL is archived under (default: PGDR_WAL_DB or the URL's)
        timeout: seconds to wait for the switched segment to be archived
        max_base_age_hours: fail when the newest base backup is older (H)
    """
    from pgdr.ops.errors import FailedWithReport
    from pgdr.pitr.pitr import check_archiving

    server_url = db or settings().db_url
    if not server_url:
        from pgdr.ops.errors import ConfigError

        raise ConfigError("no database given: pass --db URL or set DATABASE_URL / DB_HOST")
    _, repository, database = wal_target(repo, name, server_url)
    result = check_archiving(server_url, repository, database, timeout, max_base_age_hours=max_base_age_hours)
    if not result["ok"]:
        raise FailedWithReport("; ".join(result["problems"]), result)
    return result


@command(render.show_wal_prune, runs_flow=False)
def wal_prune(*, repo: str | None = None, db: str | None = None, dry_run: bool = False,
              output: Output = Output()) -> Result:
    """Delete archived WAL older than the oldest base backup.

    Args:
        repo: repository URL
        db: database name the WAL is archived under
        dry_run: only list what would be deleted
    """
    from pgdr.pitr import walarchive
    from pgdr.pitr.basebackup import list_base_backups

    _, repository, database = wal_target(repo, db)
    kept = [b.start_wal_file for b in list_base_backups(repository, database)]
    return dict(walarchive.prune_archive(repository, database, kept, dry_run))


_KIND = Group("Kind of base backup (one of)", validator=validators.MutuallyExclusive())  # type: ignore[no-untyped-call]


@command(render.show_basebackup)
def basebackup(*, db: str | None = None, repo: str | None = None, name: str | None = None,
               encrypt_to: str | None = None, spread_checkpoint: bool = False, tier: str = "hot",
               full: Annotated[bool, Parameter(group=_KIND)] = False,
               incremental: Annotated[bool, Parameter(group=_KIND)] = False,
               output: FlowOutput = FlowOutput()) -> Result:
    """Take a physical base backup for point-in-time recovery.

    Args:
        db: database URL of the server (default: DATABASE_URL)
        repo: repository URL
        name: database name to file it under (default: PGDR_WAL_DB or the URL's)
        encrypt_to: gpg recipient to encrypt to (KEYID)
        spread_checkpoint: wait for a spread checkpoint instead of forcing a fast one
        tier: retention tier of the base backup
        full: take a full backup (on PostgreSQL 17+ the default is an incremental, weekly full)
        incremental: take an incremental backup (PostgreSQL 17+), fail if one cannot be taken
    """
    from flows.basebackup import basebackup

    kind = "full" if full else "incremental" if incremental else "auto"
    return basebackup(db=db_url(db), repo=repo, name=name, encrypt_to=encrypt_to,
                      fast_checkpoint=not spread_checkpoint, tier=tier, kind=kind)


_TARGET = Group("Recovery target (one of)", validator=validators.MutuallyExclusive())  # type: ignore[no-untyped-call]


@command(render.show_pitr)
def pitr(*, datadir: str | None = None, repo: str | None = None, db: str | None = None,
         target_time: Annotated[str | None, Parameter(group=_TARGET)] = None,
         target_lsn: Annotated[str | None, Parameter(group=_TARGET)] = None,
         target_name: Annotated[str | None, Parameter(group=_TARGET)] = None,
         timeline: str | None = None, backup: str | None = None, port: int | None = None,
         stop: bool = False, timeout: float = 3600.0, rds_source: str | None = None,
         rds_target: str | None = None, rds_instance_class: str | None = None,
         output: FlowOutput = FlowOutput()) -> Result:
    """Recover to a point in time into a new data directory (or RDS instance).

    Args:
        datadir: new data directory for the recovered server
        repo: repository URL
        db: database name the backups and WAL are filed under
        target_time: ISO 8601 time with zone (2026-01-28T02:00Z)
        target_lsn: WAL position, e.g. 0/3000060
        target_name: restore point (pg_create_restore_point)
        timeline: recovery_target_timeline (default: latest)
        backup: base backup id (default: newest before the target)
        port: port for the recovered server (default: a free one)
        stop: stop the server once recovered
        timeout: seconds to wait for recovery
        rds_source: RDS: restore this instance instead (ID)
        rds_target: RDS: name of the new instance (ID)
        rds_instance_class: RDS: instance class of the new instance
    """
    from datetime import datetime

    from pgdr.ops.errors import ConfigError

    try:
        when = datetime.fromisoformat(target_time) if target_time else None
    except ValueError:
        raise ConfigError(f"--target-time {target_time!r} is not an ISO 8601 time") from None
    if rds_source:
        from flows.pitr import rds_point_in_time_recovery

        if not rds_target:
            raise ConfigError("--rds-source needs --rds-target (the new instance's name)")
        return rds_point_in_time_recovery(rds_source, rds_target, target_time=when,
                                          instance_class=rds_instance_class)
    if not datadir:
        raise ConfigError("--datadir DIR is required (a new directory for the recovered server)")
    from flows.pitr import pitr

    return pitr(datadir=str(Path(datadir).resolve()), repo=repo, db=db, target_time=when,
                target_lsn=target_lsn, target_name=target_name, target_timeline=timeline,
                backup_id=backup, port=port, keep_running=not stop, timeout_seconds=timeout)
