"""Backup: the runbook's backup.sh as a flow.

snapshot + row counts -> pg_dump | zstd | gpg -> repository -> manifest (last) ->
audit record -> artifact.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.prune import prune_after_backup
from pgdr.catalog import catalog
from pgdr.catalog.index import INDEX_WRITE_ATTEMPTS, refresh_index
from pgdr.catalog.locks import database_lock
from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.ops.settings import check_tier, load_settings
from pgdr.pipeline import crypto
from pgdr.postgres import dsn
from pgdr.storage.repository import Repository
from tasks.artifacts import artifact_key, human_bytes, publish_table
from tasks.backup import dump_database
from tasks.prune import replicate_backup
from tasks.records import audited, open_repo, publish_metrics, write_manifest
from tasks.runs import FLOW_HOOKS, run_name, server_slot


def index_backup(repo: Repository, database: str) -> None:
    """Add the new backup to its database's catalog index, after its manifest and under its
    database's lock. The index only spares readers work (they list the keys and read what it
    lacks): the backup is complete without it, so a failure here is a warning."""
    try:
        if not refresh_index(repo, database):
            get_run_logger().warning("the catalog index of %s was replaced by other writers %d times: "
                                     "not updated", database, INDEX_WRITE_ATTEMPTS)
    except PgdrError as exc:
        get_run_logger().warning("the catalog index of %s was not updated: %s", database, exc)


def publish_backup_artifact(manifest: catalog.Manifest, seconds: float) -> None:
    rate = manifest.dump_bytes / seconds if seconds else 0
    rows = [{"table": table, "rows": count} for table, count in manifest.row_counts.items()]
    rows.append({"table": "TOTAL", "rows": sum(manifest.row_counts.values())})
    publish_table(
        artifact_key("backup", manifest.database),
        rows,
        f"Backup {manifest.backup_id} of {manifest.database}: "
        f"{human_bytes(manifest.size_bytes)} stored ({human_bytes(manifest.dump_bytes)} dumped) "
        f"in {seconds:.1f} s, {human_bytes(rate)}/s",
    )


class BackupResult(catalog.BackupSummary):
    """`pgdr backup --json`: the backup's summary, where it went, and what retention did after it."""

    sha256: str
    row_counts: dict[str, int]
    location: str
    duration_seconds: float
    replica: str | None
    pruned: dict[str, int] | None  # rows of each action of the prune after the backup
    warnings: list[str]


@flow(name="backup", flow_run_name=run_name("backup-{db|$db}-{tier}"), log_prints=True, **FLOW_HOOKS)
def backup(db: str | None = None, repo: str | None = None, tier: str = "manual",
           encrypt_to: str | None = None) -> BackupResult:
    """Back up one database into the repository; returns the backup's summary."""
    settings = load_settings()
    db_url = db or settings.db_url
    if not db_url:
        raise ConfigError("no database given: pass --db URL or set DATABASE_URL / DB_HOST")
    check_tier(tier)
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)  # a bad URL fails here, before anything runs
    recipient = encrypt_to or settings.encrypt_to
    fingerprint = crypto.recipient_fingerprint(recipient, settings.gpg_homedir) if recipient else None
    database = dsn.database_name(db_url)
    backup_id = catalog.new_backup_id(catalog.utcnow(), tier)
    with audited(repository, settings, "backup", type=tier, source=database, destination=repo_url,
                 failure_metrics={"BackupFailureCount": 1}, backup_id=backup_id) as step:
        # The server's fleet limit, then the database's lock: prune of this database
        # waits meanwhile, and so does another backup of it.
        with server_slot(db_url), database_lock(repository, database, "backup"):
            manifest = dump_database(db_url, repository, settings, backup_id, tier, fingerprint)
            write_manifest(repository, manifest)
            index_backup(repository, database)
        if settings.replica_repo_url:
            replicate_backup(repository, open_repo(settings.replica_repo_url, settings), settings, manifest)
        step.succeeded(destination=f"{repo_url}/{manifest.prefix}", size_bytes=manifest.size_bytes)
    publish_backup_artifact(manifest, step.seconds)
    warnings = [w for w in [catalog.clock_warning(manifest, settings.max_clock_skew_seconds)] if w]
    for warning in warnings:
        get_run_logger().warning("%s", warning)
    publish_metrics(settings, database, BackupFailureCount=0, HoursSinceLastBackup=0,
                    BackupSizeBytes=manifest.size_bytes, BackupDurationSeconds=step.seconds)
    pruned = prune_after_backup(repository, database, tier)
    return {
        **manifest.summary(),
        "sha256": manifest.sha256,
        "row_counts": manifest.row_counts,
        "location": f"{repo_url.rstrip('/')}/{manifest.prefix}/",
        "duration_seconds": round(step.seconds, 3),
        "replica": settings.replica_repo_url,
        "pruned": pruned["counts"] if pruned else None,
        "warnings": warnings,
    }
