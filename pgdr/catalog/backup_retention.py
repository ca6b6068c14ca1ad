"""Retention of database backups and files backups: scan their prefixes, plan with
pgdr.catalog.policy, delete.

A backup goes manifest first, so that a half-deleted backup is never taken for a complete
one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pgdr.catalog.catalog import (
    MANIFEST,
    NON_TIER_AREAS,
    VERIFIED,
    Manifest,
    StoredManifest,
    backup_time,
    database_component,
    iso,
    parse_backup_id,
)
from pgdr.catalog.policy import DEFAULT_GRACE, BackupFacts, Decision, Policy, choose, is_stale
from pgdr.catalog.prune_report import (
    DATABASE,
    FILES,
    abort_stale_uploads,
    deletion_outcome,
    is_backup_id,
    report_row,
)
from pgdr.catalog.verification import read_verification
from pgdr.files import manifest as files_manifest
from pgdr.ops.errors import PgdrError
from pgdr.storage.repository import IncompleteUpload, Repository


@dataclass
class StoredBackup:
    """The objects under one backup's prefix, complete (with manifest) or not."""

    group: str
    tier: str
    prefix: str
    keys: list[str]
    newest: datetime
    manifest: Any = None  # catalog.Manifest or files.FilesManifest
    verified: bool | None = None


@dataclass
class PrunePlan:
    area: str
    decisions: list[tuple[Decision, StoredBackup]]
    incomplete: list[StoredBackup]
    stale_uploads: list[IncompleteUpload]
    unreadable: list[StoredBackup]


def scan_backups(repo: Repository, root: str, group: str, kind: type[StoredManifest], *,
                 tiered: bool = True) -> tuple[list[StoredBackup], list[StoredBackup]]:
    """Every backup prefix under root (`<root>[/<tier>]/<YYYY>/<MM>/<DD>/<backup_id>/<file>`,
    all pages of every tier), complete ones with their manifest; and apart, those whose
    manifest cannot be read or describes another backup (left alone: never delete what is
    not understood)."""
    areas = ([f"{root}/{tier}" for tier in repo.list_dirs(root + "/") if tier not in NON_TIER_AREAS]
             if tiered else [root])
    found: dict[str, StoredBackup] = {}
    for area in areas:
        for info in repo.list(area + "/"):
            parts = info.key[len(area) + 1:].split("/")
            # Only ids pgdr writes, at the depth it writes them.
            if len(parts) != 5 or not is_backup_id(parts[3]):
                continue
            prefix = f"{area}/{'/'.join(parts[:4])}"
            stored = found.setdefault(prefix, StoredBackup(group, parse_backup_id(parts[3]).tier, prefix, [],
                                                           info.modified))
            stored.keys.append(info.key)
            stored.newest = max(stored.newest, info.modified)
    readable, unreadable = [], []
    for stored in found.values():
        if f"{stored.prefix}/{MANIFEST}" in stored.keys:
            try:
                stored.manifest = kind.read(repo, f"{stored.prefix}/{MANIFEST}")
            except (PgdrError, ValueError):
                unreadable.append(stored)
                continue
            if not stored.manifest.belongs_at(stored.prefix):
                unreadable.append(stored)  # a manifest moved here from elsewhere: never trusted
                continue
        readable.append(stored)
    return readable, unreadable


def scan_database(repo: Repository, database: str) -> tuple[list[StoredBackup], list[StoredBackup]]:
    """scan_backups of a database, with each backup's verification result."""
    stored, unreadable = scan_backups(repo, database_component(database), database, Manifest)
    readable = []
    for backup in stored:
        if backup.manifest and f"{backup.prefix}/{VERIFIED}" in backup.keys:
            try:
                result = read_verification(repo, backup.manifest) or {}
            except (PgdrError, ValueError):
                unreadable.append(backup)
                continue
            backup.verified = result.get("verified") is True
        readable.append(backup)
    return readable, unreadable


