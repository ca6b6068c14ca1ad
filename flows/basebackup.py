"""Base backup: the starting point of point-in-time recovery.

pg_basebackup | zstd | gpg -> repository -> manifest (last) -> audit record. Together
with the WAL archive (`pgdr wal-push` as archive_command) it allows recovery to any
moment after the backup finished.

On PostgreSQL 17 and newer the default policy takes an incremental backup on the previous
one (a full one when the newest full is a week old, the chain is not whole, or the server's
summarize_wal is off): daily incrementals on a weekly full.
"""

from __future__ import annotations

from prefect import flow

from pgdr.catalog import catalog
from pgdr.ops.errors import ConfigError
from pgdr.ops.settings import load_settings
from pgdr.pipeline import crypto
from pgdr.pitr.basebackup import BaseBackupSummary, summary
from pgdr.pitr.incremental import KINDS
from pgdr.postgres import dsn
from tasks.basebackup import take_base_backup
from tasks.prune import replicate_backup
from tasks.records import audited, open_repo, write_manifest
from tasks.runs import FLOW_HOOKS, run_name


class BaseBackupResult(BaseBackupSummary):
    """`pgdr basebackup --json`."""

    location: str
    duration_seconds: float
    warnings: list[str]


@flow(name="basebackup", flow_run_name=run_name("basebackup-{db|$db}"), log_prints=True, **FLOW_HOOKS)
def basebackup(db: str | None = None, repo: str | None = None, name: str | None = None,
               encrypt_to: str | None = None, fast_checkpoint: bool = True,
               tier: str = "hot", kind: str = "auto") -> BaseBackupResult:
    """Take a physical base backup of the server behind `db` for point-in-time recovery.

    `kind`: "auto" (the default policy: on PostgreSQL 17+, incremental on the previous
    base backup unless the newest full one is 7 days old, the chain is not whole or
    summarize_wal is off), "full", or "incremental" (fails when one cannot be taken).

    `tier` is its retention tier (`pgdr prune`, area pitr): hot keeps 7 days of recovery
    to any moment; a weekly or monthly one keeps its WAL, and so any moment since, longer.

    `name` is the repository area it goes to (default: PGDR_WAL_DB, else the database of
    the URL): the same name `pgdr wal-push --db` archives the server's WAL under.
    """
    settings = load_settings()
    db_url = db or settings.db_url
    if not db_url:
        raise ConfigError("no database given: pass --db URL or set DATABASE_URL / DB_HOST")
    if kind not in KINDS:
        raise ConfigError(f"unknown backup kind {kind!r}: choose one of {', '.join(KINDS)}")
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)  # a bad URL fails here, before anything runs
    recipient = encrypt_to or settings.encrypt_to
    fingerprint = crypto.recipient_fingerprint(recipient, settings.gpg_homedir) if recipient else None
    database = name or settings.wal_db or dsn.database_name(db_url)
    backup_id = catalog.new_backup_id(catalog.utcnow(), tier)
    with audited(repository, settings, "basebackup", type=tier, source=database, destination=repo_url,
                 backup_id=backup_id) as step:
        manifest, warnings = take_base_backup(db_url, repository, settings, database, backup_id, fingerprint,
                                              fast_checkpoint, kind)
        write_manifest(repository, manifest)
        if settings.replica_repo_url:
            replicate_backup(repository, open_repo(settings.replica_repo_url, settings), settings, manifest)
        step.succeeded(destination=f"{repo_url}/{manifest.prefix}", size_bytes=manifest.size_bytes)
    return {**summary(manifest), "location": f"{repo_url.rstrip('/')}/{manifest.prefix}/",
            "duration_seconds": round(step.seconds, 3), "warnings": warnings}
