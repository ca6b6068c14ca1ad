"""Retention choice as a pure function: no storage, a controlled clock, any machine time zone."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgdr.catalog import catalog
from pgdr.catalog.policy import BackupFacts, Policy, choose, choose_base_backups, recovery_window_anchor
from pgdr.catalog.retention import select_areas
from pgdr.catalog.snapshot_retention import SnapshotDir, snapshot_group, sweep
from pgdr.ops.errors import ConfigError
from pgdr.ops.settings import TIER_RETENTION_DAYS, TIERS
from pgdr.storage import storage

POLICY = Policy()


def facts(n: int, tier: str, finished: datetime, verified: bool | None = None,
          group: str = "fleet") -> BackupFacts:
    return BackupFacts(f"{finished.astimezone(UTC):%Y%m%dT%H%M%SZ}-{tier}-{n:04x}", group, tier,
                       finished, verified)


def kept_ids(backups: list[BackupFacts], now: datetime, policy: Policy = POLICY) -> set[str]:
    return {d.backup.backup_id for d in choose(backups, now, policy) if not d.delete}


@pytest.fixture
def seoul() -> Iterator[None]:
    """The machine's local time zone is Asia/Seoul (UTC+9) for the test."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Seoul"
    time.tzset()
    try:
        assert time.localtime(0).tm_hour == 9
        yield
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()


def simulate_year(schedule_zone: ZoneInfo) -> tuple[set[str], list[BackupFacts], datetime]:
    """Two years of the runbook's schedule at 02:30 local time in schedule_zone (daily every
    day, weekly on Sundays, monthly on the 1st), pruned after every backup as production
    does; returns what is left, every backup taken, and the final clock."""
    stored: dict[str, BackupFacts] = {}
    taken: list[BackupFacts] = []
    day = datetime(2025, 1, 1, 2, 30, tzinfo=schedule_zone)
    n = 0
    while day.year < 2027:
        tiers = ["daily"] + (["weekly"] if day.weekday() == 6 else []) + (["monthly"] if day.day == 1 else [])
        for tier in tiers:
            n += 1
            backup = facts(n, tier, day + timedelta(minutes=20))
            taken.append(backup)
            stored[backup.backup_id] = backup
            now = backup.finished + timedelta(seconds=5)
            for decision in choose(stored.values(), now, POLICY):
                if decision.delete:
                    del stored[decision.backup.backup_id]
        # The same wall-clock time tomorrow: 23 or 25 hours later across a DST change.
        day = (day + timedelta(days=1)).replace(hour=2, minute=30)
    return set(stored), taken, now


def expected_after(taken: list[BackupFacts], now: datetime) -> set[str]:
    """The runbook in plain words: each tier keeps what is younger than its retention."""
    return {b.backup_id for b in taken if now - b.finished < timedelta(days=TIER_RETENTION_DAYS[b.tier])}


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York"])
def test_a_simulated_year_leaves_exactly_the_policy_set(zone, seoul):
    left, taken, now = simulate_year(ZoneInfo(zone))
    assert left == expected_after(taken, now)
    by_tier = {tier: sum(1 for b in taken if b.backup_id in left and b.tier == tier) for tier in TIERS}
    assert by_tier["daily"] == 30  # one a day, the newest 30 days
    assert by_tier["monthly"] == 12  # 1 Jan 2026 ... 1 Dec 2026: younger than 365 days
    assert by_tier["weekly"] in (12, 13)
    assert by_tier["weekly"] == sum(1 for b in taken if b.tier == "weekly" and now - b.finished
                                    < timedelta(days=90))


