"""The Prefect tasks of flows/backup.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg
from prefect import get_run_logger, task

from pgdr.catalog import catalog
from pgdr.ops.settings import Settings
from pgdr.pipeline.dump import stream_dump
from pgdr.postgres import database as whole_database
from pgdr.postgres import dsn, postgres
from pgdr.storage.repository import Repository
from tasks.artifacts import Progress
from tasks.policy import retrying


@task(name="dump database", **retrying(2, 15),
      timeout_seconds=24 * 3600, tags=["pg_dump"])
def dump_database(db_url: str, repo: Repository, settings: Settings, backup_id: str, tier: str,
                  encrypt_fingerprint: str | None) -> catalog.Manifest:
    """Count rows in an exported snapshot and dump exactly that snapshot: the counts in the
    manifest are exactly the rows in the dump, whatever is written meanwhile. The counting
    runs while pg_dump streams (both read the same snapshot), not before it."""
    logger = get_run_logger()
    database = dsn.database_name(db_url)
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
        tool_version=catalog.TOOL_VERSION,
        format="pg_dump-custom",
        compression=f"zstd-{settings.zstd_level}",
        encryption={"type": "gpg", "recipient_fingerprint": encrypt_fingerprint}
        if encrypt_fingerprint else None,
        size_bytes=result.stored.size,
        dump_bytes=result.dump_bytes,
        sha256=result.stored.sha256,
        row_counts=row_counts,
        wal_lsn_start=wal_lsn,
        source=dsn.display_dsn(db_url),
        data_key=catalog.DUMP,
        partitioned=partitioned,
        database_properties=properties,
        digests=digests or {},
        globals={"roles": references, "role_statements": role_statements, "tablespaces": tablespaces},
    )
