"""Backup: the runbook's backup.sh as a flow.

snapshot + row counts -> pg_dump | zstd | gpg -> repository -> manifest (last) ->
audit record -> artifact.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from prefect import flow, get_run_logger, task

from flows.prune import prune_after_backup, replicate_backup
from flows.steps import (
    FLOW_HOOKS,
    Progress,
    artifact_key,
    audited,
    human_bytes,
    open_repo,
    publish_metrics,
    publish_table,
    retrying,
    run_name,
    server_slot,
    write_manifest,
)
from pgdr.catalog import catalog
from pgdr.catalog.locks import database_lock
from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.ops.settings import Settings, check_tier, load_settings
from pgdr.pipeline import crypto
from pgdr.pipeline.dump import stream_dump
from pgdr.postgres import database as whole_database
from pgdr.postgres import postgres

TOOL_VERSION = "pgdr 0.1.0"


@task(name="dump database", **retrying(2, 15),
      timeout_seconds=24 * 3600, tags=["pg_dump"])
def dump_database(db_url: str, repo_url: str, settings: Settings, backup_id: str, tier: str,
                  encrypt_fingerprint: str | None) -> catalog.Manifest:
    """Count rows in an exported snapshot and dump exactly that snapshot: the counts in the
    manifest are exactly the rows in the dump, whatever is written meanwhile. The counting
    runs while pg_dump streams (both read the same snapshot), not before it."""
    logger = get_run_logger()
    repo = open_repo(repo_url, settings)
    database = postgres.database_name(db_url)
    started = catalog.utcnow()
    with postgres.connect(db_url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction(), ThreadPoolExecutor(1, thread_name_prefix="row-count") as counter:
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
            snapshot_at = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            version = postgres.server_version(conn)
            major = postgres.server_major(conn)
            wal_lsn = postgres.current_wal_lsn(conn)
            size_hint = postgres.database_size(conn)
            prefix = catalog.backup_prefix(database, backup_id)
            partitioned = postgres.partitioned_tables(conn)
            properties = whole_database.read_properties(conn)
            references = whole_database.read_role_references(conn, properties)
            tablespaces = whole_database.read_tablespaces(conn)
            digests: dict[str, str] | None = {} if settings.content_digests else None
            counting = counter.submit(postgres.count_rows, conn, digests)
            try:
                with Progress(f"backup of {database}", size_hint) as progress:
                    result = stream_dump(
                        db_url, repo, f"{prefix}/{catalog.DUMP}",
                        snapshot=snapshot,
                        encrypt_to=encrypt_fingerprint,
                        gpg_homedir=settings.gpg_homedir,
                        storage_class=settings.storage_classes.get(tier),
                        size_hint=size_hint,
                        zstd_level=settings.zstd_level,
                        zstd_threads=settings.zstd_threads,
                        secrets=settings.secrets(),
                        progress=lambda read, _written: progress.update(read),
                        server_major=major,
                    )
            except BaseException:
                conn.cancel_safe()  # the counts are of no use now: stop them
                raise
            row_counts = counting.result()
            role_statements = whole_database.dump_roles(db_url, database, references, major,
                                                       settings.secrets())
            logger.info("snapshot %s of %s: %d tables, %d rows", snapshot, database,
                        len(row_counts), sum(row_counts.values()))
    return catalog.Manifest(
        backup_id=backup_id,
        database=database,
        tier=tier,
        started_at=catalog.iso(started),
        finished_at=catalog.iso(catalog.utcnow()),
        snapshot_at=catalog.iso(snapshot_at),
        server_version=version,
        tool_version=TOOL_VERSION,
        format="pg_dump-custom",
        compression=f"zstd-{settings.zstd_level}",
        encryption={"type": "gpg", "recipient_fingerprint": encrypt_fingerprint}
        if encrypt_fingerprint else None,
        size_bytes=result.stored.size,
        dump_bytes=result.dump_bytes,
        sha256=result.stored.sha256,
        row_counts=row_counts,
        wal_lsn_start=wal_lsn,
        source=postgres.display_dsn(db_url),
        data_key=catalog.DUMP,
        partitioned=partitioned,
        database_properties=properties,
        digests=digests or {},
        globals={"roles": references, "role_statements": role_statements, "tablespaces": tablespaces},
    )


def index_backup(repo_url: str, settings: Settings, database: str) -> None:
    """Add the new backup to its database's catalog index, after its manifest and under its
    database's lock. The index only spares readers work (they list the keys and read what it
    lacks): the backup is complete without it, so a failure here is a warning."""
    try:
        if not catalog.refresh_index(open_repo(repo_url, settings), database):
            get_run_logger().warning("the catalog index of %s was replaced by other writers %d times: "
                                     "not updated", database, catalog.INDEX_WRITE_ATTEMPTS)
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


@flow(name="backup", flow_run_name=run_name("backup-{db|$db}-{tier}"), log_prints=True, **FLOW_HOOKS)
def backup(db: str | None = None, repo: str | None = None, tier: str = "manual",
           encrypt_to: str | None = None) -> dict[str, Any]:
    """Back up one database into the repository; returns the backup's summary."""
    settings = load_settings()
    db_url = db or settings.db_url
    if not db_url:
        raise ConfigError("no database given: pass --db URL or set DATABASE_URL / DB_HOST")
    check_tier(tier)
    repo_url = repo or settings.repo_url
    open_repo(repo_url, settings)  # a bad URL fails here, before anything runs
    recipient = encrypt_to or settings.encrypt_to
    fingerprint = crypto.recipient_fingerprint(recipient, settings.gpg_homedir) if recipient else None
    database = postgres.database_name(db_url)
    backup_id = catalog.new_backup_id(catalog.utcnow(), tier)
    with audited(repo_url, settings, "backup", type=tier, source=database, destination=repo_url,
                 failure_metrics={"BackupFailureCount": 1}, backup_id=backup_id) as step:
        # The server's fleet limit, then the database's lock: prune of this database
        # waits meanwhile, and so does another backup of it.
        with server_slot(db_url), database_lock(open_repo(repo_url, settings), database, "backup"):
            manifest = dump_database(db_url, repo_url, settings, backup_id, tier, fingerprint)
            write_manifest(repo_url, settings, manifest)
            index_backup(repo_url, settings, database)
        if settings.replica_repo_url:
            replicate_backup(repo_url, settings.replica_repo_url, settings, manifest)
        step.succeeded(destination=f"{repo_url}/{manifest.prefix}", size_bytes=manifest.size_bytes)
    publish_backup_artifact(manifest, step.seconds)
    warnings = [w for w in [catalog.clock_warning(manifest, settings.max_clock_skew_seconds)] if w]
    for warning in warnings:
        get_run_logger().warning("%s", warning)
    publish_metrics(settings, database, BackupFailureCount=0, HoursSinceLastBackup=0,
                    BackupSizeBytes=manifest.size_bytes, BackupDurationSeconds=step.seconds)
    pruned = prune_after_backup(repo_url, database, tier)
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
