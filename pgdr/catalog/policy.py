"""Which backups to keep (pure): the runbook's retention per tier, with floors that no age overrides.

The choice is a pure function of the backups, the time and the policy (no storage, no
clock, no time zone): `choose` is what `pgdr prune` applies and what the tests exercise.
It decides for every area alike: database backups (grouped by database), files backups
(by name) and storage snapshots (by source bucket and prefix).

A backup is kept, whatever its age, when it is
- the newest backup of its tier (per group), or the newest one of the tier that is
  not known to be corrupt (a failed verification makes the newest worthless);
- one of the `keep_verified` newest verified backups of its group;
- younger than its tier's retention.
Everything else is deleted. Only a verification that passed counts as verified.

Storage snapshots share objects (a snapshot refers to the unchanged copies an earlier one
made): deleting one removes its manifest first, then only the objects that no remaining
snapshot refers to (`sweep`, pgdr.catalog.snapshot_retention). pgdr.catalog.retention applies
the choice to each area of a repository.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pgdr.ops.settings import TIER_RETENTION_DAYS

DEFAULT_GRACE = timedelta(hours=24)


@dataclass(frozen=True)
class BackupFacts:
    """What retention needs to know of one complete backup."""

    backup_id: str
    # The set it belongs to: a database, a files-backup name, a snapshotted bucket+prefix.
    group: str
    tier: str
    finished: datetime
    # True: verification passed; False: it failed (corrupt); None: never verified.
    verified: bool | None = None
    # An incremental base backup: the backup it was taken on (restoring it needs that one).
    parent: str | None = None


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
        tier_key = (backup.group, backup.tier)
        reasons = []
        if tier_key not in seen_tiers:
            seen_tiers.add(tier_key)
            reasons.append(f"newest {backup.tier} backup")
        if backup.verified is not False and tier_key not in good_tiers:
            good_tiers.add(tier_key)
            if not reasons:
                reasons.append(f"newest {backup.tier} backup not known to be corrupt")
        if backup.verified is True:
            rank = verified_count.get(backup.group, 0) + 1
            verified_count[backup.group] = rank
            if rank <= policy.keep_verified:
                reasons.append(f"verified #{rank} of the {policy.keep_verified} newest kept")
        if reasons:
            floors[(backup.group, backup.backup_id)] = "; ".join(reasons)

    decisions = []
    for backup in ordered:
        days = policy.days(backup.tier)
        age = now - backup.finished
        age_text = f"{age.total_seconds() / 86400:.1f} d old"
        floor = floors.get((backup.group, backup.backup_id))
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


def choose_safety_databases(found: Iterable[Any], now: datetime,
                            keep_days: int) -> list[tuple[Any, bool, str]]:
    """(database, drop?, reason) for each safety database (pgdr.restore.tags.SafetyDatabase): the
    newest of each role per target is kept (it is what `pgdr rollback` uses), the others
    once older than keep_days; one without a time is kept (never drop what is not understood)."""
    _aware(now, "now")
    newest_first = sorted(found, key=lambda d: d.at or "", reverse=True)
    seen: set[tuple[str, str]] = set()
    decisions = []
    for database in newest_first:
        group = (database.of, database.role)
        if group not in seen:
            seen.add(group)
            decisions.append((database, False, f"newest {database.role} copy of {database.of}"))
            continue
        try:
            age = now - datetime.fromisoformat(database.at.replace("Z", "+00:00"))
        except (AttributeError, ValueError):
            decisions.append((database, False, "no time recorded: left for an operator"))
            continue
        expired = age >= timedelta(days=keep_days)
        decisions.append((database, expired, f"{age.total_seconds() / 86400:.1f} d old, "
                          f"{'past' if expired else 'within'} the {keep_days} d kept for safety databases"))
    return decisions



# --- point-in-time recovery: base backups and the WAL they need ---------------------------------
#
# Base backups are kept per tier like dumps, with one floor more: the newest base backup that
# finished before the any-moment recovery window opened (the hot tier's retention) is kept,
# since recovery to the window's first moment starts from it; and every kept incremental keeps
# its chain back to its full. Archived WAL older than the oldest base backup that remains is
# deleted (a kept chain's full is the oldest of its chain); history files are kept.


def recovery_window_anchor(backups: Iterable[BackupFacts], now: datetime, policy: Policy) -> str | None:
    """The base backup that recovery to the first moment of the window (now - the hot
    tier's retention) starts from: the newest one finished by then."""
    opens = now - timedelta(days=policy.days("hot"))
    before = [b for b in backups if b.finished <= opens]
    return max(before, key=lambda b: (b.finished, b.backup_id)).backup_id if before else None


def choose_base_backups(backups: Iterable[BackupFacts], now: datetime, policy: Policy) -> list[Decision]:
    """`choose`, plus the recovery window's anchor kept whatever its age, plus the chain
    (parent, its parent, ... back to the full) of every incremental that is kept."""
    backups = list(backups)
    anchor = recovery_window_anchor(backups, now, policy)
    window = policy.days("hot")
    return keep_chains([Decision(d.backup, False, f"{d.reason}; kept: recovery to any moment of the last "
                                                  f"{window} d starts from it")
                        if d.delete and d.backup.backup_id == anchor else d
                        for d in choose(backups, now, policy)])


def keep_chains(decisions: list[Decision]) -> list[Decision]:
    """Undo the deletion of every backup that a kept incremental needs (its parent, that
    one's parent, ...): an incremental restores only with its whole chain."""
    by_id = {d.backup.backup_id: d for d in decisions}
    needed_by: dict[str, str] = {}
    for decision in decisions:
        if decision.delete:
            continue  # if a kept one needs it, that one's walk below marks it
        parent = decision.backup.parent
        while parent in by_id and parent not in needed_by:
            needed_by[parent] = decision.backup.backup_id
            parent = by_id[parent].backup.parent
    return [Decision(d.backup, False, f"{d.reason}; kept: incremental {needed_by[d.backup.backup_id]} "
                                      "needs it (its chain back to a full)")
            if d.delete and d.backup.backup_id in needed_by else d
            for d in decisions]

