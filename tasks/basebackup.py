"""The Prefect tasks of flows/basebackup.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from pgdr.catalog import catalog
from pgdr.ops.errors import PgdrError
from pgdr.ops.settings import Settings
from pgdr.pitr.basebackup import (
    FULL,
    INCREMENTAL,
    SERVER_MANIFEST,
    BaseManifest,
    base_prefix,
    list_base_backups,
    start_wal_file,
    store_server_manifest,
    stream_basebackup,
)
from pgdr.pitr.incremental import KindPlan, fetch_server_manifest, plan_backup_kind
from pgdr.postgres import dsn, postgres
from pgdr.postgres.programs import same_major_bin_dir
from pgdr.storage.repository import Repository
from tasks.artifacts import Progress, human_bytes
from tasks.policy import retrying


@task(name="base backup", **retrying(2, 15),
      timeout_seconds=24 * 3600, tags=["pg_basebackup"])
def take_base_backup(db_url: str, repo: Repository, settings: Settings, database: str, backup_id: str,
                     encrypt_fingerprint: str | None, fast_checkpoint: bool,
                     kind: str = "auto") -> tuple[BaseManifest, list[str]]:
    """The base backup and the warnings an operator should see (an incremental that could
    not be taken, so a full one was)."""
    logger = get_run_logger()
    with postgres.connect(db_url) as conn:
        version = postgres.server_version(conn)
        # In bytes since PostgreSQL 11.
        segment_size = int(conn.execute(
            "SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'").fetchone()[0])  # type: ignore[index]
        system_id = str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])  # type: ignore[index]
        archive_mode = conn.execute("SHOW archive_mode").fetchone()[0]  # type: ignore[index]
        size_hint = int(conn.execute("SELECT sum(pg_database_size(oid)) FROM pg_database").fetchone()[0])  # type: ignore[index]
        # NULL before PostgreSQL 17, which has no such setting.
        summarize_wal = conn.execute("SELECT current_setting('summarize_wal', true)").fetchone()[0]  # type: ignore[index]
        timeline = int(conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0])  # type: ignore[index]
    if archive_mode == "off":
        # Without the archive the backup restores only to its own end point: say so.
        logger.warning("archive_mode is off on %s: this backup cannot be rolled forward",
                       dsn.display_dsn(db_url))
    plan = plan_backup_kind(kind, list_base_backups(repo, database),
                            server_major=int(re.match(r"\d+", version).group()),  # type: ignore[union-attr]
                            summarize_wal=summarize_wal == "on", system_identifier=system_id,
                            timeline=timeline, now=catalog.utcnow())
    warnings = [plan.warning] if plan.warning else []
    for warning in warnings:
        logger.warning("%s", warning)
    logger.info("base backup %s: %s (%s)", backup_id, plan.kind, plan.note)
    started = catalog.utcnow()
    data_key = "base.tar.zst" + (".gpg" if encrypt_fingerprint else "")
    prefix = base_prefix(database, backup_id)

    def stream(parent_manifest: Path | None) -> Any:
        with Progress(f"base backup of {dsn.display_dsn(db_url)}", size_hint) as progress:
            return stream_basebackup(
                db_url, repo, f"{prefix}/{data_key}", label=f"pgdr {backup_id}",
                encrypt_to=encrypt_fingerprint, gpg_homedir=settings.gpg_homedir,
                fast_checkpoint=fast_checkpoint, zstd_level=settings.zstd_level,
                zstd_threads=settings.zstd_threads, secrets=settings.secrets(), progress=progress.update,
                bin_dir=same_major_bin_dir(version), incremental_from=parent_manifest)

    if plan.kind == INCREMENTAL:
        assert plan.parent is not None
        try:
            # The parent's backup_manifest in a private directory, gone afterwards.
            with tempfile.TemporaryDirectory(prefix="pgdr-incremental-", dir=settings.work_dir) as scratch:
                result = stream(fetch_server_manifest(
                    repo, plan.parent, Path(scratch) / SERVER_MANIFEST, gpg_homedir=settings.gpg_homedir,
                    passphrase=settings.gpg_passphrase, secrets=settings.secrets()))
        except PgdrError as exc:
            if kind == INCREMENTAL:
                raise
            # The nightly backup never fails for want of an incremental (the parent's
            # backup_manifest unreadable, the server's WAL summaries gone): a full one is taken.
            warning = (f"the incremental backup on {plan.parent.backup_id} failed ({exc}): "
                       "taking a full backup")
            logger.warning("%s", warning)
            warnings.append(warning)
            plan = KindPlan(FULL, None, warning)
            result = stream(None)
    else:
        result = stream(None)
    logger.info("base backup %s: WAL %s to %s on timeline %d, %s stored", backup_id, result.start_lsn,
                result.end_lsn, result.timeline, human_bytes(result.stored.size))
    server_manifest = store_server_manifest(
        repo, f"{prefix}/{SERVER_MANIFEST}.zst" + (".gpg" if encrypt_fingerprint else ""),
        result.server_manifest, encrypt_to=encrypt_fingerprint, gpg_homedir=settings.gpg_homedir,
        zstd_level=settings.zstd_level, secrets=settings.secrets())
    return BaseManifest(
        backup_id=backup_id,
        database=database,
        started_at=catalog.iso(started),
        finished_at=catalog.iso(catalog.utcnow()),
        start_lsn=result.start_lsn,
        end_lsn=result.end_lsn,
        timeline=result.timeline,
        start_wal_file=start_wal_file(result, segment_size),
        wal_segment_size=segment_size,
        server_version=version,
        system_identifier=system_id,
        tool_version=catalog.TOOL_VERSION,
        compression=f"zstd-{settings.zstd_level}",
        encryption={"type": "gpg", "recipient_fingerprint": encrypt_fingerprint}
        if encrypt_fingerprint else None,
        size_bytes=result.stored.size,
        sha256=result.stored.sha256,
        data_key=data_key,
        source=dsn.display_dsn(db_url),
        kind=plan.kind,
        parent_backup_id=plan.parent.backup_id if plan.parent else None,
        server_manifest=server_manifest,
    ), warnings
