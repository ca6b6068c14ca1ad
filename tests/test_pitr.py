"""Point-in-time recovery on a real archiving PostgreSQL: wal-push as archive_command,
base backups, recovery to a moment, corrupt archives, retention, RDS (moto)."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import psycopg
import pytest

from flows.check import check as check_flow
from pgdr.catalog.catalog import iso
from pgdr.ops.errors import FailedWithReport, IntegrityError, PgdrError
from pgdr.pitr import wal, walarchive
from pgdr.pitr.basebackup import BaseManifest, choose_base_backup, find_base_backup, list_base_backups
from pgdr.pitr.baserestore import extract_safely
from pgdr.postgres.cluster import LocalCluster, grant_to_server
from pgdr.storage import s3repo
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
ARCHIVE_TIMEOUT = 2
WAL_START = "000000010000001000000000"


@dataclass(frozen=True)
class Archiving:
    cluster: LocalCluster
    repo_url: str
    repo_root: Path

    @property
    def url(self) -> str:
        return self.cluster.url(DB)


@pytest.fixture(scope="module")
def archiving() -> Iterator[Archiving]:
    """A server of its own that archives every WAL file with `pgdr wal-push` into a file
    repository the postgres user can write."""
    base = Path(tempfile.mkdtemp(prefix="pgdr-arch-", dir="/tmp"))
    repo_root = base / "repo"
    (repo_root / DB / "wal").mkdir(parents=True)
    grant_to_server(repo_root)
    repo_url = repo_root.as_uri()
    settings = {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_command": f"{PGDR} wal-push %p --repo {repo_url} --db {DB}",
        "archive_timeout": f"{ARCHIVE_TIMEOUT}s",
        # Measured here (PostgreSQL 15.20): with autovacuum on, forced archive_timeout
        # switches often stop firing after the first segment; with it off they fire every
        # time. Off keeps the RPO test about pgdr, not about that.
        "autovacuum": "off",
    }
    with LocalCluster.create(base / "pg", settings=settings) as cluster:
        # The WAL starts far past segment 1 (pg_resetwal), leaving room below for the
        # simulated past of the retention test.
        cluster.stop()
        reset = cluster._run(["pg_resetwal", "-l", WAL_START, "-D", str(cluster.datadir)])
        assert reset.returncode == 0, reset.stderr
        cluster.start()
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DB}")
        yield Archiving(cluster, repo_url, repo_root)


def server_now(url: str) -> datetime:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def rows_in(url: str, table: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT id, phase FROM {table} ORDER BY id").fetchall()


def pitr(capsys, archiving: Archiving, datadir: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "pitr", "--datadir", str(datadir), "--repo", archiving.repo_url, "--db", DB,
                   "--timeout", "300", *extra)


def test_recovery_to_a_time_between_t2_and_t3_yields_exactly_the_rows_up_to_t2(capsys, archiving, server_dir):  # noqa: F811
    execute(archiving.url, "CREATE TABLE entries (id int PRIMARY KEY, phase text)")
    base = cli_json(capsys, "basebackup", "--db", archiving.url, "--repo", archiving.repo_url)
    assert base["database"] == DB and base["timeline"] == 1
    assert base["start_wal_file"] == wal.wal_file_name(1, base["start_lsn"])

    execute(archiving.url, "INSERT INTO entries SELECT i, 't1' FROM generate_series(1, 3) i")
    switch_and_wait_archived(archiving.url)
    execute(archiving.url, "INSERT INTO entries SELECT i, 't2' FROM generate_series(4, 6) i")
    switch_and_wait_archived(archiving.url)
    between = server_now(archiving.url)
    execute(archiving.url, "INSERT INTO entries SELECT i, 't3' FROM generate_series(7, 9) i")
    switch_and_wait_archived(archiving.url)

    datadir = server_dir / "recovered"
    code, out, err = pitr(capsys, archiving, datadir, "--target-time", between.isoformat(), "--json")
    assert code == 0, err
    result = json.loads(out)
    recovered = LocalCluster(datadir, result["port"])
    try:
        assert result["backup_id"] == base["backup_id"]
        assert "recovery stopping before commit" in result["stopped"]
        assert result["timeline"] == 2  # promoted
        assert rows_in(recovered.url(DB), "entries") == [(i, "t1") for i in (1, 2, 3)] + [
            (i, "t2") for i in (4, 5, 6)]
        # Recovered, not a copy of the present: the source has t3.
        assert len(rows_in(archiving.url, "entries")) == 9
        # The recovered server archives nothing into the source's WAL area.
        with psycopg.connect(recovered.url(), autocommit=True) as conn:
            assert conn.execute("SHOW archive_mode").fetchone()[0] == "off"
    finally:
        recovered.stop()


def test_parallel_archiving_under_a_write_load_loses_nothing_and_pitr_recovers_to_the_last_commit(
        capsys, archiving, server_dir):  # noqa: F811
    spool = server_dir / "spool"
    spool.mkdir()
    grant_to_server(spool)
    command = (f"{PGDR} wal-push %p --repo {archiving.repo_url} --db {DB} --jobs 4 --spool {spool}")
    execute(archiving.url, f"ALTER SYSTEM SET archive_command = '{command}'", "SELECT pg_reload_conf()")
    try:
        execute(archiving.url, "CREATE TABLE readings (id int PRIMARY KEY, payload text)")
        base = cli_json(capsys, "basebackup", "--db", archiving.url, "--repo", archiving.repo_url)
        committed = 0
        with psycopg.connect(archiving.url, autocommit=True) as conn:
            for batch in range(24):  # about 5 MB of WAL each, in separate transactions
                conn.execute("INSERT INTO readings SELECT i, repeat(md5(i::text), 32) FROM "
                             "generate_series(%s::int, %s::int) i", (batch * 4000 + 1, (batch + 1) * 4000))
                committed = (batch + 1) * 4000
        last = switch_and_wait_archived(archiving.url)
    finally:
        execute(archiving.url, "ALTER SYSTEM RESET archive_command", "SELECT pg_reload_conf()")
    archived = [f.name for f in walarchive.archived_files(open_repository(archiving.repo_url), DB)]
    assert walarchive.missing_segments(archived, base["start_wal_file"], last) == []
    assert wal.segment_position(last) - wal.segment_position(base["start_wal_file"]) >= 5

    # No target: recover to the end of the archive, the fast way back (restore --physical).
    datadir = server_dir / "recovered"
    code, out, err = run_cli(capsys, "restore", "latest", "--physical", "--datadir", str(datadir),
                             "--repo", archiving.repo_url, "--db", DB, "--json")
    assert code == 0, err
    result = json.loads(out)
    recovered = LocalCluster(datadir, result["port"])
    try:
        assert result["backup_id"] == base["backup_id"] and result["target"] == "the end of the WAL archive"
        with psycopg.connect(recovered.url(DB)) as conn:
            count, top = conn.execute("SELECT count(*), max(id) FROM readings").fetchone()
        assert (count, top) == (committed, committed)
    finally:
        recovered.stop()


def test_a_postgresql_17_server_is_backed_up_and_restored_with_its_own_programs(capsys, server_dir):  # noqa: F811
    with archiving_pg17(server_dir, DB) as (cluster, repo_url):
        url = cluster.url(DB)
        execute(url, "CREATE TABLE trips (id int PRIMARY KEY)",
                "INSERT INTO trips SELECT generate_series(1, 10)")
        backup = cli_json(capsys, "basebackup", "--db", url, "--repo", repo_url)
        assert find_base_backup(open_repository(repo_url), DB,
                                backup["backup_id"]).server_version.startswith("17.")
        execute(url, "INSERT INTO trips SELECT generate_series(11, 25)")
        switch_and_wait_archived(url)
        restored_dir = str(server_dir / "restored")
        code, out, err = run_cli(capsys, "restore", "latest", "--physical", "--datadir", restored_dir,
                                 "--repo", repo_url, "--db", DB, "--json")
        assert code == 0, err
        restored = LocalCluster(server_dir / "restored", json.loads(out)["port"], bin_dir=cluster.bin_dir)
        try:
            with psycopg.connect(restored.url(DB)) as conn:
                assert conn.execute("SHOW server_version").fetchone()[0].startswith("17.")
                assert conn.execute("SELECT count(*), max(id) FROM trips").fetchone() == (25, 25)
        finally:
            restored.stop()


def test_a_pitr_drill_replays_the_wal_and_takes_its_rpo_from_the_last_replayed_transaction(capsys, archiving):
    from flows.drill import drill

    execute(archiving.url, "CREATE TABLE drilled (id int PRIMARY KEY, at timestamptz)")
    base = cli_json(capsys, "basebackup", "--db", archiving.url, "--repo", archiving.repo_url)
    execute(archiving.url, "INSERT INTO drilled SELECT i, clock_timestamp() FROM generate_series(1, 5) i")
    committed = server_now(archiving.url)
    switch_and_wait_archived(archiving.url)
    report = drill(repo=archiving.repo_url, db=DB, pitr=True, rto_target_minutes=60, rpo_target_minutes=60,
                   health_sql=["SELECT count(*) = 5 FROM drilled"])
    assert report["ok"] and report["pitr"] and report["backup_id"] == base["backup_id"]
    ticks = {i["item"]: i["done"] for i in report["checklist"]}
    assert ticks["restored"] and ticks["health_checks_passed"] and ticks["scratch_dropped"]
    assert ticks["row_counts_validated"] is None  # a base backup has no row counts to compare
    replayed = datetime.fromisoformat(report["restored_point"].replace("Z", "+00:00"))
    # The insert commits within a second of the base backup's finish, which the manifest
    # records to the second: the replay time must keep its fraction to be seen as later.
    assert report["rpo_source"] == "replayed-wal"
    # The commit, to the millisecond of the report: just before `committed` was read.
    assert 0 <= (committed - replayed).total_seconds() < 0.5


def test_a_corrupt_archived_segment_stops_recovery_loudly(capsys, archiving, tmp_path, server_dir):  # noqa: F811
    execute(archiving.url, "CREATE TABLE payments (id int PRIMARY KEY, phase text)")
    cli_json(capsys, "basebackup", "--db", archiving.url, "--repo", archiving.repo_url)
    execute(archiving.url, "INSERT INTO payments SELECT i, 'before' FROM generate_series(1, 3) i")
    segment = switch_and_wait_archived(archiving.url)
    execute(archiving.url, "INSERT INTO payments VALUES (4, 'needed')")
    switch_and_wait_archived(archiving.url)
    target = server_now(archiving.url)

    marker = archiving.repo_root / wal.sidecar_key(DB, segment)
    stored = archiving.repo_root / json.loads(marker.read_bytes())["key"]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))

    # restore_command semantics: corrupt is not "absent" (1), it aborts recovery (>125).
    code, _, err = run_cli(capsys, "wal-fetch", segment, str(tmp_path / "x"), "--repo",
                           archiving.repo_url, "--db", DB)
    assert code == wal.FETCH_ABORT_RECOVERY > 125
    assert "is corrupt in the archive" in error_line(err)
    assert not (tmp_path / "x").exists()

    datadir = server_dir / "recovered"
    code, _, err = pitr(capsys, archiving, datadir, "--target-time", target.isoformat(), "--stop")
    line = error_line(err)
    assert code == 1
    assert "failed" in line and f"{segment} is corrupt in the archive" in line, line
    assert not LocalCluster(datadir, 1).is_running()


def test_recovery_past_the_end_of_the_archive_fails_instead_of_promoting_early(capsys, archiving,
                                                                              server_dir):  # noqa: F811
    cli_json(capsys, "basebackup", "--db", archiving.url, "--repo", archiving.repo_url)
    switch_and_wait_archived(archiving.url)
    future = datetime.now(UTC) + timedelta(days=1)
    code, _, err = pitr(capsys, archiving, server_dir / "recovered", "--target-time", future.isoformat())
    assert code == 1
    assert "recovery ended before configured recovery target was reached" in error_line(err)


def test_archive_age_stays_within_archive_timeout_under_steady_writes(capsys, archiving):
    execute(archiving.url, "CREATE TABLE IF NOT EXISTS ticks (id bigserial PRIMARY KEY, at timestamptz)")
    switch_and_wait_archived(archiving.url)  # the archive is current when the load starts
    ages = []
    with psycopg.connect(archiving.url, autocommit=True) as conn:
        for step in range(60):  # about 12 s of one small write every 0.2 s
            conn.execute("INSERT INTO ticks (at) VALUES (now())")
            if step % 5 == 4:
                ages.append(cli_json(capsys, "archive-status", "--repo", archiving.repo_url,
                                     "--db", DB)["age_seconds"])
            time.sleep(0.2)
    # archive_timeout, plus the archiver's wake-up and one wal-push on a busy machine.
    assert ages and max(ages) <= ARCHIVE_TIMEOUT + 6, ages


def test_archive_status_reports_the_newest_segment(capsys, archiving):
    execute(archiving.url, "CREATE TABLE IF NOT EXISTS beats (id int)", "INSERT INTO beats VALUES (1)")
    name = switch_and_wait_archived(archiving.url)
    status = cli_json(capsys, "archive-status", "--repo", archiving.repo_url, "--db", DB)
    assert status["last_segment"] >= name and status["segments"] >= 1 and status["ok"]
    code, out, _ = run_cli(capsys, "archive-status", "--repo", archiving.repo_url, "--db", DB)
    assert code == 0 and status["last_segment"] in out

    # Nothing archived is a failed probe: exit 1, and still the JSON.
    code, out, _ = run_cli(capsys, "archive-status", "--repo", archiving.repo_url, "--db", "nothing",
                           "--json")
    empty = json.loads(out)
    assert code == 1 and empty["last_segment"] is None and empty["age_seconds"] is None


def check(capsys, archiving: Archiving, *extra: str) -> tuple[int, dict, str]:
    code, out, err = run_cli(capsys, "check", "--db", archiving.url, "--repo", archiving.repo_url,
                             "--name", DB, "--json", *extra)
    return code, json.loads(out), err


def test_check_proves_archiving_works_and_fails_on_a_gap_or_a_broken_archive_command(
        capsys, archiving, tmp_path):
    execute(archiving.url, "CREATE TABLE IF NOT EXISTS probes (id int)")
    base = cli_json(capsys, "basebackup", "--db", archiving.url, "--repo", archiving.repo_url)
    execute(archiving.url, "INSERT INTO probes VALUES (1)")
    lost = switch_and_wait_archived(archiving.url)
    execute(archiving.url, "INSERT INTO probes VALUES (2)")
    switch_and_wait_archived(archiving.url)

    code, result, err = check(capsys, archiving)
    assert code == 0, err
    assert result["ok"] and result["base_backup"] == base["backup_id"] and result["gaps"] == []
    assert result["last_segment"] >= result["switched_segment"] > lost
    assert result["archived_within_seconds"] is not None and result["age_seconds"] < 60

    # A segment since the newest base backup vanishes from the repository.
    wal_dir = archiving.repo_root / DB / "wal"
    aside = {path: tmp_path / path.name for path in wal_dir.iterdir() if path.name.startswith(lost)}
    assert len(aside) == 2
    for path, moved in aside.items():
        shutil.move(path, moved)
    try:
        code, result, err = check(capsys, archiving)
        assert code == 1 and result["gaps"] == [lost] and result["missing_segments"] == 1
        assert f"recovery cannot pass {lost}" in error_line(err)
        code, out, _ = run_cli(capsys, "archive-status", "--repo", archiving.repo_url, "--db", DB, "--json")
        status = json.loads(out)
        assert code == 1 and status["gaps"] == [lost] and not status["ok"]
        code, out, _ = run_cli(capsys, "archive-status", "--repo", archiving.repo_url, "--db", DB)
        assert code == 1 and f"GAP: 1 segment(s) missing since {base['start_wal_file']}: {lost}" in out
    finally:
        for path, moved in aside.items():
            shutil.move(moved, path)

    # archive_command breaks: the switched segment never arrives, and check says why.
    execute(archiving.url, "ALTER SYSTEM SET archive_command = 'false'", "SELECT pg_reload_conf()")
    try:
        code, result, err = check(capsys, archiving, "--timeout", "4")
        assert code == 1 and not result["ok"]
        line = error_line(err)
        assert f"{result['switched_segment']} did not reach" in line and "archive_command fails" in line, line
    finally:
        execute(archiving.url, "ALTER SYSTEM RESET archive_command", "SELECT pg_reload_conf()")
    switch_and_wait_archived(archiving.url)  # the archive catches up once it is fixed
    assert check(capsys, archiving)[0] == 0
    # Base backups stopped being taken: the chain since the last one only grows.
    code, result, err = check(capsys, archiving, "--max-base-age-hours", "0.00001")
    assert code == 1 and f"the newest base backup {base['backup_id']} finished" in error_line(err)
    # The daily deployment's flow: the same check, a failed run when it fails.
    assert check_flow(db=archiving.url, repo=archiving.repo_url, name=DB)["ok"]
    with pytest.raises(FailedWithReport, match="no base backup of nothing"):
        check_flow(db=archiving.url, repo=archiving.repo_url, name="nothing", timeout_seconds=1)


# --- wal-push / wal-fetch --------------------------------------------------------------------

SEGMENT = "000000010000000000000042"


@pytest.mark.parametrize(("repo_kind", "encrypted"), [("file", False), ("s3", False), ("s3", True)],
                         ids=["file", "s3", "s3-gpg"])
def test_push_fetch_round_trip_twice_same_is_fine_different_is_refused(
        repo_kind, encrypted, request, capsys, tmp_path, gpg, monkeypatch):
    repo_url = request.getfixturevalue("file_repo" if repo_kind == "file" else "s3_repo")
    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    segment = tmp_path / SEGMENT
    content = bytes(range(256)) * 4096 + b"\0" * (15 * 1024 * 1024)  # 16 MB, like a segment
    segment.write_bytes(content)
    extra = ["--encrypt-to", gpg.fingerprint] if encrypted else []
    push = ["wal-push", str(segment), "--repo", repo_url, "--db", DB, *extra]

    first = cli_json(capsys, *push)
    assert first["stored"] is True and first["wal_bytes"] == len(content)
    assert re.fullmatch(rf"{DB}/wal/{SEGMENT}\.[0-9a-f]{{16}}\.zst" + (r"\.gpg" if encrypted else ""),
                        first["key"])
    assert first["size_bytes"] < len(content) // 4  # compressed
    again = cli_json(capsys, *push)
    assert again["stored"] is False

    code, out, err = run_cli(capsys, "wal-fetch", SEGMENT, str(tmp_path / "RECOVERYXLOG"),
                             "--repo", repo_url, "--db", DB)
    assert (code, out, err) == (0, "", "")
    assert (tmp_path / "RECOVERYXLOG").read_bytes() == content
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    segment.write_bytes(content[:-1] + b"\1")
    code, _, err = run_cli(capsys, *push)
    assert code == 1
    assert "already archived with different content" in error_line(err)
    # The archive still holds the first content.
    run_cli(capsys, "wal-fetch", SEGMENT, str(tmp_path / "again"), "--repo", repo_url, "--db", DB)
    assert (tmp_path / "again").read_bytes() == content


@pytest.mark.parametrize("repo_kind", ["file", "s3"])
def test_concurrent_pushes_of_one_name_archive_exactly_one_content(repo_kind, request, tmp_path):
    """Several archivers push one segment name at once (a second server archiving into the
    same area, a retried push racing the first): one content wins, every push of that
    content succeeds, every push of another fails, and the archive holds the winner only."""
    repo = open_repository(request.getfixturevalue("file_repo" if repo_kind == "file" else "s3_repo"))
    contents = [bytes([1 + i % 2]) * (2 << 20) for i in range(6)]  # two contents, three pushes each
    start = threading.Barrier(len(contents))
    outcomes: dict[int, object] = {}

    def push(index: int) -> None:
        path = tmp_path / f"server{index}" / SEGMENT
        path.parent.mkdir()
        path.write_bytes(contents[index])
        start.wait()
        try:
            outcomes[index] = wal.push(repo, DB, path)
        except IntegrityError as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(contents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == len(contents), outcomes  # every push ended with a result or a refusal
    archived = [i for i, o in outcomes.items() if isinstance(o, wal.PushResult) and o.stored]
    assert len(archived) == 1, outcomes
    winner = contents[archived[0]]
    for index, outcome in outcomes.items():
        if contents[index] == winner:
            assert isinstance(outcome, wal.PushResult), outcome
        else:
            assert isinstance(outcome, IntegrityError), outcome
            assert "already archived with different content" in str(outcome)
    wal.fetch(repo, DB, SEGMENT, tmp_path / "fetched")
    assert (tmp_path / "fetched").read_bytes() == winner
    assert len([info for info in repo.list(wal.wal_prefix(DB)) if ".zst" in info.key]) == 1


def test_a_push_whose_shared_copy_is_removed_by_a_losing_twin_is_refused_for_its_content(s3_repo, tmp_path):
    """Two pushes of one content store the same bytes under the same key; another content's
    marker comes first. The twin that sees it first removes the copy they share while the
    other twin has just written it: the other is refused for its content too, not failed
    for an upload that vanished, and the archive holds the winner's copy only."""
    repo = open_repository(s3_repo)
    paths = {}
    for name, fill in (("x1", 1), ("x2", 1), ("y", 2)):
        paths[name] = tmp_path / name / SEGMENT
        paths[name].parent.mkdir()
        paths[name].write_bytes(bytes([fill]) * (1 << 20))
    x1_at_marker, y_archived, x2_wrote, x1_done = (threading.Event() for _ in range(4))

    def before_put(params, context, **_):
        context["wal_data"] = ".zst" in params["url_path"]
        if threading.current_thread().name == "x1" and SEGMENT + wal.SIDECAR in params["url_path"]:
            x1_at_marker.set()  # x1 has stored its copy: hold its marker until y's is there
            assert y_archived.wait(60)

    def after_put(context, **_):
        if threading.current_thread().name == "x2" and context["wal_data"] and not x2_wrote.is_set():
            x2_wrote.set()  # x2 has written the shared copy: let x1 remove it now
            assert x1_done.wait(60)

    repo.client.meta.events.register("before-call.s3.PutObject", before_put)
    repo.client.meta.events.register("after-call.s3.PutObject", after_put)
    outcomes: dict[str, object] = {}

    def push(name: str) -> None:
        try:
            outcomes[name] = wal.push(repo, DB, paths[name])
        except PgdrError as exc:
            outcomes[name] = exc

    x1 = threading.Thread(target=push, args=("x1",), name="x1")
    x2 = threading.Thread(target=push, args=("x2",), name="x2")
    x1.start()
    assert x1_at_marker.wait(60)
    x2.start()
    assert x2_wrote.wait(60)
    push("y")
    y_archived.set()
    x1.join()
    x1_done.set()
    x2.join()
    assert isinstance(outcomes["y"], wal.PushResult) and outcomes["y"].stored, outcomes
    for twin in ("x1", "x2"):
        assert isinstance(outcomes[twin], IntegrityError), outcomes
        assert "already archived with different content" in str(outcomes[twin])
    wal.fetch(repo, DB, SEGMENT, tmp_path / "fetched")
    assert (tmp_path / "fetched").read_bytes() == paths["y"].read_bytes()
    assert [info.key for info in repo.list(wal.wal_prefix(DB)) if ".zst" in info.key] == [outcomes["y"].key]