def test_decisions_do_not_depend_on_the_machine_time_zone(seoul):
    now = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # Europe's spring-forward night
    berlin = ZoneInfo("Europe/Berlin")
    backups = [facts(i, "daily", datetime(2026, 3, 29, 3, 0, tzinfo=berlin) - timedelta(hours=i * 7))
               for i in range(1, 200)]
    in_seoul = [(d.backup.backup_id, d.delete, d.reason) for d in choose(backups, now, POLICY)]
    os.environ["TZ"] = "UTC"
    time.tzset()
    assert [(d.backup.backup_id, d.delete, d.reason) for d in choose(backups, now, POLICY)] == in_seoul
    # The boundary is exactly 30 days in UTC, not in local days.
    assert all((now - b.finished < timedelta(days=30)) == (b.backup_id in kept_ids(backups, now))
               for b in backups[1:])


def test_naive_times_are_refused():
    with pytest.raises(ValueError, match="time zone"):
        choose([], datetime(2026, 1, 1), POLICY)
    with pytest.raises(ValueError, match="time zone"):
        choose([BackupFacts("x", "fleet", "daily", datetime(2026, 1, 1))],
               datetime(2026, 2, 1, tzinfo=UTC), POLICY)


def test_old_good_backups_survive_when_the_newest_are_corrupt():
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    good = [facts(i, "daily", now - timedelta(days=40 + i), verified=True) for i in range(10)]
    unverified_old = [facts(100 + i, "daily", now - timedelta(days=60 + i)) for i in range(5)]
    corrupt = [facts(200 + i, "daily", now - timedelta(days=i), verified=False) for i in range(35)]
    decisions = {d.backup.backup_id: d for d in choose(good + unverified_old + corrupt, now, POLICY)}
    newest_good = [b.backup_id for b in good[:3]]
    assert all(not decisions[i].delete for i in newest_good)
    assert "verified #1" in decisions[newest_good[0]].reason
    assert "not known to be corrupt" in decisions[newest_good[0]].reason
    assert all(decisions[b.backup_id].delete for b in good[3:] + unverified_old)
    # The corrupt ones age out like any other, and are never the verified floor.
    assert all(decisions[b.backup_id].delete for b in corrupt if b.finished <= now - timedelta(days=30))
    assert "verification failed" in decisions[corrupt[-1].backup_id].reason


def test_retention_and_floor_are_configurable():
    now = datetime(2026, 6, 1, tzinfo=UTC)
    backups = [facts(i, "daily", now - timedelta(days=i + 1), verified=True) for i in range(20)]
    policy = Policy(retention_days={**TIER_RETENTION_DAYS, "daily": 5}, keep_verified=10)
    assert len(kept_ids(backups, now, policy)) == 10
    policy = Policy(retention_days={**TIER_RETENTION_DAYS, "daily": 15}, keep_verified=0)
    assert len(kept_ids(backups, now, policy)) == 14


def test_every_decision_has_a_reason_and_groups_are_separate():
    now = datetime(2026, 6, 1, tzinfo=UTC)
    old = now - timedelta(days=400)
    backups = [facts(1, "monthly", old, group="a"), facts(1, "monthly", old, group="b"),
               facts(2, "monthly", old - timedelta(days=31), group="a")]
    decisions = choose(backups, now, POLICY)
    assert all(d.reason for d in decisions)
    assert sorted((d.backup.group, d.delete) for d in decisions) == [("a", False), ("a", True),
                                                                       ("b", False)]


# --- properties -------------------------------------------------------------------------------

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
backup_lists = st.lists(
    st.builds(
        lambda n, tier, minutes, verified, db: facts(n, tier, NOW - timedelta(minutes=minutes), verified, db),
        st.integers(0, 0xFFFF), st.sampled_from(TIERS), st.integers(0, 800 * 24 * 60),
        st.sampled_from([True, False, None]), st.sampled_from(["fleet", "billing"])),
    max_size=60, unique_by=lambda b: (b.group, b.backup_id))
policies = st.builds(
    lambda days, keep: Policy(retention_days=dict(zip(TIERS, days, strict=True)), keep_verified=keep),
    st.lists(st.integers(0, 400), min_size=len(TIERS), max_size=len(TIERS)), st.integers(0, 5))


