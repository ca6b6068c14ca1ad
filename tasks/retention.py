"""Which backups to keep: the runbook's retention per tier, with floors that no age overrides.

The choice is a pure function of the backups, the time and the policy (no storage, no
clock, no time zone): `choose` is what `pgdr prune` applies and what the tests exercise.

A backup is kept, whatever its age, when it is
- the newest backup of its tier (per database), or the newest one of the tier that is
  not known to be corrupt (a failed verification makes the newest worthless);
- one of the `keep_verified` newest verified backups of its database;
- younger than its tier's retention.
Everything else is deleted. Only a verification that passed counts as verified.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tasks.catalog import (
    MANIFEST,
    NON_TIER_AREAS,
    VERIFIED,
    Manifest,
    database_component,
    iso,
    parse_backup_id,
    read_verification,
)
from tasks.errors import PgdrError
from tasks.repository import IncompleteUpload, Repository
from tasks.settings import TIER_RETENTION_DAYS

DEFAULT_GRACE = timedelta(hours=24)


@dataclass(frozen=True)
class BackupFacts:
    """What retention needs to know of one complete backup."""

    backup_id: str
    database: str
    tier: str
    finished: datetime
    # True: verification passed; False: it failed (corrupt); None: never verified.
    verified: bool | None = None


@dataclass(frozen=True)
class Policy:
    retention_days: Mapping[str, int] = field(default_factory=lambda: dict(TIER_RETENTION_DAYS))
    keep_verified: int = 3

    def days(self, tier: str) -> int:
        return self.retention_days.get(tier, TIER_RETENTION_DAYS.get(tier, 0))


@dataclass(frozen=True)
class Decision:
    backup: BackupFacts
    delete: bool
    reason: str


def _aware(moment: datetime, what: str) -> datetime:
    # A naive time would be read in the machine's zone: refuse it rather than guess.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must carry a time zone (UTC), got {moment!r}")
    return moment


def _newest_first(backups: Iterable[BackupFacts]) -> list[BackupFacts]:
    return sorted(backups, key=lambda b: (b.finished, b.backup_id), reverse=True)


def choose(backups: Iterable[BackupFacts], now: datetime, policy: Policy) -> list[Decision]:
    """A decision with its reason for every backup, newest first."""
    _aware(now, "now")
    ordered = _newest_first(backups)
    for backup in ordered:
        _aware(backup.finished, f"finished time of {backup.backup_id}")

    floors: dict[tuple[str, str], str] = {}
    seen_tiers: set[tuple[str, str]] = set()
    good_tiers: set[tuple[str, str]] = set()
    verified_count: dict[str, int] = {}
    for backup in ordered:
        tier_key = (backup.database, backup.tier)
        reasons = []
        if tier_key not in seen_tiers:
            seen_tiers.add(tier_key)
            reasons.append(f"newest {backup.tier} backup")
        if backup.verified is not False and tier_key not in good_tiers:
            good_tiers.add(tier_key)
            if not reasons:
                reasons.append(f"newest {backup.tier} backup not known to be corrupt")
        if backup.verified is True:
            rank = verified_count.get(backup.database, 0) + 1
            verified_count[backup.database] = rank
            if rank <= policy.keep_verified:
                reasons.append(f"verified #{rank} of the {policy.keep_verified} newest kept")
        if reasons:
            floors[(backup.database, backup.backup_id)] = "; ".join(reasons)

    decisions = []
    for backup in ordered:
        days = policy.days(backup.tier)
        age = now - backup.finished
        age_text = f"{age.total_seconds() / 86400:.1f} d old"
        floor = floors.get((backup.database, backup.backup_id))
        if floor:
            decisions.append(Decision(backup, False, floor))
        elif age < timedelta(days=days):
            decisions.append(Decision(backup, False,
                                      f"{age_text}, within {backup.tier} retention of {days} d"))
        else:
            corrupt = " (verification failed)" if backup.verified is False else ""
            decisions.append(Decision(backup, True,
                                      f"{age_text}, past {backup.tier} retention of {days} d{corrupt}"))
    return decisions


def is_stale(moment: datetime, now: datetime, grace: timedelta = DEFAULT_GRACE) -> bool:
    """An incomplete backup or upload older than the grace period will never complete
    (a running backup finishes its upload and manifest well within it)."""
    return now - _aware(moment, "time") >= grace


# --- applying the choice to a repository ------------------------------------------------------


@dataclass
class StoredBackup:
    """The objects under one backup's prefix, complete (with manifest) or not."""

    database: str
    prefix: str
    keys: list[str]
    newest: datetime
    manifest: Manifest | None = None
    verified: bool | None = None


@dataclass
class PrunePlan:
    decisions: list[tuple[Decision, StoredBackup]]
    incomplete: list[StoredBackup]
    stale_uploads: list[IncompleteUpload]
    unreadable: list[str]


