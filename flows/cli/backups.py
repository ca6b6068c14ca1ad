"""Database backups: back up, restore, verify, recover tables, undo and repair."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from flows.cli import render
from flows.cli.common import Result, command, db_url, url
from flows.cli.options import ArchiveWait, FlowOutput, Roles
from pgdr.ops.errors import ConfigError


@command(render.show_backup)
def backup(*, db: str | None = None, repo: str | None = None, tier: str = "manual",
           encrypt_to: str | None = None, output: FlowOutput = FlowOutput()) -> Result:
    """Back up a database into the repository.

    Args:
        db: database URL (default: DATABASE_URL or DB_HOST/DB_NAME/...)
        repo: repository URL (default: PGDR_REPO, S3_BUCKET or BACKUP_DIR)
        tier: backup tier
        encrypt_to: gpg recipient to encrypt to (KEYID)
    """
    from flows.backup import backup

    return backup(db=db_url(db), repo=repo, tier=tier, encrypt_to=encrypt_to)


@command(render.show_restore)
def restore(backup: str, /, *, target: str | None = None, physical: bool = False,
            datadir: str | None = None, repo: str | None = None, db: str | None = None,
            jobs: int | None = None, no_owner: bool = False, no_pre_restore_backup: bool = False,
            stop_writes_first: bool = False, encrypt_to: str | None = None,
            archive: ArchiveWait = ArchiveWait(), roles: Roles = Roles(), table: list[str] | None = None,
            output: FlowOutput = FlowOutput()) -> Result:
    """Restore a backup into a database (replacing it safely).

    Args:
        backup: backup id, or latest
        target: database URL to restore into
        physical: restore the whole server from a base backup (BACKUP: its id, or latest) and its WAL
            to the end of the archive, into --datadir
        datadir: with --physical: new data directory for the restored server
        repo: repository URL
        db: database whose backup to restore (for latest)
        jobs: pg_restore parallel jobs
        no_owner: do not restore object ownership
        no_pre_restore_backup: skip the backup of the current database before replacing it
        stop_writes_first: refuse new connections to the existing target and end its sessions before
            the pre-restore backup, until the swap (downtime rather than divergence; needs a superuser,
            whose own sessions are not refused)
        encrypt_to: gpg recipient of the pre-restore backup (default: PGDR_ENCRYPT_TO, else the
            restored backup's recipient)
        table: restore only this table's rows (and its partitions'), with the backup's whole schema,
            into a new database; repeat for several
    """
    if physical:
        return _restore_physical(backup, datadir, repo, db)
    if not target:
        raise ConfigError("--target URL is required (or --physical --datadir DIR for a whole server)")
    from flows.restore import restore

    return restore(backup_id=backup, target=url(target), repo=repo, db=db, jobs=jobs, no_owner=no_owner,
                   pre_restore_backup=not no_pre_restore_backup, encrypt_to=encrypt_to,
                   archive_wait_hours=archive.archive_wait_hours, no_wait=archive.no_wait,
                   no_acl=roles.no_acl, create_roles=roles.create_roles, tables=table,
                   stop_writes_first=stop_writes_first)


def _restore_physical(backup: str, datadir: str | None, repo: str | None, db: str | None) -> Result:
    """`restore --physical`: the whole server from a base backup and all its WAL (pitr
    without a target) into a new data directory."""
    if not datadir:
        raise ConfigError("--physical needs --datadir DIR (a new directory for the restored server)")
    from flows.pitr import pitr

    return pitr(datadir=str(Path(datadir).resolve()), repo=repo, db=db,
                backup_id=None if backup == "latest" else backup)


@command(render.show_restore)
def restore_temp(backup: str, /, *, repo: str | None = None, db: str | None = None,
                 server: str | None = None, keep: bool = False, archive: ArchiveWait = ArchiveWait(),
                 jobs: int | None = None, no_owner: bool = False, roles: Roles = Roles(),
                 output: FlowOutput = FlowOutput()) -> Result:
    """Restore into a temporary database and validate it.

    Args:
        backup: backup id, or latest
        repo: repository URL
        db: database whose backup to restore (for latest)
        server: server URL for the temporary database (default: DATABASE_URL)
        keep: keep the temporary database
        jobs: pg_restore parallel jobs
        no_owner: do not restore object ownership
    """
    from flows.restore import restore_to_temp

    return restore_to_temp(backup_id=backup, repo=repo, db=db, server=url(server), keep=keep, jobs=jobs,
                           no_owner=no_owner, archive_wait_hours=archive.archive_wait_hours,
                           no_wait=archive.no_wait, no_acl=roles.no_acl, create_roles=roles.create_roles)


@command(render.show_rollback)
def rollback(*, target: str, repo: str | None = None, output: FlowOutput = FlowOutput()) -> Result:
    """Undo the last restore of a database.

    Args:
        target: database URL that was restored
        repo: repository URL (for the audit record)
    """
    from flows.restore import rollback

    return rollback(target=url(target), repo=repo)


@command(render.show_repair)
def repair(*, target: str, output: FlowOutput = FlowOutput()) -> Result:
    """Finish or clean up what a killed restore or rollback left on a database's server.

    Args:
        target: database URL that was being restored
    """
    from flows.restore import repair

    return repair(target=url(target))


@command(render.show_verify)
def verify(*, repo: str | None = None, db: str | None = None, max_age_hours: float = 26.0,
           server: str | None = None, output: FlowOutput = FlowOutput()) -> Result:
    """Check the latest backups by restoring them.

    Args:
        repo: repository URL
        db: only this database (NAME)
        max_age_hours: oldest acceptable backup
        server: server URL for the test restore (default: DATABASE_URL)
    """
    from flows.verify import verify

    return verify(repo=repo, db=db, max_age_hours=max_age_hours, server=url(server))


@command(render.show_recover_table)
def recover_table(backup: str, /, *, target: str, table: list[str],
                  mode: Literal["missing-rows", "replace", "side-table"] = "missing-rows",
                  where: str | None = None, dry_run: bool = False, repo: str | None = None,
                  db: str | None = None, jobs: int | None = None, no_owner: bool = False,
                  output: FlowOutput = FlowOutput()) -> Result:
    """Bring tables back from a backup without restoring the whole database.

    Args:
        backup: backup id, or latest
        target: database URL to recover into (the temporary database goes on its server)
        table: table as written in SQL, e.g. public.orders or "Sales Data"."Order Items" (repeat for
            several)
        mode: missing-rows: insert rows whose key is absent; replace: the table becomes the backup's;
            side-table: load into <table>_recovered_<ts>
        where: condition on the backup's rows (one SQL expression)
        dry_run: report what would change, change nothing
        repo: repository URL
        db: database whose backup to use (for latest)
        jobs: pg_restore parallel jobs
        no_owner: do not restore object ownership
    """
    from flows.recover_table import recover_table

    return recover_table(backup_id=backup, target=url(target), tables=table, mode=mode, where=where,
                         dry_run=dry_run, repo=repo, db=db, jobs=jobs, no_owner=no_owner)
