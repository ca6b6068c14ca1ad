"""Prune: the runbook's retention as a flow.

For each database, files-backup name and snapshotted bucket (or the ones named): decide
with tasks.retention.choose, delete what it says (manifest first; a storage snapshot's
objects only once no remaining snapshot refers to them), remove incomplete backups and
stale uploads older than the grace period, and report every backup kept or deleted with
its reason (audit record + table artifact). Runs on its own and after every backup, files
backup and storage snapshot, for its tier.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.steps import FLOW_HOOKS, Stopwatch, open_repo, publish_table, record_audit, retrying, run_name
from tasks import catalog, replica, retention
from tasks.audit import audit_record
from tasks.locks import database_lock
from tasks.settings import Settings, check_tier, load_settings


@task(name="prune", task_run_name="prune {area} {name}", **retrying(2, 5))
def prune_set(repo_url: str, settings: Settings, area: str, name: str, tier: str | None,
              dry_run: bool) -> list[dict[str, Any]]:
    """Retention for one database, files-backup name or snapshotted bucket."""
    repo = open_repo(repo_url, settings)
    policy = retention.Policy(settings.retention_days, settings.keep_verified)

    def run() -> list[dict[str, Any]]:
        return retention.prune_set(repo, area, name, catalog.utcnow(), policy, tier, dry_run)

    if dry_run:  # only reads: no need to wait for a running backup
        return run()
    with database_lock(repo, name, "prune", area=area):
        return run()


@flow(name="prune", flow_run_name=run_name("prune-{db|name|bucket|all}"), log_prints=True, **FLOW_HOOKS)
def prune(repo: str | None = None, db: str | None = None, tier: str | None = None,
          dry_run: bool = False, area: str | None = None, name: str | None = None,
          bucket: str | None = None) -> dict[str, Any]:
    """Apply retention to the repository: database backups, files backups and storage
    snapshots (or one area; one database, files-backup name or bucket; one tier); returns
    every backup with what was done to it and why."""
    settings = load_settings()
    if tier:
        check_tier(tier)
    named = {retention.DATABASE: db, retention.FILES: name, retention.STORAGE: bucket}
    areas = retention.select_areas(area, named)
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)
    sets = [(each, one) for each in areas
            for one in ([named[each]] if named[each] else retention.list_sets(repository, each))]
    return apply_retention(repo_url, settings, sets, tier, dry_run)


def apply_retention(repo_url: str, settings: Settings, sets: list[tuple[str, str]], tier: str | None,
                    dry_run: bool) -> dict[str, Any]:
    """Prune each (area, name) set; audit record and table artifact of what was done."""
    clock = Stopwatch()
    rows: list[dict[str, Any]] = []
    for each, one in sets:
        rows += prune_set(repo_url, settings, each, one, tier, dry_run)
    counts = {action: sum(1 for r in rows if r["action"] == action) for action in {r["action"] for r in rows}}
    failed = [r for r in rows if r["action"] == "failed"]
    logger = get_run_logger()
    for row in rows:
        if row["action"] in ("locked", "failed"):
            logger.warning("%s %s: %s", row["action"], row["backup_id"], row["reason"])
    record_audit(repo_url, settings, audit_record(
        "prune", type=tier or "all", destination=repo_url,
        source=", ".join(one if each == retention.DATABASE else f"{each}/{one}" for each, one in sets) or "-",
        status="dry-run" if dry_run else "failed" if failed else "success",
        duration_seconds=clock.seconds, counts=counts,
        deleted=[r["backup_id"] for r in rows if r["action"] in ("deleted", "aborted")],
        locked=[r["backup_id"] for r in rows if r["action"] == "locked"]))
    if rows:
        publish_table("prune", rows, f"Prune of {repo_url}{' (dry run)' if dry_run else ''}: " +
                      ", ".join(f"{n} {action}" for action, n in sorted(counts.items())))
    return {"ok": not failed, "repository": repo_url, "dry_run": dry_run, "counts": counts, "backups": rows}


@task(name="copy to replica", **retrying(3, 5))
def replicate_backup(repo_url: str, replica_url: str, settings: Settings,
                     manifest: catalog.Manifest) -> dict[str, Any]:
    """The DR-region copy of a finished backup, checked against its manifest."""
    result = replica.copy_backup(open_repo(repo_url, settings), open_repo(replica_url, settings), manifest,
                                 settings.storage_classes.get(manifest.tier))
    get_run_logger().info("copied %s to %s (%s)", manifest.backup_id, replica_url, result["method"])
    return result


def prune_after_backup(repo_url: str, name: str, tier: str,
                       area: str = retention.DATABASE) -> dict[str, Any] | None:
    """Retention for the tier just backed up (of the database, files-backup name or bucket
    name), as steps of the backup's own run (a flow run of its own costs a second or two).
    The backup has succeeded whatever happens here: a pruning problem is logged (and
    audited), not raised."""
    try:
        return apply_retention(repo_url, load_settings(), [(area, name)], tier, dry_run=False)
    except Exception as exc:
        get_run_logger().warning("pruning %s after the backup failed: %s", name, exc)
        return None
