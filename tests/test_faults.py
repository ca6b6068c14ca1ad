"""A backup tool is judged on its worst day: faults injected into real components.

S3 faults go through botocore event hooks on the clients pgdr creates; process faults are
real signals to real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from pgdr.catalog import catalog
from pgdr.catalog.scan import find_backup, list_backups
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import table_fingerprints
from tests.support.fake_pg_dump import broken_pg_bin
from tests.support.s3faults import S3Faults, fake_response, install_s3_faults, reset, s3_error_body
from tests.test_backup import assert_nothing_left, big_db  # noqa: F401 - shared fixture

REPO_ROOT = Path(__file__).resolve().parents[1]


SLOW_DOWN = s3_error_body("SlowDown", "Please reduce your request rate.")
INTERNAL_IN_200 = s3_error_body("InternalError", "We encountered an internal error.")


@pytest.fixture
def s3_faults(monkeypatch) -> S3Faults:
    """Faults planted in every S3 client pgdr creates; counts the requests sent."""
    return install_s3_faults(monkeypatch)


def assert_backup_restores(capsys, repo_url, backup, pg, new_db):
    target = new_db("check")
    pg.drop_database(target.rsplit("/", 1)[1])
    restored = cli_json(capsys, "restore", backup["backup_id"], "--target", target, "--repo", repo_url)
    assert restored["verified"] and restored["row_counts"] == backup["row_counts"]


def test_slowdowns_and_resets_are_retried_and_the_backup_lands_intact(capsys, big_db, s3_repo, s3_faults,  # noqa: F811
                                                                      pg, new_db):
    s3_faults.plant("UploadPart", lambda: fake_response(503, SLOW_DOWN), times=2)
    s3_faults.plant("UploadPart", reset, times=2)
    s3_faults.plant("PutObject", reset, times=1)
    backup = cli_json(capsys, "backup", "--db", big_db, "--repo", s3_repo)
    assert s3_faults.count("UploadPart") >= 3 + 4  # several parts, four of them retried
    repo = open_repository(s3_repo)
    manifest = find_backup(repo, backup["backup_id"])
    repo.verify(f"{manifest.prefix}/{manifest.data_key}", manifest.size_bytes, manifest.sha256)
    assert_backup_restores(capsys, s3_repo, backup, pg, new_db)


def test_a_permanent_s3_failure_fails_clearly_and_leaves_nothing(capsys, big_db, s3_repo, s3_faults,  # noqa: F811
                                                                 monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # fail in seconds, not minutes of backoff
    s3_faults.plant("UploadPart", lambda: fake_response(503, SLOW_DOWN))
    code, _out, err = run_cli(capsys, "backup", "--db", big_db, "--repo", s3_repo)
    assert code == 1 and "SlowDown" in error_line(err)
    assert_nothing_left(s3_repo)


def test_complete_multipart_upload_with_an_error_body_is_a_failure(capsys, big_db, s3_repo, s3_faults):  # noqa: F811
    s3_faults.plant("CompleteMultipartUpload", lambda: fake_response(200, INTERNAL_IN_200))
    code, _out, err = run_cli(capsys, "backup", "--db", big_db, "--repo", s3_repo)
    assert code == 1 and "InternalError" in error_line(err)
    assert_nothing_left(s3_repo)


def test_one_bad_complete_multipart_upload_is_retried(capsys, big_db, s3_repo, s3_faults, pg, new_db):  # noqa: F811
    s3_faults.plant("CompleteMultipartUpload", lambda: fake_response(200, INTERNAL_IN_200), times=1)
    backup = cli_json(capsys, "backup", "--db", big_db, "--repo", s3_repo)
    assert s3_faults.count("CompleteMultipartUpload") == 2
    assert_backup_restores(capsys, s3_repo, backup, pg, new_db)


def pgdr_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a `pgdr` subprocess, reporting to this session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **extra}
    return env


def pgdr_processes_below(pid: int) -> list[int]:
    """Descendants of pid that are still alive (by parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def commands_running(needle: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline:
                found.append(cmdline)
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["cancelled", "killed"])
def test_a_backup_cancelled_or_killed_midway_leaves_nothing_and_the_next_succeeds(
        sig, capsys, big_db, s3_repo, tmp_path, s3):  # noqa: F811
    bin_dir = broken_pg_bin(tmp_path / "bin", limit=20 * 2**20, then="hang")
    proc = subprocess.Popen(
        [str(REPO_ROOT / ".venv" / "bin" / "pgdr"), "backup", "--db", big_db, "--repo", s3_repo],
        # One zstd thread: its output follows its input closely, so parts reach S3 early.
        env=pgdr_env(tmp_path, PGDR_PG_BIN=str(bin_dir), PGDR_ZSTD_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    repo = open_repository(s3_repo)
    deadline = time.monotonic() + 300
    while not repo.incomplete_uploads("") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not repo.incomplete_uploads(""):
        for pid in [proc.pid, *pgdr_processes_below(proc.pid)]:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the backup never started uploading: {proc.communicate()[1].decode()[-2000:]}")
    descendants = pgdr_processes_below(proc.pid)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and b"pgdr: terminated" in err and b"Traceback" not in err
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and commands_running("pg_dump") for pid in descendants) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in descendants if Path(f"/proc/{pid}").exists()
                 and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
    if sig == signal.SIGKILL:
        # A SIGKILLed pgdr cannot stop its children; a real pg_dump dies of SIGPIPE at its
        # next write, this hung stand-in has to be stopped here.
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        survivors = []
    assert not survivors, "children outlived pgdr: " + "; ".join(
        Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in survivors)
    assert list_backups(repo) == []
    if sig == signal.SIGTERM:
        assert repo.incomplete_uploads("") == []  # aborted on the way out
    else:
        # SIGKILL gives no chance to clean up: the upload is left for prune to abort, and it
        # never counts as a backup.
        assert all(u.key.endswith("dump.pgdr") for u in repo.incomplete_uploads(""))
    backup = cli_json(capsys, "backup", "--db", big_db, "--repo", s3_repo)
    assert [m.backup_id for m in list_backups(repo)] == [backup["backup_id"]]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("estimate", ["honest", "too small"])
def test_disk_full_while_staging_a_restore_fails_cleanly(estimate, capsys, big_db, file_repo, new_db,  # noqa: F811
                                                         tiny_tmpfs, monkeypatch, pg):
    backup = cli_json(capsys, "backup", "--db", big_db, "--repo", file_repo)
    if estimate == "too small":  # the free-space check passes; the disk fills up mid-way
        repo = open_repository(file_repo)
        manifest = find_backup(repo, backup["backup_id"])
        manifest.dump_bytes = 1024
        repo.put_bytes(manifest.manifest_key, manifest.to_json())
    target = new_db("untouched")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS x")
    before = table_fingerprints(target)
    monkeypatch.setenv("PGDR_WORK_DIR", str(tiny_tmpfs))
    code, _out, err = run_cli(capsys, "restore", backup["backup_id"], "--target", target, "--repo", file_repo,
                              "--no-pre-restore-backup")
    line = error_line(err)
    assert code == 1
    assert ("not enough space" in line) if estimate == "honest" else ("No space left" in line)
    assert [p for p in tiny_tmpfs.rglob("*") if p.is_file()] == []
    assert table_fingerprints(target) == before


def test_database_names_cannot_inject_sql(capsys, pg, file_repo, fleet_db):
    evil = 'evil"; DROP DATABASE fleet; --'
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(evil)))
    try:
        url = pg.cluster.url(evil)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT 1 AS x")
        backup = cli_json(capsys, "backup", "--db", url, "--repo", file_repo)
        assert backup["database"] == evil
        temp = cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg.url())
        assert temp["verified"] and temp["row_counts"] == {"public.t": 1}
        restored = cli_json(capsys, "restore", "latest", "--target", url, "--repo", file_repo)
        assert restored["verified"]
        pg.drop_database(restored["previous_database"])
    finally:
        pg.drop_database(evil)
    with psycopg.connect(pg.admin_url) as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
    assert "fleet" in names  # the name's "DROP DATABASE fleet" never ran
    assert not [n for n in names if n.startswith("evil")]  # temporary and kept copies are gone


