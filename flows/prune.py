"""Prune: the runbook's retention as a flow.

For each database, files-backup name and snapshotted bucket (or the ones named), and the
base backups and archived WAL of each database (the pitr area): decide
with pgdr.catalog.policy.choose, delete what it says (manifest first; a storage snapshot's
objects only once no remaining snapshot refers to them), remove incomplete backups and
stale uploads older than the grace period, and report every backup kept or deleted with
its reason (audit record + table artifact). Runs on its own and after every backup, files
backup and storage snapshot, for its tier.
"""

from __future__ import annotations

from typing import Any, TypedDict

from prefect import flow, get_run_logger

from pgdr.catalog import retention
from pgdr.catalog.prune_report import DATABASE, FILES, PITR, STORAGE, safety_databases_unchecked_row
from pgdr.ops.errors import PgdrError
from pgdr.ops.settings import Settings, check_tier, load_settings
from pgdr.postgres import dsn
from pgdr.storage.repository import Repository
from tasks.artifacts import publish_table
from tasks.prune import prune_safety_databases, prune_set, sweep_leftovers
from tasks.records import audited, open_repo
from tasks.runs import FLOW_HOOKS, run_name


class PruneReport(TypedDict):
    """What retention did: each backup (and safety database) with its action and why."""

    ok: bool  # False when something could not be deleted
    repository: str
    dry_run: bool
    counts: dict[str, int]  # rows of each action
    backups: list[dict[str, object]]


class PruneResult(PruneReport):
    """`pgdr prune --json`."""

    leftovers: list[str]  # what killed runs had left on this host and server, removed


@flow(name="prune", flow_run_name=run_name("prune-{db|name|bucket|all}"), log_prints=True, **FLOW_HOOKS)
def prune(repo: str | None = None, db: str | None = None, tier: str | None = None,
          dry_run: bool = False, area: str | None = None, name: str | None = None,
          bucket: str | None = None, server: str | None = None) -> PruneResult:
    """Apply retention to the repository: database backups, files backups and storage
    snapshots (or one area; one database, files-backup name or bucket; one tier); returns
    every backup with what was done to it and why. With a server (`server` or
    DATABASE_URL), the safety databases restores left there are pruned too."""
    settings = load_settings()
    if tier:
        check_tier(tier)
    named = {DATABASE: db, FILES: name, STORAGE: bucket, PITR: db}
    areas = retention.select_areas(area, named)
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)
    sets: list[tuple[str, str]] = []
    for each in areas:
        given = named[each]
        sets += [(each, one) for one in ([given] if given else retention.list_sets(repository, each))]
    server_url = server or settings.db_url
    safety_server = server_url
    if DATABASE not in areas or tier not in (None, "pre-restore"):
        safety_server = None
    result = apply_retention(repository, settings, sets, tier, dry_run, safety_server, db)
    return {**result, "leftovers": [] if dry_run else sweep_leftovers(settings, server_url)}


def apply_retention(repo: Repository, settings: Settings, sets: list[tuple[str, str]], tier: str | None,
                    dry_run: bool, server_url: str | None = None, of: str | None = None) -> PruneReport:
    """Prune each (area, name) set, and the safety databases on server_url (of one target,
    or all); audit record and table artifact of what was done."""
    source = ", ".join(one if each == DATABASE else f"{each}/{one}" for each, one in sets) or "-"
    with audited(repo, settings, "prune", type=tier or "all", source=source, destination=repo.url) as step:
        rows: list[dict[str, Any]] = []
        for each, one in sets:
            rows += prune_set(repo, settings, each, one, tier, dry_run)
        if server_url:
            try:
                rows += prune_safety_databases(server_url, settings, of, dry_run)
            except PgdrError as exc:  # the repository's pruning stands; the report says what was not done
                rows.append(safety_databases_unchecked_row(dsn.display_dsn(server_url), str(exc)))
        counts = {action: sum(1 for r in rows if r["action"] == action)
                  for action in {r["action"] for r in rows}}
        failed = [r for r in rows if r["action"] == "failed"]
        logger = get_run_logger()
        for row in rows:
            if row["action"] in ("locked", "failed"):
                logger.warning("%s %s: %s", row["action"], row["backup_id"], row["reason"])
        step.succeeded(
            status="dry-run" if dry_run else "failed" if failed else "success", counts=counts,
            deleted=[r["backup_id"] for r in rows if r["action"] in ("deleted", "aborted")],
            dropped_databases=[r["backup_id"] for r in rows if r["action"] == "dropped"],
            locked=[r["backup_id"] for r in rows if r["action"] == "locked"])
    if rows:
        publish_table("prune", rows, f"Prune of {repo.url}{' (dry run)' if dry_run else ''}: " +
                      ", ".join(f"{n} {action}" for action, n in sorted(counts.items())))
    return {"ok": not failed, "repository": repo.url, "dry_run": dry_run, "counts": counts, "backups": rows}


def prune_after_backup(repo: Repository, name: str, tier: str,
                       area: str = DATABASE) -> PruneReport | None:
    """Retention for the tier just backed up (of the database, files-backup name or bucket
    name), as steps of the backup's own run (a flow run of its own costs a second or two).
    The backup has succeeded whatever happens here: a pruning problem is logged (and
    audited), not raised."""
    try:
        return apply_retention(repo, load_settings(), [(area, name)], tier, dry_run=False)
    except Exception as exc:
        get_run_logger().warning("pruning %s after the backup failed: %s", name, exc)
        return None
