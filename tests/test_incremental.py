"""PostgreSQL 17 incremental base backups: the default policy (full or incremental), the
chain a restore needs, retention that never breaks a chain, the tar scan that keeps the
server's backup_manifest, and a real full + 2 incrementals recovered to a moment."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pgdr.catalog.policy import BackupFacts, Decision, Policy, choose, choose_base_backups, keep_chains
from pgdr.ops.errors import ConfigError, IntegrityError
from pgdr.pitr.basebackup import FULL, INCREMENTAL, BaseManifest, TarMemberCatcher, list_base_backups
from pgdr.pitr.incremental import backup_chain, plan_backup_kind
from pgdr.postgres.cluster import LocalCluster
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.pitr import (  # noqa: F401 - server_dir: a fixture
    PGDR,
    archiving_pg17,
    execute,
    server_dir,
    switch_and_wait_archived,
)

DB = "ledger"
NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
STORED = {"key": "k", "size_bytes": 1, "sha256": "0" * 64}


def base(backup_id: str, days_ago: float, kind: str = FULL, parent: str | None = None, *,
         system: str = "1", version: str = "17.2", timeline: int = 1,
         server_manifest: dict | None = STORED) -> BaseManifest:
    finished = (NOW - timedelta(days=days_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return BaseManifest(backup_id, DB, finished, finished, "0/1", "0/2", timeline, "x", 16 << 20, version,
                        system, "pgdr", "zstd-3", None, 1, "0" * 64, "base.tar.zst", "here", kind, parent,
                        server_manifest)


def plan(requested: str, backups: list[BaseManifest], **overrides):
    facts = {"server_major": 17, "summarize_wal": True, "system_identifier": "1", "timeline": 1, "now": NOW}
    return plan_backup_kind(requested, backups, **{**facts, **overrides})


# --- the default policy ---------------------------------------------------------------------


def test_the_default_policy_is_daily_incrementals_on_a_weekly_full():
    week = [base("f", 6), base("i1", 5, INCREMENTAL, "f"), base("i2", 4, INCREMENTAL, "i1")]
    chosen = plan("auto", week)
    assert (chosen.kind, chosen.parent.backup_id, chosen.warning) == (INCREMENTAL, "i2", None)
    assert plan("auto", []).kind == FULL  # the first one
    # The newest full is 7 days old: a new full, whatever the incrementals since.
    stale = [base("f", 7), base("i1", 1, INCREMENTAL, "f")]
    assert plan("auto", stale).kind == FULL and "7 days old" in plan("auto", stale).note
    assert plan("full", week).kind == FULL and plan("full", week).parent is None
    assert plan("incremental", week).parent.backup_id == "i2"


def test_an_incremental_is_only_taken_on_a_whole_chain_of_the_same_server():
    assert plan("auto", [base("f", 1)], server_major=15).kind == FULL
    assert plan("auto", [base("f", 1, system="2")]).note == "no earlier base backup of this server"
    assert plan("auto", [base("f", 1, version="16.4")]).kind == FULL
    assert plan("auto", [base("f", 1, timeline=1)], timeline=2).kind == FULL
    # Taken before backup_manifest was stored apart: nothing to take an incremental on.
    assert plan("auto", [base("f", 1, server_manifest=None)]).kind == FULL
    broken = [base("i1", 2, INCREMENTAL, "gone"), base("i2", 1, INCREMENTAL, "i1")]
    assert plan("auto", broken).kind == FULL and "gone" in plan("auto", broken).note
    with pytest.raises(ConfigError, match=r"cannot be taken: .*gone"):
        plan("incremental", broken)
    with pytest.raises(ConfigError, match="PostgreSQL 15 has no incremental"):
        plan("incremental", [base("f", 1)], server_major=15)
    with pytest.raises(ConfigError, match="unknown backup kind"):
        plan("differential", [])


def test_summarize_wal_off_falls_back_to_a_full_backup_with_a_warning():
    chosen = plan("auto", [base("f", 1)], summarize_wal=False)
    assert chosen.kind == FULL and "summarize_wal is off" in chosen.warning
    assert "taking a full backup instead" in chosen.warning
    with pytest.raises(ConfigError, match="summarize_wal is off"):
        plan("incremental", [base("f", 1)], summarize_wal=False)


# --- the chain a restore needs ----------------------------------------------------------------


def test_the_chain_of_an_incremental_runs_back_to_its_full_and_a_missing_link_is_named():
    backups = [base("f", 3), base("i1", 2, INCREMENTAL, "f"), base("i2", 1, INCREMENTAL, "i1"),
               base("g", 0.5)]
    assert [b.backup_id for b in backup_chain(backups, backups[2])] == ["f", "i1", "i2"]
    assert [b.backup_id for b in backup_chain(backups, backups[3])] == ["g"]
    with pytest.raises(IntegrityError, match="i2 is incremental on i1, which is not in the repository"):
        backup_chain([b for b in backups if b.backup_id != "i1"], backups[2])
    other = [base("f", 3, system="2"), base("i1", 2, INCREMENTAL, "f")]
    with pytest.raises(IntegrityError, match="not of the same server"):
        backup_chain(other, other[1])


def test_a_manifest_written_before_incrementals_reads_as_a_full_backup():
    raw = json.loads(base("20260101T000000Z-hot-abcd", 1).to_json())
    for name in ("kind", "parent_backup_id", "server_manifest"):
        del raw[name]
    old = BaseManifest.from_json(json.dumps(raw).encode())
    assert (old.kind, old.parent_backup_id, old.server_manifest) == (FULL, None, None)


def test_the_tar_scan_keeps_the_backup_manifest_whatever_the_chunk_sizes():
    buffer = io.BytesIO()
    manifest = b'{"PostgreSQL-Backup-Manifest-Version": 2}\n' * 40
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (("PG_VERSION", b"17\n"), ("base/1/1259", b"x" * 9000), ("empty", b""),
                           ("backup_manifest", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = buffer.getvalue()
    for size in (1, 7, 511, 512, 4096, len(stream)):
        catcher = TarMemberCatcher("backup_manifest")
        for at in range(0, len(stream), size):
            catcher.feed(stream[at:at + size])
        assert catcher.found == manifest, size
    missing = TarMemberCatcher("nothing")
    missing.feed(stream)
    assert missing.found is None


# --- retention never breaks a chain -----------------------------------------------------------


def facts(backup_id: str, days_ago: float, parent: str | None = None, tier: str = "hot") -> BackupFacts:
    return BackupFacts(backup_id, DB, tier, NOW - timedelta(days=days_ago, hours=1), parent=parent)


def test_retention_keeps_every_parent_a_kept_incremental_needs():
    # Two weeks of nightly backups: a full every 7 days, incrementals in between.
    nightly = []
    for day in range(14, 0, -1):
        full = day % 7 == 0
        nightly.append(facts(f"d{day}", day, None if full else f"d{day + 1}"))
    decisions = {d.backup.backup_id: d for d in choose_base_backups(nightly, NOW, Policy())}
    kept = {i for i, d in decisions.items() if not d.delete}
    # The hot tier keeps 7 days; night 7 is the full the window's chain needs, and the
    # recovery window's anchor; night 8 is an incremental on night 9 ... on full 14: all go.
    assert kept == {f"d{day}" for day in range(1, 8)}
    # Whatever is kept, its whole chain is kept too.
    for backup in nightly:
        if backup.backup_id in kept and backup.parent:
            assert backup.parent in kept
    # Fulls on nights 10 and 3: nights 4 to 9 are a chain of incrementals on full 10. Night 4
    # is within the hot tier's 7 days: 7 (also the window's anchor) to 10 are past it, and kept.
    nightly = [facts(f"d{day}", day, None if day in (3, 10) else f"d{day + 1}") for day in range(10, 0, -1)]
    decisions = {d.backup.backup_id: d for d in choose_base_backups(nightly, NOW, Policy())}
    assert {i for i, d in decisions.items() if not d.delete} == {f"d{day}" for day in range(1, 11)}
    assert decisions["d10"].reason.endswith("kept: incremental d4 needs it (its chain back to a full)")
    # Without the chains, retention alone would delete 8, 9 and 10.
    deleted = {d.backup.backup_id for d in choose(nightly, NOW, Policy()) if d.delete}
    assert deleted == {"d7", "d8", "d9", "d10"}


def test_keep_chains_undoes_only_deletions_a_kept_incremental_needs():
    full, inc, lone = facts("f", 40), facts("i", 20, "f"), facts("old", 50)
    undone = keep_chains([Decision(inc, False, "within"), Decision(full, True, "past"),
                          Decision(lone, True, "past")])
    assert [(d.backup.backup_id, d.delete) for d in undone] == [("i", False), ("f", False), ("old", True)]
    assert undone[1].reason == "past; kept: incremental i needs it (its chain back to a full)"
    # A deleted incremental keeps nothing.
    assert keep_chains([Decision(inc, True, "past"), Decision(full, True, "past")])[1].delete


# --- a real PostgreSQL 17 -----------------------------------------------------------------------


def test_a_full_and_two_incrementals_recover_every_committed_row(capsys, server_dir):  # noqa: F811
    repo_root = server_dir / "repo"
    with archiving_pg17(server_dir, DB, summarize_wal="on") as (cluster, repo_url):
        url = cluster.url(DB)

        def write(first: int, last: int, phase: str) -> None:
            execute(url, f"INSERT INTO trips SELECT i, '{phase}', repeat(md5(i::text), 20) "
                         f"FROM generate_series({first}, {last}) i")

        def backup(*extra: str) -> dict:
            return cli_json(capsys, "basebackup", "--db", url, "--repo", repo_url, *extra)

        execute(url, "CREATE TABLE trips (id int PRIMARY KEY, phase text, payload text)")
        write(1, 1000, "before full")
        full = backup()
        write(1001, 2000, "after full")
        execute(url, "UPDATE trips SET phase = 'changed after full' WHERE id <= 10")
        first = backup()
        write(2001, 3000, "after incremental 1")
        execute(url, "DELETE FROM trips WHERE id BETWEEN 11 AND 20")
        second = backup()
        write(3001, 4000, "after incremental 2")
        with psycopg.connect(url) as conn:
            target = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            expected = conn.execute("SELECT id, phase, payload FROM trips ORDER BY id").fetchall()
        write(4001, 5000, "after the target")  # recovery stops at the first commit after the target
        assert (full["kind"], full["parent_backup_id"]) == ("full", None)
        assert (first["kind"], first["parent_backup_id"]) == ("incremental", full["backup_id"])
        assert (second["kind"], second["parent_backup_id"]) == ("incremental", first["backup_id"])
        assert second["size_bytes"] < full["size_bytes"]

        listed = {b["backup_id"]: b for b in cli_json(capsys, "list", "--repo", repo_url)["base_backups"]}
        assert listed[second["backup_id"]]["parent_backup_id"] == first["backup_id"]
        status = cli_json(capsys, "archive-status", "--repo", repo_url, "--db", DB)
        assert status["base_backup"]["kind"] == "incremental"
        switch_and_wait_archived(url)

        datadir = server_dir / "recovered"
        code, out, err = run_cli(capsys, "pitr", "--datadir", str(datadir), "--repo", repo_url, "--db", DB,
                                 "--target-time", target.isoformat(), "--timeout", "300", "--json")
        assert code == 0, err
        result = json.loads(out)
        recovered = LocalCluster(datadir, result["port"], bin_dir=cluster.bin_dir)
        try:
            assert result["backup_chain"] == [full["backup_id"], first["backup_id"], second["backup_id"]]
            with psycopg.connect(recovered.url(DB)) as conn:
                rows = conn.execute("SELECT id, phase, payload FROM trips ORDER BY id").fetchall()
            assert len(rows) == 3990 and rows == expected
        finally:
            recovered.stop()

        # A missing link: a clear error before the target directory is even created.
        repo = open_repository(repo_url)
        middle = next(b for b in list_base_backups(repo, DB) if b.backup_id == first["backup_id"])
        repo.delete(middle.manifest_key)
        missing = server_dir / "missing-link"
        code, _, err = run_cli(capsys, "restore", "latest", "--physical", "--datadir", str(missing),
                               "--repo", repo_url, "--db", DB)
        assert code != 0 and f"is incremental on {first['backup_id']}, which is not" in error_line(err)
        assert not missing.exists()
        repo.put_bytes(middle.manifest_key, middle.to_json())
        # A damaged link: its checksum fails before pg_combinebackup writes anything.
        data = repo_root / middle.prefix / middle.data_key
        data.write_bytes(data.read_bytes()[:-100] + b"\0" * 100)
        damaged = server_dir / "damaged-link"
        code, _, err = run_cli(capsys, "restore", "latest", "--physical", "--datadir", str(damaged),
                               "--repo", repo_url, "--db", DB)
        assert code != 0 and "sha256" in error_line(err)
        assert not damaged.exists() and not list(server_dir.glob(".damaged-link*"))

        # The nightly backup never fails for want of an incremental: with the previous backup's
        # stored backup_manifest unreadable, a full one is taken, and the output says why.
        newest = next(b for b in list_base_backups(repo, DB) if b.backup_id == second["backup_id"])
        (repo_root / newest.server_manifest["key"]).write_bytes(b"not a manifest")
        fallback = backup()
        assert (fallback["kind"], fallback["parent_backup_id"]) == ("full", None)
        assert f"the incremental backup on {second['backup_id']} failed" in fallback["warnings"][0]

        # summarize_wal off is read from the server (the nightly backup then takes a full one and
        # warns: test_summarize_wal_off_falls_back_to_a_full_backup_with_a_warning).
        execute(cluster.url(), "ALTER SYSTEM SET summarize_wal = off", "SELECT pg_reload_conf()")
        code, _, err = run_cli(capsys, "basebackup", "--db", url, "--repo", repo_url, "--incremental")
        assert code != 0 and "summarize_wal is off" in error_line(err)