def test_pushing_ahead_archives_ready_segments_in_parallel_and_answers_from_the_note(
        capsys, file_repo, tmp_path):
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    names = [f"0000000100000000000000{i:02X}" for i in range(1, 5)]
    for name in names:
        (pg_wal / name).write_bytes(name.encode() * 1000)
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    spool = tmp_path / "spool"
    push = ["--repo", file_repo, "--db", DB, "--jobs", "3", "--spool", str(spool)]

    first = cli_json(capsys, "wal-push", str(pg_wal / names[0]), *push)
    assert first["stored"] is True
    archived = [f.name for f in walarchive.archived_files(open_repository(file_repo), DB)]
    assert archived == names[:3]  # itself and the next two ready ones, not more
    assert sorted(p.name for p in spool.iterdir()) == [f"{n}{wal.SPOOL_SUFFIX}" for n in names[1:3]]

    # PostgreSQL asks for the next one: the note answers, and is used up.
    second = cli_json(capsys, "wal-push", str(pg_wal / names[1]), *push)
    record = json.loads(open_repository(file_repo).get_bytes(wal.sidecar_key(DB, names[1])))
    assert second["stored"] is False and second["key"] == record["key"]
    assert not (spool / f"{names[1]}{wal.SPOOL_SUFFIX}").exists()

    # A note is for exactly that file: a different file of that name is not acknowledged.
    (pg_wal / names[2]).write_bytes(b"something else")
    code, _, err = run_cli(capsys, "wal-push", str(pg_wal / names[2]), *push)
    assert code == 1 and "already archived with different content" in error_line(err)


