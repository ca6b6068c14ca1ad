"""Retention of point-in-time recovery: a database's base backups, and the archived WAL
they need.

Base backups are chosen by pgdr.catalog.policy.choose_base_backups; archived WAL older than the
oldest base backup that remains is deleted (a kept chain's full is the oldest of its chain).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pgdr.catalog.backup_retention import PrunePlan, StoredBackup, apply_plan, plan_backups, scan_backups
from pgdr.catalog.catalog import database_component
from pgdr.catalog.policy import DEFAULT_GRACE, Policy, choose_base_backups
from pgdr.catalog.prune_report import PITR, deletion_outcome, report_row
from pgdr.catalog.scan import list_databases
from pgdr.pitr import wal, walarchive
from pgdr.pitr.basebackup import BASE_AREA, BaseManifest
from pgdr.storage.repository import Repository


def list_pitr_sets(repo: Repository) -> list[str]:
    """The databases with base backups or archived WAL."""
    return [name for name in list_databases(repo)
            if {BASE_AREA, wal.WAL_AREA} & set(repo.list_dirs(f"{database_component(name)}/"))]


def scan_base_backups(repo: Repository, database: str) -> tuple[list[StoredBackup], list[StoredBackup]]:
    """scan_backups of a database's base backups (`<db>/base/<YYYY>/<MM>/<DD>/<backup_id>/<file>`)."""
    return scan_backups(repo, f"{database_component(database)}/{BASE_AREA}", database, BaseManifest,
                        tiered=False)


def plan_pitr_prune(repo: Repository, database: str, now: datetime, policy: Policy,
                    tier: str | None = None, grace: timedelta = DEFAULT_GRACE) -> PrunePlan:
    """What pruning the database's base backups would do (the WAL follows them)."""
    return plan_backups(repo, PITR, f"{database_component(database)}/{BASE_AREA}",
                        scan_base_backups(repo, database), now, policy, tier, grace, choose_base_backups)


def prune_archived_wal(repo: Repository, database: str, remaining: list[BaseManifest],
                       dry_run: bool) -> list[dict[str, object]]:
    """Delete the archived WAL older than the oldest remaining base backup: one report row."""
    names = walarchive.prunable_segments((f.name for f in walarchive.archived_files(repo, database)),
                                         (b.start_wal_file for b in remaining))
    if not names:
        return []
    oldest = min(remaining, key=lambda b: (wal.segment_position(b.start_wal_file), b.backup_id))
    problem = None
    if not dry_run:
        failed = list(walarchive.delete_archived(repo, database, names).values())
        if failed:
            problem = f"{len(failed)} not deleted ({failed[0]}): the next prune retries"
    reason = (f"{len(names)} archived WAL files before {oldest.start_wal_file}, where the oldest "
              f"remaining base backup {oldest.backup_id} starts" + (f"; {problem}" if problem else ""))
    return [report_row(PITR, f"wal {names[0]}..{names[-1]}", database, None,
                       deletion_outcome(dry_run, problem), reason)]


def prune_pitr(repo: Repository, database: str, now: datetime, policy: Policy, tier: str | None = None,
               dry_run: bool = False) -> list[dict[str, object]]:
    """Retention for a database's base backups, then its archived WAL. The WAL goes only
    once the backups are decided and deleted, and only before the oldest one that is still
    there (a backup that could not be deleted keeps its WAL); nothing goes while a base
    backup's manifest is unreadable (it may need any of it)."""
    plan = plan_pitr_prune(repo, database, now, policy, tier)
    rows = apply_plan(repo, plan, dry_run)
    if plan.unreadable:
        return rows
    gone = {r["backup_id"] for r in rows if r["action"] in ("deleted", "would delete")}
    remaining = [s.manifest for s in scan_base_backups(repo, database)[0]
                 if s.manifest and s.manifest.backup_id not in gone]
    return rows + prune_archived_wal(repo, database, remaining, dry_run)