def plan_backups(repo: Repository, area: str, root: str,
                 scanned: tuple[list[StoredBackup], list[StoredBackup]], now: datetime, policy: Policy,
                 tier: str | None, grace: timedelta,
                 chooser: Callable[[list[BackupFacts], datetime, Policy], list[Decision]] = choose
                 ) -> PrunePlan:
    """What pruning the scanned backups under root would do, as chooser decides."""
    stored, unreadable = scanned
    complete = {s.manifest.backup_id: s for s in stored if s.manifest}
    # The tier is the backup id's (where the backup lies): base backups have no tier field.
    facts = [BackupFacts(s.manifest.backup_id, s.group, s.tier, backup_time(s.manifest), s.verified,
                         getattr(s.manifest, "parent_backup_id", None))  # an incremental base backup's
             for s in complete.values()]
    decisions = [(d, complete[d.backup.backup_id]) for d in chooser(facts, now, policy)
                 if tier is None or d.backup.tier == tier]
    incomplete = [s for s in stored if s.manifest is None and is_stale(s.newest, now, grace)]
    uploads = [u for u in repo.incomplete_uploads(root + "/") if is_stale(u.started, now, grace)]
    return PrunePlan(area, decisions, incomplete, uploads, unreadable)


def plan_prune(repo: Repository, database: str, now: datetime, policy: Policy,
               tier: str | None = None, grace: timedelta = DEFAULT_GRACE) -> PrunePlan:
    """What pruning the database would do. The floors look at all its tiers; with `tier`,
    only that tier's backups are decided on."""
    return plan_backups(repo, DATABASE, database_component(database), scan_database(repo, database),
                        now, policy, tier, grace)


def plan_files_prune(repo: Repository, name: str, now: datetime, policy: Policy,
                     tier: str | None = None, grace: timedelta = DEFAULT_GRACE) -> PrunePlan:
    """What pruning the files backups named name would do (as plan_prune for a database)."""
    root = f"{files_manifest.AREA}/{files_manifest.check_name(name)}"
    return plan_backups(repo, FILES, root, scan_backups(repo, root, name, files_manifest.FilesManifest),
                        now, policy, tier, grace)


def delete_backup(repo: Repository, stored: StoredBackup) -> str | None:
    """Delete one backup's objects, manifest first so that a half-deleted backup is never
    listed as complete; returns why it could not be deleted (Object Lock, an error), or None."""
    locked = [(key, why) for key in stored.keys if (why := repo.lock_status(key))]
    if locked:
        key, why = locked[0]
        return f"locked ({why}) on {key.rsplit('/', 1)[-1]}"
    manifest_key = f"{stored.prefix}/{MANIFEST}"
    data = sorted(k for k in stored.keys if k != manifest_key and not k.endswith(VERIFIED))
    verified = sorted(k for k in stored.keys if k != manifest_key and k.endswith(VERIFIED))
    for batch in ([manifest_key] if manifest_key in stored.keys else [], data, verified):
        failed = repo.delete_many(batch)
        if failed:
            return f"could not delete: {next(iter(failed.values()))}"
    return None


def apply_plan(repo: Repository, plan: PrunePlan, dry_run: bool) -> list[dict[str, object]]:
    """Carry out the plan (or only describe it): one row per backup and per incomplete
    backup or upload, with what happened and why."""
    rows: list[dict[str, object]] = []
    for decision, stored in plan.decisions:
        backup = decision.backup
        action, reason = "keep", decision.reason
        if decision.delete:
            problem = None if dry_run else delete_backup(repo, stored)
            action = deletion_outcome(dry_run, problem)
            reason = f"{reason}; {problem}" if problem else reason
        rows.append(report_row(plan.area, backup.backup_id, backup.group, backup.tier, action, reason,
                               backup.finished, backup.verified))
    for stored in plan.incomplete:
        problem = None if dry_run else delete_backup(repo, stored)
        rows.append(report_row(plan.area, stored.prefix.rsplit("/", 1)[-1], stored.group, stored.tier,
                               "would delete" if dry_run else "deleted" if problem is None else "failed",
                               f"incomplete (no manifest) since {iso(stored.newest)}"
                               + (f"; {problem}" if problem else "")))
    rows += abort_stale_uploads(repo, plan.area, plan.stale_uploads, dry_run)
    for stored in plan.unreadable:
        rows.append(report_row(plan.area, stored.prefix.rsplit("/", 1)[-1], None, stored.tier, "keep",
                               "manifest unreadable: left for an operator to inspect"))
    return rows