@pytest.mark.parametrize("selector", ["../../etc/passwd", "20260128T020000Z-daily-3f2a/../../x",
                                      "/absolute", "20260128T020000Z-daily-3f2a%2f..%2f"])
def test_backup_ids_cannot_escape_the_repository(capsys, selector, file_repo):
    code, _out, err = run_cli(capsys, "restore", selector, "--target", "postgresql://x@127.0.0.1:1/x",
                              "--repo", file_repo)
    assert code == 1 and "not a backup id" in error_line(err)


@pytest.mark.parametrize("argv, message", [
    (["backup", "--db", "postgresql://postgres@127.0.0.1:1/fleet"], "cannot connect"),
    (["backup", "--db", "not a url at all ::"], "not a valid PostgreSQL connection string"),
    (["backup", "--repo", "s3://no-such-bucket-pgdr/x"], "bucket no-such-bucket-pgdr does not exist"),
    (["list", "--repo", "s3://no-such-bucket-pgdr/x"], "does not exist"),
    (["restore", "latest", "--target", "postgresql://postgres@127.0.0.1:1/x"], "no backups"),
])
def test_bad_configuration_is_one_clear_line(capsys, argv, message, fleet_db, file_repo, s3):
    args = list(argv)
    if "--db" not in args and args[0] == "backup":
        args += ["--db", fleet_db]
    if "--repo" not in args:
        args += ["--repo", file_repo]
    code, out, err = run_cli(capsys, *args)
    assert code == 1 and message in error_line(err)
    assert out == ""