def scan_database(repo: Repository, database: str) -> tuple[list[StoredBackup], list[str]]:
    """Every backup prefix of the database (all pages of every tier), and the prefixes whose
    manifest cannot be read (left alone: never delete what is not understood)."""
    db_prefix = database_component(database) + "/"
    groups: dict[str, StoredBackup] = {}
    for tier in repo.list_dirs(db_prefix):
        if tier in NON_TIER_AREAS:
            continue
        for info in repo.list(f"{db_prefix}{tier}/"):
            parts = info.key.split("/")
            # <db>/<tier>/<YYYY>/<MM>/<DD>/<backup_id>/<file>, and only ids pgdr writes.
            if len(parts) != 7 or not _is_backup_id(parts[5]):
                continue
            prefix = "/".join(parts[:6])
            group = groups.setdefault(prefix, StoredBackup(database, prefix, [], info.modified))
            group.keys.append(info.key)
            group.newest = max(group.newest, info.modified)
    unreadable = []
    for group in groups.values():
        if f"{group.prefix}/{MANIFEST}" not in group.keys:
            continue
        try:
            group.manifest = Manifest.from_json(repo.get_bytes(f"{group.prefix}/{MANIFEST}"))
            if f"{group.prefix}/{VERIFIED}" in group.keys:
                result = read_verification(repo, group.manifest) or {}
                group.verified = result.get("verified") is True
        except (PgdrError, ValueError):
            unreadable.append(group.prefix)
    return list(groups.values()), unreadable


def _is_backup_id(value: str) -> bool:
    try:
        parse_backup_id(value)
    except PgdrError:
        return False
    return True


def plan_prune(repo: Repository, database: str, now: datetime, policy: Policy,
               tier: str | None = None, grace: timedelta = DEFAULT_GRACE) -> PrunePlan:
    """What pruning the database would do. The floors look at all its tiers; with `tier`,
    only that tier's backups are decided on."""
    stored, unreadable = scan_database(repo, database)
    complete = {(s.manifest.database, s.manifest.backup_id): s for s in stored
                if s.manifest and s.prefix not in unreadable}
    facts = [BackupFacts(m.backup_id, m.database, m.tier, m.finished, s.verified)
             for s in complete.values() for m in [s.manifest] if m]
    decisions = [(d, complete[(d.backup.database, d.backup.backup_id)]) for d in choose(facts, now, policy)
                 if tier is None or d.backup.tier == tier]
    incomplete = [s for s in stored if s.manifest is None and s.prefix not in unreadable
                  and is_stale(s.newest, now, grace)]
    uploads = [u for u in repo.incomplete_uploads(database_component(database) + "/")
               if is_stale(u.started, now, grace)]
    return PrunePlan(decisions, incomplete, uploads, unreadable)


def delete_backup(repo: Repository, stored: StoredBackup) -> str | None:
    """Delete one backup's objects, manifest first so that a half-deleted backup is never
    listed as complete; returns why it could not be deleted (Object Lock, an error), or None."""
    locked = [(key, why) for key in stored.keys if (why := repo.lock_status(key))]
    if locked:
        key, why = locked[0]
        return f"locked ({why}) on {key.rsplit('/', 1)[-1]}"
    manifest_key = f"{stored.prefix}/{MANIFEST}"
    ordered = sorted(stored.keys, key=lambda k: (k != manifest_key, k.endswith(VERIFIED), k))
    try:
        for key in ordered:
            repo.delete(key)
    except PgdrError as exc:
        return f"could not delete: {exc}"
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
            action = "would delete" if dry_run else ("deleted" if problem is None else
                                                     "locked" if problem.startswith("locked") else "failed")
            reason = f"{reason}; {problem}" if problem else reason
        rows.append({"backup_id": backup.backup_id, "database": backup.database, "tier": backup.tier,
                     "finished_at": iso(backup.finished), "verified": backup.verified,
                     "action": action, "reason": reason})
    for stored in plan.incomplete:
        problem = None if dry_run else delete_backup(repo, stored)
        rows.append({"backup_id": stored.prefix.rsplit("/", 1)[-1], "database": stored.database,
                     "tier": stored.prefix.split("/")[1], "finished_at": None, "verified": None,
                     "action": "would delete" if dry_run else "deleted" if problem is None else "failed",
                     "reason": f"incomplete (no manifest) since {iso(stored.newest)}"
                               + (f"; {problem}" if problem else "")})
    for upload in plan.stale_uploads:
        problem = None
        if not dry_run:
            try:
                repo.abort_upload(upload)
            except PgdrError as exc:
                problem = str(exc)
        rows.append({"backup_id": upload.key, "database": None, "tier": None, "finished_at": None,
                     "verified": None,
                     "action": "would abort" if dry_run else "aborted" if problem is None else "failed",
                     "reason": f"upload started {iso(upload.started)} never completed"
                               + (f"; {problem}" if problem else "")})
    for prefix in plan.unreadable:
        rows.append({"backup_id": prefix.rsplit("/", 1)[-1], "database": None, "tier": prefix.split("/")[1],
                     "finished_at": None, "verified": None, "action": "keep",
                     "reason": "manifest unreadable: left for an operator to inspect"})
    return rows
