"""The Prefect tasks of flows/prune.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

from typing import Any

import psycopg
from prefect import get_run_logger, task

from pgdr.catalog import catalog, prune_report, retention
from pgdr.catalog.locks import database_lock
from pgdr.catalog.policy import Policy, choose_safety_databases
from pgdr.ops.errors import PgdrError, first_line
from pgdr.ops.settings import Settings
from pgdr.postgres import dsn, postgres
from pgdr.restore import restore as restoring
from pgdr.restore import staging, tags
from pgdr.storage import replica
from pgdr.storage.repository import Repository
from pgdr.storage.storage import StorageManifest
from tasks.policy import retrying


@task(name="prune", task_run_name="prune {area} {name}", **retrying(2, 5))
def prune_set(repo: Repository, settings: Settings, area: str, name: str, tier: str | None,
              dry_run: bool) -> list[dict[str, Any]]:
    """Retention for one database, files-backup name or snapshotted bucket."""
    policy = Policy(settings.retention_days, settings.keep_verified)

    def run() -> list[dict[str, Any]]:
        return retention.prune_set(repo, area, name, catalog.utcnow(), policy, tier, dry_run)

    if dry_run:  # only reads: no need to wait for a running backup
        return run()
    with database_lock(repo, name, "prune", area=area):
        return run()


@task(name="prune safety databases", **retrying(2, 5))
def prune_safety_databases(server_url: str, settings: Settings, of: str | None,
                           dry_run: bool) -> list[dict[str, Any]]:
    """Drop the databases restores and rollbacks set aside on the server (of one target, or
    all) once past PGDR_KEEP_SAFETY_DATABASES_DAYS; the newest per target stays."""
    admin = restoring.admin_database(dsn.database_name(server_url))
    rows = []
    with postgres.connect(server_url, dbname=admin, autocommit=True) as conn:
        found = [d for d in tags.safety_databases(conn) if of is None or d.of == of]
        for database, drop, reason in choose_safety_databases(
                found, catalog.utcnow(), settings.keep_safety_databases_days):
            action = "keep"
            if drop and dry_run:
                action = "would drop"
            elif drop:
                try:
                    tags.drop_safety_database(conn, database.name)
                    action = "dropped"
                except psycopg.Error as exc:
                    action, reason = "failed", f"{reason}; could not drop: {first_line(exc)}"
            rows.append(prune_report.safety_database_row(database, action, reason))
    return rows


@task(name="sweep leftovers")
def sweep_leftovers(settings: Settings, server_url: str | None) -> list[str]:
    """What killed runs left on this host (staging directories with decrypted dumps,
    passfiles) and, given a server (--server or DATABASE_URL), on it (scratch databases of
    runs that are gone, an interrupted swap): removed or finished, one line each."""
    lines = staging.sweep_local_leftovers(settings.work_dir)
    if server_url:
        try:
            lines += restoring.sweep_leftover_databases(server_url)
        except PgdrError as exc:
            get_run_logger().warning("could not look for leftover databases: %s", exc)
    for line in lines:
        get_run_logger().warning("%s", line)
    return lines


@task(name="copy to replica", **retrying(3, 5))
def replicate_backup(source: Repository, target: Repository, settings: Settings,
                     manifest: replica.StoredBackup | StorageManifest) -> dict[str, Any]:
    """The DR-region copy of a finished backup (database, base or files backup, or storage
    snapshot), checked against its manifest."""
    if isinstance(manifest, StorageManifest):
        result = replica.copy_snapshot(source, target, manifest)
    else:
        tier = getattr(manifest, "tier", None)
        result = replica.copy_backup(source, target, manifest, settings.storage_classes.get(tier or ""))
    get_run_logger().info("copied %s to %s (%s objects)", manifest.backup_id, target.url, result["objects"])
    return result