def test_no_aws_secret_or_passphrase_reaches_argv_logs_artifacts_or_output(
        capsys, caplog, big_db, s3_repo, gpg, secrets, monkeypatch, pg, new_db):  # noqa: F811
    import json
    import threading

    from prefect.client.orchestration import get_client

    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    monkeypatch.setenv("PGDR_GPG_PASSPHRASE", gpg.passphrase)
    seen: list[str] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.extend(commands_running(""))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    outputs = []
    try:
        code, out, err = run_cli(capsys, "backup", "--db", big_db, "--repo", s3_repo, "--encrypt-to",
                                 gpg.protected_fingerprint, "--json")
        outputs += [out, err]
        backup = json.loads(out)
        target = new_db("secretcheck")
        pg.drop_database(target.rsplit("/", 1)[1])
        code, out, err = run_cli(capsys, "restore", backup["backup_id"], "--target", target, "--repo",
                                 s3_repo, "--json")
        outputs += [out, err]
        assert code == 0, err
        monkeypatch.setenv("PGDR_GPG_PASSPHRASE", "wrong-" + gpg.passphrase)
        code, out, err = run_cli(capsys, "restore", backup["backup_id"], "--target", target, "--repo",
                                 s3_repo, "--json")
        outputs += [out, err]
        assert code == 1
    finally:
        stop.set()
        watcher.join()
    assert any("gpg" in c for c in seen), "the watcher never saw gpg"
    repo = open_repository(s3_repo)
    stored = "\n".join(repo.get_bytes(o.key).decode() for o in repo.list("") if o.key.endswith(".json"))
    with get_client(sync_client=True) as client:
        artifacts = json.dumps([a.model_dump(mode="json") for a in client.read_artifacts()])
        runs = json.dumps([r.model_dump(mode="json") for r in client.read_flow_runs()])
        logs = json.dumps([log.model_dump(mode="json") for log in client.read_logs()])
    for secret in secrets:
        for place, text in [("argv", "\n".join(seen)), ("output", "\n".join(outputs)),
                            ("local logs", caplog.text), ("repository json", stored),
                            ("artifacts", artifacts), ("flow runs", runs), ("server logs", logs)]:
            assert secret not in text, f"a secret reached {place}"


def test_two_backups_of_one_database_started_together_both_land_one_after_the_other(big_db, file_repo,  # noqa: F811
                                                                                    tmp_path):
    pgdr = str(REPO_ROOT / ".venv" / "bin" / "pgdr")
    slow = broken_pg_bin(tmp_path / "bin", limit=2**20, then="pause")  # each dump takes > 3 s
    procs = [subprocess.Popen([pgdr, "backup", "--db", big_db, "--repo", file_repo, "--json"],
                              env=pgdr_env(tmp_path, PGDR_PG_BIN=str(slow)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              cwd=tmp_path) for _ in range(2)]
    results = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err.decode()[-500:] for _out, err in results]
    repo = open_repository(file_repo)
    first, second = sorted(list_backups(repo), key=lambda m: (m.started_at, m.finished_at))
    assert first.backup_id != second.backup_id
    # The repository lock serialised them: the second dump began once the first was stored.
    assert catalog.parse_iso(second.started_at) >= catalog.parse_iso(first.finished_at)
    for manifest in (first, second):
        repo.verify(f"{manifest.prefix}/{manifest.data_key}", manifest.size_bytes, manifest.sha256)