def newest(backups: list[BackupFacts]) -> BackupFacts:
    return max(backups, key=lambda b: (b.finished, b.backup_id))


@settings(max_examples=300, deadline=None)
@given(backup_lists, policies)
def test_property_floors_and_retention_are_never_violated(backups, policy):
    decisions = choose(backups, NOW, policy)
    assert sorted((d.backup.group, d.backup.backup_id) for d in decisions) == sorted(
        (b.group, b.backup_id) for b in backups)
    deleted = {(d.backup.group, d.backup.backup_id) for d in decisions if d.delete}

    groups: dict[tuple[str, str], list[BackupFacts]] = {}
    for b in backups:
        groups.setdefault((b.group, b.tier), []).append(b)
    for (group, _tier), members in groups.items():
        assert (group, newest(members).backup_id) not in deleted
        good = [b for b in members if b.verified is not False]
        if good:
            assert (group, newest(good).backup_id) not in deleted

    for group in {b.group for b in backups}:
        verified = sorted((b for b in backups if b.group == group and b.verified is True),
                          key=lambda b: (b.finished, b.backup_id), reverse=True)
        assert not {(group, b.backup_id) for b in verified[:policy.keep_verified]} & deleted

    for b in backups:
        if NOW - b.finished < timedelta(days=policy.days(b.tier)):
            assert (b.group, b.backup_id) not in deleted


@settings(max_examples=100, deadline=None)
@given(backup_lists, policies)
def test_property_pruning_twice_deletes_nothing_more(backups, policy):
    survivors = [d.backup for d in choose(backups, NOW, policy) if not d.delete]
    assert not [d for d in choose(survivors, NOW, policy) if d.delete]


# --- storage snapshots: what deleting one may remove ------------------------------------------


def snapshot(n: int, finished: datetime, current: dict[str, str], previous: storage.StorageManifest | None,
             bucket: str = "uploads") -> tuple[storage.StorageManifest, SnapshotDir]:
    """A snapshot of `current` (key -> content version) as take_snapshot records it: what is
    unchanged since previous refers to previous's copy, the rest is copied under this one."""
    snapshot_id = f"{finished:%Y%m%dT%H%M%SZ}-daily-{n:04x}"
    objects = {}
    for key, version in current.items():
        earlier = previous.objects.get(key) if previous else None
        objects[key] = earlier if earlier and earlier["etag"] == version else {
            "stored": storage.stored_key(bucket, snapshot_id, key, "pgdr"), "etag": version, "size": 1}
    manifest = storage.StorageManifest(
        snapshot_id=snapshot_id, bucket=bucket, source_prefix="", tier="daily",
        started_at=catalog.iso(finished), finished_at=catalog.iso(finished), object_count=len(objects),
        total_bytes=len(objects), copied_count=0, copied_bytes=0,
        previous_snapshot=previous.snapshot_id if previous else None, objects=objects)
    own = [e["stored"] for e in objects.values() if e["stored"].startswith(manifest.prefix + "/")]
    return manifest, SnapshotDir(snapshot_id, [*own, manifest.manifest_key], finished, manifest)


