"""Point-in-time recovery: the WAL archive (PostgreSQL's archive_command and
restore_command), base backups and recovery to a point in time.

`wal-push` and `wal-fetch` run once per WAL segment: they import no Prefect, boto3 (for a
file repository), psycopg or rich.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

from cyclopts import Group, Parameter, validators

from flows.cli import render
from flows.cli.common import CommandExit, FlowOutput, Output, Result, command, db_url, secrets, settings
from flows.cli.results import WalFetchResult, WalPushResult
from tasks.errors import PgdrError
from tasks.process import redact


def _wal_target(repo: str | None, name: str | None, server_url: str | None = None) -> tuple[Any, Any, str]:
    """(settings, repository, database name) for the WAL commands: the name given, else
    PGDR_WAL_DB, else the database of the server's URL (DATABASE_URL)."""
    from tasks.repository import open_repository

    config = settings()
    database = name or config.wal_db
    if not database and (server_url or config.db_url):
        from tasks.postgres import database_name

        database = database_name(server_url or config.db_url)
    if not database:
        from tasks.errors import ConfigError

        raise ConfigError("name the database the WAL belongs to: --db NAME, PGDR_WAL_DB or DATABASE_URL")
    repository = open_repository(repo or config.repo_url, sse=config.s3_sse,
                                 kms_key_id=config.s3_kms_key_id, region=config.aws_region)
    return config, repository, database


@command(render.show_nothing, runs_flow=False)
def wal_push(path: str, /, *, repo: str | None = None, db: str | None = None,
             encrypt_to: str | None = None, jobs: int = 1, spool: str | None = None,
             output: Output = Output()) -> WalPushResult:
    """Archive one WAL file (PostgreSQL's archive_command).

    Args:
        path: the WAL file (%p)
        repo: repository URL
        db: database name the WAL is archived under
        encrypt_to: gpg recipient to encrypt to (KEYID)
        jobs: push up to N-1 more segments PostgreSQL marked ready, in parallel
        spool: where pushes ahead are noted (with --jobs; writable by the postgres user)
    """
    from tasks import wal

    config, repository, database = _wal_target(repo, db)
    options = {"encrypt_to": encrypt_to or config.encrypt_to, "gpg_homedir": config.gpg_homedir,
               "zstd_level": config.zstd_level}
    if jobs > 1:
        if not spool:
            from tasks.errors import ConfigError

            raise ConfigError("--jobs above 1 needs --spool DIR (where pushes ahead are noted)")
        result = wal.push_ahead(repository, database, Path(path), Path(spool), jobs, **options)
    else:
        result = wal.push(repository, database, Path(path), **options)
    replicated = _replicate_wal(config, repository, database, result.name)
    return {"name": result.name, "key": result.key, "stored": result.stored, "size_bytes": result.size,
            "wal_bytes": result.wal_size, "database": database, "repository": repository.url,
            "replicated": replicated}


def _replicate_wal(config: Any, repository: Any, database: str, name: str) -> bool | None:
    """Copy the segment just archived to PGDR_REPLICA_REPO. A DR region that cannot be
    reached must not stall the primary's archiving (pg_wal would fill its disk): it is a
    warning, `pgdr status` shows the replica's lag and `pgdr replicate --all` fills the gap."""
    if not config.replica_repo_url or config.replica_repo_url == repository.url:
        return None
    from tasks import replica
    from tasks.repository import open_repository

    try:
        target = open_repository(config.replica_repo_url, sse=config.s3_sse,
                                 kms_key_id=config.s3_kms_key_id, region=config.aws_region)
        replica.copy_wal(repository, target, database, name)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"pgdr: warning: {name} is archived but not copied to the replica: "
              f"{redact(reason, secrets())}", file=sys.stderr)
        return False
    return True


@command(render.show_nothing, runs_flow=False)
def wal_fetch(name: str, path: str, /, *, repo: str | None = None, db: str | None = None,
              output: Output = Output()) -> WalFetchResult:
    """Restore one archived WAL file (PostgreSQL's restore_command).

    Args:
        name: the WAL file name (%f)
        path: where to write it (%p)
        repo: repository URL
        db: database name the WAL is archived under
    """
    from tasks import wal
    from tasks.errors import NotFoundError

    try:
        config, repository, database = _wal_target(repo, db)
        size = wal.fetch(repository, database, name, Path(path), gpg_homedir=config.gpg_homedir,
                         passphrase=config.gpg_passphrase)
    except NotFoundError as exc:
        # The end of the archive, as recovery expects to find it.
        raise CommandExit(str(exc), wal.FETCH_NOT_FOUND, quiet=True) from None
    except Exception as exc:
        # Anything else must stop recovery rather than look like the end of the archive.
        reason = str(exc) if isinstance(exc, PgdrError) else f"{type(exc).__name__}: {exc}"
        raise CommandExit(f"{reason.splitlines()[0]} (wal-fetch aborts recovery)",
                          wal.FETCH_ABORT_RECOVERY) from None
    return {"name": name, "path": path, "wal_bytes": size, "database": database}


@command(render.show_archive_status, runs_flow=False)
def archive_status(*, repo: str | None = None, db: str | None = None, output: Output = Output()) -> Result:
    """The last archived WAL segment and its age.

    Args:
        repo: repository URL
        db: database name the WAL is archived under
    """
    from tasks import wal
    from tasks.basebackup import list_base_backups

    _, repository, database = _wal_target(repo, db)
    newest = (list_base_backups(repository, database) or [None])[-1]
    if newest is None:
        return wal.archive_status(repository, database)
    return wal.archive_status(repository, database, chain_start=newest.start_wal_file,
                              segment_size=newest.wal_segment_size)


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
    from tasks.errors import FailedWithReport
    from tasks.pitr import check_archiving

    server_url = db or settings().db_url
    if not server_url:
        from tasks.errors import ConfigError

        raise ConfigError("no database given: pass --db URL or set DATABASE_URL / DB_HOST")
    _, repository, database = _wal_target(repo, name, server_url)
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
    from tasks import wal
    from tasks.basebackup import list_base_backups

    _, repository, database = _wal_target(repo, db)
    kept = [b.start_wal_file for b in list_base_backups(repository, database)]
    return dict(wal.prune_archive(repository, database, kept, dry_run))


@command(render.show_basebackup)
def basebackup(*, db: str | None = None, repo: str | None = None, name: str | None = None,
               encrypt_to: str | None = None, spread_checkpoint: bool = False, tier: str = "hot",
               output: FlowOutput = FlowOutput()) -> Result:
    """Take a physical base backup for point-in-time recovery.

    Args:
        db: database URL of the server (default: DATABASE_URL)
        repo: repository URL
        name: database name to file it under (default: PGDR_WAL_DB or the URL's)
        encrypt_to: gpg recipient to encrypt to (KEYID)
        spread_checkpoint: wait for a spread checkpoint instead of forcing a fast one
        tier: retention tier of the base backup
    """
    from flows.basebackup import basebackup

    return basebackup(db=db_url(db), repo=repo, name=name, encrypt_to=encrypt_to,
                      fast_checkpoint=not spread_checkpoint, tier=tier)


_TARGET = Group("Recovery target (one of)", validator=validators.MutuallyExclusive())


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

    from tasks.errors import ConfigError

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
