"""Point-in-time recovery on a real archiving PostgreSQL: wal-push as archive_command,
base backups, recovery to a moment, corrupt archives, retention, RDS (moto)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import psycopg
import pytest

from tasks import wal
from tasks.basebackup import BaseManifest, choose_base_backup, extract_safely, list_base_backups
from tasks.cluster import LocalCluster, grant_to_server
from tasks.errors import IntegrityError
from tasks.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli

PGDR = str(Path(sys.executable).with_name("pgdr"))
DB = "ledger"
ARCHIVE_TIMEOUT = 2


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
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DB}")
        yield Archiving(cluster, repo_url, repo_root)


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """A directory for a recovered server. Not under tmp_path: other pytest sessions on
    this machine reset /tmp/pytest-of-root to 0700, locking the postgres user out."""
    path = Path(tempfile.mkdtemp(prefix="pgdr-pitr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def execute(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def switch_and_wait_archived(url: str) -> str:
    """Close the current segment and wait until the archiver stored it; its name."""
    with psycopg.connect(url, autocommit=True) as conn:
        name = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        for _ in range(240):
            last, failed = conn.execute(
                "SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver").fetchone()
            if last and last[:24] >= name:
                return name
            time.sleep(0.25)
    raise AssertionError(f"{name} was not archived (last failure: {failed})")


def server_now(url: str) -> datetime:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def rows_in(url: str, table: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT id, phase FROM {table} ORDER BY id").fetchall()


def pitr(capsys, archiving: Archiving, datadir: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "pitr", "--datadir", str(datadir), "--repo", archiving.repo_url, "--db", DB,
                   "--timeout", "300", *extra)


def test_recovery_to_a_time_between_t2_and_t3_yields_exactly_the_rows_up_to_t2(capsys, archiving, server_dir):
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
    assert report["rpo_source"] == "replayed-wal"
    replayed = datetime.fromisoformat(report["restored_point"].replace("Z", "+00:00"))
    assert abs((replayed - committed).total_seconds()) < 1
    ticks = {i["item"]: i["done"] for i in report["checklist"]}
    assert ticks["restored"] and ticks["health_checks_passed"] and ticks["scratch_dropped"]
    assert ticks["row_counts_validated"] is None  # a base backup has no row counts to compare


def test_a_corrupt_archived_segment_stops_recovery_loudly(capsys, archiving, tmp_path, server_dir):
    execute(archiving.url, "CREATE TABLE payments (id int PRIMARY KEY, phase text)")
    cli_json(capsys, "basebackup", "--db", archiving.url, "--repo", archiving.repo_url)
    execute(archiving.url, "INSERT INTO payments SELECT i, 'before' FROM generate_series(1, 3) i")
    segment = switch_and_wait_archived(archiving.url)
    execute(archiving.url, "INSERT INTO payments VALUES (4, 'needed')")
    switch_and_wait_archived(archiving.url)
    target = server_now(archiving.url)

    stored = archiving.repo_root / DB / "wal" / f"{segment}.zst"
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
                                                                              server_dir):
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
    assert first["key"] == f"{DB}/wal/{SEGMENT}.zst" + (".gpg" if encrypted else "")
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
    assert wal.prunable_segments(archived, ["000000010000000000000003", "000000020000000000000006"]) == [
        "000000010000000000000001", "000000010000000000000002", "000000010000000000000002.00000028.backup"]
    # A backup on timeline 2 at segment 5 keeps 5 and later on every timeline.
    assert wal.prunable_segments(archived, ["000000020000000000000005"]) == [
        "000000010000000000000001", "000000010000000000000002", "000000010000000000000002.00000028.backup",
        "000000010000000000000003", "000000010000000000000004"]
    assert wal.prunable_segments(archived, []) == []
    # Log boundaries: 0/FF... sorts before 1/00...
    assert wal.prunable_segments(["0000000100000000000000FF"], ["000000010000000100000000"]) == [
        "0000000100000000000000FF"]
    with pytest.raises(Exception, match="not a WAL file name"):
        wal.prunable_segments(["../x"], ["000000010000000000000001"])


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
    names = [f.name for f in wal.archived_files(open_repository(archiving.repo_url), DB)]
    dry = cli_json(capsys, "wal-prune", "--repo", archiving.repo_url, "--db", DB, "--dry-run")
    oldest_start = min(b.start_wal_file for b in list_base_backups(open_repository(archiving.repo_url), DB))
    # Which ones depends on the module's earlier base backups; the rule does not.
    assert dry["base_backups"] >= 1 and dry["deleted"] == 0
    assert dry["prunable"] == sorted(n for n in names if not n.endswith(".history")
                                     and n[8:24] < oldest_start[8:24])
    assert [f.name for f in wal.archived_files(open_repository(archiving.repo_url), DB)] == names
    cli_json(capsys, "wal-prune", "--repo", archiving.repo_url, "--db", DB)
    left = [f.name for f in wal.archived_files(open_repository(archiving.repo_url), DB)]
    assert set(left) == set(names) - set(dry["prunable"])
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
    left = sorted(info.key.rsplit("/", 1)[1] for info in repo.list(wal.wal_prefix(DB)))
    assert left == sorted([f"{n}.zst" for n in names[2:]] + [f"{n}.sha256" for n in names[2:]])


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