def test_wal_push_of_a_16_mb_segment_is_light(file_repo, tmp_path):
    """archive_command runs once per segment: it must not load Prefect, boto3 or psycopg,
    and its CPU time (Python, zstd, checksums) must stay well under 0.3 s."""
    segment = tmp_path / SEGMENT
    segment.write_bytes((b"INSERT INTO positions VALUES (42, now(), 'vehicle') " * 330_000)[:16 << 20])
    script = (
        "import sys\nfrom flows.cli import main\n"
        f"assert main(['wal-push', {str(segment)!r}, '--repo', {file_repo!r}, '--db', 'x']) == 0\n"
        "heavy = ('prefect', 'boto3', 'psycopg', 'great_expectations', 'rich')\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 0.3, f"wal-push used {cpu:.2f} s of CPU"


def test_a_parallel_download_reads_ranges_at_once_and_returns_the_same_bytes(s3_repo, monkeypatch):
    monkeypatch.setattr(s3repo, "DOWNLOAD_PART", 5 << 20)
    in_flight = {"now": 0, "most": 0, "ranges": 0}
    lock = threading.Lock()

    def started(params, **_):
        if "Range" in params.get("headers", {}):
            with lock:
                in_flight["now"] += 1
                in_flight["ranges"] += 1
                in_flight["most"] = max(in_flight["most"], in_flight["now"])

    def finished(http_response, **_):
        if http_response.status_code == 206:
            with lock:
                in_flight["now"] -= 1

    def hook(client):
        client.meta.events.register("before-call.s3.GetObject", started)
        client.meta.events.register("after-call.s3.GetObject", finished)

    monkeypatch.setattr(s3repo, "S3_CLIENT_HOOKS", [hook])
    repo = open_repository(s3_repo)
    data = b"".join(i.to_bytes(4, "big") for i in range(6 << 20))  # 24 MB, no two parts alike
    repo.put_stream("base/x", [data])
    assert b"".join(repo.get_stream_parallel("base/x", 4)) == data
    assert in_flight["ranges"] == 5 and in_flight["most"] >= 2, in_flight

    # The object is replaced while it is being read: If-Match fails the read, no mix of both.
    chunks = repo.get_stream_parallel("base/x", 2)
    next(chunks)
    repo.put_stream("base/x", [data[::-1]])
    with pytest.raises(PgdrError):
        b"".join(chunks)


def test_fetching_a_missing_file_exits_1_quietly(capsys, file_repo, tmp_path):
    for name in ("000000010000000000000001", "00000002.history"):
        code, out, err = run_cli(capsys, "wal-fetch", name, str(tmp_path / name), "--repo", file_repo,
                                 "--db", DB)
        assert (code, out, err) == (1, "", "")


def test_history_and_backup_files_round_trip_and_odd_names_are_refused(capsys, file_repo, tmp_path):
    for name in ("00000002.history", "000000010000000000000003.00000028.backup",
                 "000000010000000000000004.partial"):
        source = tmp_path / name
        source.write_bytes(f"contents of {name}\n".encode())
        cli_json(capsys, "wal-push", str(source), "--repo", file_repo, "--db", DB)
        run_cli(capsys, "wal-fetch", name, str(tmp_path / "out"), "--repo", file_repo, "--db", DB)
        assert (tmp_path / "out").read_bytes() == source.read_bytes()
    bad = tmp_path / "../../etc-passwd"
    code, _, err = run_cli(capsys, "wal-fetch", "../../x", str(bad), "--repo", file_repo, "--db", DB)
    assert code == wal.FETCH_ABORT_RECOVERY and "is not a WAL file name" in error_line(err)
    (tmp_path / "notwal").write_bytes(b"x")
    code, _, err = run_cli(capsys, "wal-push", str(tmp_path / "notwal"), "--repo", file_repo, "--db", DB)
    assert code == 1 and "is not a WAL file name" in error_line(err)


def test_wal_commands_never_import_prefect(file_repo, tmp_path):
    (tmp_path / SEGMENT).write_bytes(b"\1" * 1024)
    script = (
        "import sys\nfrom flows.cli import main\n"
        f"codes = [main(['wal-push', {str(tmp_path / SEGMENT)!r}, '--repo', {file_repo!r}, '--db', 'x']),"
        f" main(['wal-fetch', {SEGMENT!r}, {str(tmp_path / 'out')!r}, '--repo', {file_repo!r}, '--db', 'x']),"
        f" main(['archive-status', '--repo', {file_repo!r}, '--db', 'x', '--json'])]\n"
        "assert codes == [0, 0, 0], codes\n"
        "heavy = ('prefect', 'boto3', 'great_expectations')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print('LOADED', loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_a_tampered_checksum_record_cannot_point_elsewhere(capsys, file_repo, tmp_path):
    (tmp_path / SEGMENT).write_bytes(b"\2" * 1024)
    cli_json(capsys, "wal-push", str(tmp_path / SEGMENT), "--repo", file_repo, "--db", DB)
    repo = open_repository(file_repo)
    record = json.loads(repo.get_bytes(wal.sidecar_key(DB, SEGMENT)))
    repo.put_bytes(wal.sidecar_key(DB, SEGMENT), json.dumps({**record, "key": "audit/x.zst"}).encode())
    code, _, err = run_cli(capsys, "wal-fetch", SEGMENT, str(tmp_path / "out"), "--repo", file_repo,
                           "--db", DB)
    assert code == wal.FETCH_ABORT_RECOVERY and "unreadable" in error_line(err)


# --- retention -------------------------------------------------------------------------------


def test_prunable_segments_keep_everything_a_kept_backup_needs():
    archived = [
        "000000010000000000000001", "000000010000000000000002",
        "000000010000000000000002.00000028.backup", "000000010000000000000003",
        "000000010000000000000004", "000000010000000000000005.partial", "00000002.history",
        "000000020000000000000005", "000000020000000000000006", "000000010000000100000000",
    ]
    kept = ["000000010000000000000003", "000000020000000000000006"]
    assert walarchive.prunable_segments(archived, kept) == [
        "000000010000000000000001", "000000010000000000000002", "000000010000000000000002.00000028.backup"]
    # A backup on timeline 2 at segment 5 keeps 5 and later on every timeline.
    assert walarchive.prunable_segments(archived, ["000000020000000000000005"]) == [
        "000000010000000000000001", "000000010000000000000002", "000000010000000000000002.00000028.backup",
        "000000010000000000000003", "000000010000000000000004"]
    assert walarchive.prunable_segments(archived, []) == []
    # Log boundaries: 0/FF... sorts before 1/00...
    assert walarchive.prunable_segments(["0000000100000000000000FF"], ["000000010000000100000000"]) == [
        "0000000100000000000000FF"]
    with pytest.raises(Exception, match="not a WAL file name"):
        walarchive.prunable_segments(["../x"], ["000000010000000000000001"])


def test_wal_file_names_and_base_backup_choice():
    assert wal.wal_file_name(1, "0/3000028") == "000000010000000000000003"
    assert wal.wal_file_name(2, "1/FF000000") == "0000000200000001000000FF"
    assert wal.wal_file_name(1, "0/3000000", 64 * 1024 * 1024) == "000000010000000000000000"

    def base(backup_id: str, finished: str, end_lsn: str) -> BaseManifest:
        return BaseManifest(backup_id, DB, finished, finished, "0/1", end_lsn, 1, "x", 16 << 20, "15",
                            "1", "pgdr", "zstd-3", None, 1, "0" * 64, "base.tar.zst", "here")

    backups = [base("a", "2026-01-01T00:00:00Z", "0/2000000"), base("b", "2026-01-02T00:00:00Z", "0/5000000")]
    assert choose_base_backup(backups).backup_id == "b"
    assert choose_base_backup(backups, target_time=datetime(2026, 1, 1, 12, tzinfo=UTC)).backup_id == "a"
    assert choose_base_backup(backups, target_lsn="0/4000000").backup_id == "a"
    with pytest.raises(Exception, match="no base backup finished before"):
        choose_base_backup(backups, target_time=datetime(2025, 12, 31, tzinfo=UTC))


def test_wal_prune_deletes_only_segments_before_the_oldest_base_backup(capsys, archiving):
    execute(archiving.url, "CREATE TABLE IF NOT EXISTS old_news (id int)")
    for _ in range(2):
        execute(archiving.url, "INSERT INTO old_news VALUES (1)")
        switch_and_wait_archived(archiving.url)
    cli_json(capsys, "basebackup", "--db", archiving.url, "--repo", archiving.repo_url)
    switch_and_wait_archived(archiving.url)  # the backup's own .backup file and end segment
    names = [f.name for f in walarchive.archived_files(open_repository(archiving.repo_url), DB)]
    dry = cli_json(capsys, "wal-prune", "--repo", archiving.repo_url, "--db", DB, "--dry-run")
    oldest_start = min(b.start_wal_file for b in list_base_backups(open_repository(archiving.repo_url), DB))
    # Which ones depends on the module's earlier base backups; the rule does not.
    assert dry["base_backups"] >= 1 and dry["deleted"] == 0
    assert dry["prunable"] == sorted(n for n in names if not n.endswith(".history")
                                     and n[8:24] < oldest_start[8:24])
    # The server keeps archiving meanwhile (archive_timeout): newer segments may appear.
    assert set(names) <= {f.name for f in walarchive.archived_files(open_repository(archiving.repo_url), DB)}
    cli_json(capsys, "wal-prune", "--repo", archiving.repo_url, "--db", DB)
    left = [f.name for f in walarchive.archived_files(open_repository(archiving.repo_url), DB)]
    assert set(names) - set(dry["prunable"]) <= set(left) and not set(left) & set(dry["prunable"])
    assert all(n[8:24] >= oldest_start[8:24] for n in left if not n.endswith(".history"))


def test_wal_prune_removes_data_and_marker_of_old_segments_only(capsys, file_repo, tmp_path):
    names = [f"0000000100000000000000{i:02X}" for i in range(1, 6)] + ["00000002.history"]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
        cli_json(capsys, "wal-push", str(tmp_path / name), "--repo", file_repo, "--db", DB)
    repo = open_repository(file_repo)
    manifest = BaseManifest("20260101T000000Z-hot-abcd", DB, "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z",
                            "0/3000028", "0/3000100", 1, names[2], 16 << 20, "15", "1", "pgdr", "zstd-3",
                            None, 1, "0" * 64, "base.tar.zst", "here")
    repo.put_bytes(manifest.manifest_key, manifest.to_json())
    result = cli_json(capsys, "wal-prune", "--repo", file_repo, "--db", DB)
    assert result["prunable"] == names[:2] and result["deleted"] == 2
    left = sorted(re.sub(r"(\.[0-9a-f]{16})?\.(zst|sha256)$", "", info.key.rsplit("/", 1)[1])
                  for info in repo.list(wal.wal_prefix(DB)))
    assert left == sorted(names[2:] * 2)


def test_a_year_of_nightly_base_backups_prunes_to_the_tiers_and_the_window_still_recovers(
        capsys, archiving, server_dir, tmp_path):  # noqa: F811
    repo = open_repository(archiving.repo_url)
    execute(archiving.url, "CREATE TABLE journal (id int PRIMARY KEY, phase text)")
    real = cli_json(capsys, "basebackup", "--db", archiving.url, "--repo", archiving.repo_url)
    execute(archiving.url, "INSERT INTO journal SELECT i, 'kept' FROM generate_series(1, 5) i")
    switch_and_wait_archived(archiving.url)
    inside = server_now(archiving.url)
    execute(archiving.url, "INSERT INTO journal VALUES (6, 'later')")
    switch_and_wait_archived(archiving.url)

    # The year before it: a base backup every night (tier hot; monthly every 30th night),
    # each starting at its own segment of the past, which is archived.
    template = find_base_backup(repo, DB, real["backup_id"])
    now = datetime.now(UTC)
    past: dict[int, str] = {}
    for day in range(1, 366):
        tier = "monthly" if day % 30 == 0 else "hot"
        finished = now - timedelta(days=day, hours=1)
        lsn = (1000 - day) * (16 << 20)
        segment = wal.wal_file_name(1, f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}")
        backup = dataclasses.replace(
            template, backup_id=f"{finished - timedelta(minutes=5):%Y%m%dT%H%M%SZ}-{tier}-{day:04x}",
            started_at=iso(finished - timedelta(minutes=5)), finished_at=iso(finished),
            start_lsn=f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}", start_wal_file=segment)
        repo.put_bytes(f"{backup.prefix}/{backup.data_key}", b"a year-old base backup")
        repo.put_bytes(backup.manifest_key, backup.to_json())
        (tmp_path / segment).write_bytes(f"WAL of night {day}".encode())
        wal.push(repo, DB, tmp_path / segment)
        past[day] = backup.backup_id
    (tmp_path / "00000009.history").write_bytes(b"9\t0/5000000\tno recovery target specified\n")
    wal.push(repo, DB, tmp_path / "00000009.history")

    result = cli_json(capsys, "prune", "--area", "pitr", "--db", DB, "--repo", archiving.repo_url)
    rows = {row["backup_id"]: row for row in result["backups"]}
    # hot: the last 7 days, and the night before them (recovery to the window's first
    # moment starts there); monthly: the last 365 days.
    kept = {past[day] for day in [*range(1, 8), *range(30, 361, 30)]}
    assert {past[day] for day in past if rows[past[day]]["action"] == "keep"} == kept
    assert {past[day] for day in past if rows[past[day]]["action"] == "deleted"} == set(past.values()) - kept
    assert "recovery to any moment of the last 7 d starts from it" in rows[past[7]]["reason"]
    assert rows[real["backup_id"]]["action"] == "keep"
    remaining = {b.backup_id for b in list_base_backups(repo, DB)}
    assert kept | {real["backup_id"]} <= remaining and not remaining & (set(past.values()) - kept)

    # WAL: everything before the oldest remaining base backup (night 360) is gone, the
    # rest and every history file is still there.
    (wal_row,) = [row for row in result["backups"] if row["backup_id"].startswith("wal ")]
    assert wal_row["action"] == "deleted" and past[360] in wal_row["reason"]
    left = [f.name for f in walarchive.archived_files(repo, DB)]
    assert "00000009.history" in left
    oldest = find_base_backup(repo, DB, past[360]).start_wal_file
    assert min((n for n in left if not n.endswith(".history")), key=wal.segment_position) == oldest
    assert wal.wal_file_name(1, real["start_lsn"]) in left

    datadir = server_dir / "recovered"
    code, out, err = pitr(capsys, archiving, datadir, "--target-time", inside.isoformat(), "--json")
    assert code == 0, err
    recovered = LocalCluster(datadir, json.loads(out)["port"])
    try:
        assert rows_in(recovered.url(DB), "journal") == [(i, "kept") for i in range(1, 6)]
    finally:
        recovered.stop()


def test_base_backup_tar_entries_outside_the_data_directory_are_refused(tmp_path):
    def tar_with(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarFile:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            member = tarfile.TarInfo(name)
            member.type = kind
            member.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tar.addfile(member, io.BytesIO(b""))
        buffer.seek(0)
        return tarfile.open(fileobj=buffer, mode="r:")

    for name, kind in [("../escape", tarfile.REGTYPE), ("/abs", tarfile.REGTYPE),
                       ("global/link", tarfile.SYMTYPE), ("dev", tarfile.CHRTYPE)]:
        with pytest.raises(IntegrityError):
            extract_safely(tar_with(name, kind), tmp_path / "data")
    extract_safely(tar_with("global/pg_control"), tmp_path / "data")
    assert (tmp_path / "data" / "global" / "pg_control").stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "escape").exists()


# --- RDS -------------------------------------------------------------------------------------


def test_rds_point_in_time_restore_creates_a_new_instance(capsys, s3):
    rds = boto3.client("rds")
    rds.create_db_instance(DBInstanceIdentifier="fleet-prod", Engine="postgres",
                           DBInstanceClass="db.t3.micro", AllocatedStorage=20, MasterUsername="fleet",
                           MasterUserPassword="not-a-secret-1",
                           BackupRetentionPeriod=7)
    moment = (datetime.now(UTC) - timedelta(minutes=5)).replace(microsecond=0)
    result = cli_json(capsys, "pitr", "--rds-source", "fleet-prod", "--rds-target", "fleet-pitr",
                      "--target-time", moment.isoformat())
    assert result["target_instance"] == "fleet-pitr" and result["status"] == "available"
    described = rds.describe_db_instances(DBInstanceIdentifier="fleet-pitr")["DBInstances"][0]
    assert described["Engine"] == "postgres"
    assert rds.describe_db_instances(DBInstanceIdentifier="fleet-prod")["DBInstances"]  # source untouched

    code, _, err = run_cli(capsys, "pitr", "--rds-source", "missing-db", "--rds-target", "x")
    assert code == 1 and "RDS point-in-time restore of missing-db failed" in error_line(err)