def test_an_expired_snapshot_keeps_the_objects_a_newer_one_refers_to():
    now = datetime(2026, 6, 1, tzinfo=UTC)
    first, first_dir = snapshot(1, now - timedelta(days=40), {"a": "1", "b": "1", "c": "1"}, None)
    second, second_dir = snapshot(2, now - timedelta(days=2), {"a": "1", "b": "1", "c": "2", "d": "1"}, first)
    # A snapshot pruned earlier whose manifest is gone: the first one still refers to x.
    pruned = "20260101T000000Z-daily-0000"
    x, y = f"storage/uploads/{pruned}/objects/x", f"storage/uploads/{pruned}/objects/y"
    first.objects["x"] = second.objects["x"] = {"stored": x, "etag": "1", "size": 1}
    dirs = {first.snapshot_id: first_dir, second.snapshot_id: second_dir,
            pruned: SnapshotDir(pruned, [x, y], now)}

    facts = [BackupFacts(m.snapshot_id, snapshot_group(m), m.tier, m.finished) for m in (first, second)]
    doomed = {d.backup.backup_id for d in choose(facts, now, POLICY) if d.delete}
    assert doomed == {first.snapshot_id}
    planned = sweep(dirs, doomed, {pruned})

    assert planned.manifests == {first.snapshot_id: first.manifest_key}
    # Only the copy of c that the second snapshot replaced goes; a and b stay for it.
    assert planned.objects[first.snapshot_id] == [first.objects["c"]["stored"]]
    assert planned.shared[first.snapshot_id] == 2
    assert planned.objects[pruned] == [y]
    assert planned.shared[pruned] == 1
    gone = {k for keys in planned.objects.values() for k in keys} | set(planned.manifests.values())
    assert not storage.referenced_keys([second]) & gone

    # Once nothing remains, everything goes.
    everything = sweep(dirs, {first.snapshot_id, second.snapshot_id}, {pruned})
    gone = {k for keys in everything.objects.values() for k in keys} | set(everything.manifests.values())
    assert gone == {k for d in dirs.values() for k in d.keys}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from("abcdefgh"), st.sampled_from("123"), max_size=8),
                min_size=1, max_size=8),
       st.data())
def test_property_no_remaining_snapshot_ever_loses_an_object(versions, data):
    dirs: dict[str, SnapshotDir] = {}
    previous = None
    for n, current in enumerate(versions):
        previous, found = snapshot(n, NOW - timedelta(days=len(versions) - n), current, previous)
        dirs[found.snapshot_id] = found
    ids = sorted(dirs)
    doomed = set(data.draw(st.lists(st.sampled_from(ids), unique=True)))
    planned = sweep(dirs, doomed, set())
    gone = {k for keys in planned.objects.values() for k in keys} | set(planned.manifests.values())
    remaining = [dirs[i].manifest for i in ids if i not in doomed]
    assert not storage.referenced_keys(remaining) & gone
    assert not {m.manifest_key for m in remaining} & gone
    # Nothing leaks: every key of a doomed snapshot goes, or a remaining one refers to it.
    for i in doomed:
        assert set(dirs[i].keys) <= gone | storage.referenced_keys(remaining)


def test_a_prune_covers_every_area_unless_one_is_named():
    assert select_areas(None, {}) == ["database", "files", "storage", "pitr"]
    # A database names its backups and its base backups and WAL alike.
    assert select_areas(None, {"database": "fleet", "pitr": "fleet"}) == ["database", "pitr"]
    assert select_areas("pitr", {"database": "fleet", "pitr": "fleet"}) == ["pitr"]
    assert select_areas(None, {"files": "app-config"}) == ["files"]
    assert select_areas(None, {"database": "fleet", "storage": "uploads"}) == ["database", "storage"]
    assert select_areas("storage", {"storage": "uploads"}) == ["storage"]
    with pytest.raises(ConfigError, match="a database set was named, which is not the area files"):
        select_areas("files", {"database": "fleet"})
    with pytest.raises(ConfigError, match="unknown area 'wal'"):
        select_areas("wal", {})


def test_base_backups_keep_the_one_the_recovery_window_starts_from():
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    nightly = [BackupFacts(f"n{day}", "fleet", "hot", now - timedelta(days=day, hours=1))
               for day in range(1, 12)]
    kept = {d.backup.backup_id for d in choose_base_backups(nightly, now, Policy()) if not d.delete}
    # Recovery to now - 7 d starts from the newest backup finished by then: night 7.
    assert kept == {f"n{day}" for day in range(1, 8)}
    assert {d.backup.backup_id for d in choose(nightly, now, Policy()) if not d.delete} == kept - {"n7"}
    assert recovery_window_anchor(nightly[:3], now, Policy()) is None  # all inside the window
