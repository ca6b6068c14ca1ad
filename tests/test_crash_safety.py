"""A real `pgdr restore` / `pgdr rollback` signalled in each phase: the target always ends up
accepting connections with either its old or its new content, and what a killed run left is
finished or removed by the next command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import table_fingerprints
from tests.support.fake_pg_dump import hanging_pg_bin

PGDR = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "pgdr")


def databases(pg) -> set[str]:
    with psycopg.connect(pg.admin_url) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def start_pgdr(tmp_path: Path, *argv: str, **env: str) -> tuple[subprocess.Popen, list[str]]:
    """`pgdr argv...` as its own process, reporting to this session's Prefect server; its
    stderr lines are collected as they come."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **env}
    proc = subprocess.Popen([PGDR, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=tmp_path)
    lines: list[str] = []

    def read() -> None:
        for raw in proc.stderr:  # type: ignore[union-attr]
            lines.append(raw.decode(errors="replace").rstrip())

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def wait_for(condition, what: str, proc: subprocess.Popen, lines: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never {what}: {lines[-20:]}")
        time.sleep(0.1)


def accepts_connections(url: str) -> bool:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture
def restored_scene(capsys, pg, new_db, file_repo):
    """A target whose content (old) differs from its backup's (new)."""
    target = new_db("crash")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO orders SELECT i, 'backed up' FROM generate_series(1, 300) i")
        conn.execute("COMMENT ON DATABASE {} IS 'the fleet''s orders'".format(target.rsplit("/", 1)[1]))
    backup = cli_json(capsys, "backup", "--db", target, "--repo", file_repo)
    new = table_fingerprints(target)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO orders SELECT i, 'written later' FROM generate_series(301, 350) i")
    old = table_fingerprints(target)
    before = databases(pg)
    yield target, backup["backup_id"], old, new
    for name in databases(pg) - before:
        pg.drop_database(name)


def comment_of(pg, name: str) -> str | None:
    with psycopg.connect(pg.admin_url) as conn:
        return conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database"
                            " WHERE datname = %s", (name,)).fetchone()[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
@pytest.mark.parametrize("phase", ["validated", "swap-blocked", "swapped"])
def test_a_restore_signalled_in_any_phase_leaves_the_target_whole(phase, sig, capsys, pg, restored_scene,
                                                                  file_repo, tmp_path):
    target, backup_id, old, new = restored_scene
    name = target.rsplit("/", 1)[1]
    proc, lines = start_pgdr(tmp_path, "restore", backup_id, "--target", target, "--repo", file_repo,
                             "--no-pre-restore-backup", PGDR_DEBUG_PAUSE_AT=phase)
    wait_for(lambda: f"pgdr: paused at {phase}" in lines, f"paused at {phase}", proc, lines)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    time.sleep(0.2)  # the stderr reader catches up
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "pgdr: terminated" in lines
        assert not any("Traceback" in line for line in lines)
        # SIGTERM: pgdr itself finished (or never began) the swap before exiting.
        assert accepts_connections(target)
        assert table_fingerprints(target) == (old if phase == "validated" else new)
    else:
        assert proc.returncode == -signal.SIGKILL
        repaired = cli_json(capsys, "repair", "--target", target)
        assert accepts_connections(target)
        assert table_fingerprints(target) in (old, new)
        if phase == "swap-blocked":  # killed with the target refusing connections
            assert any("finished the interrupted swap" in line for line in repaired["repaired"])
            assert table_fingerprints(target) == new
    assert comment_of(pg, name) == "the fleet's orders"
    assert not [d for d in databases(pg) if "_restoring_" in d]  # nothing half-done is left
    assert cli_json(capsys, "repair", "--target", target)["repaired"] == []  # a second repair: nothing

    if table_fingerprints(target) == new:  # rollback brings the old content back, once
        undone = cli_json(capsys, "rollback", "--target", target, "--repo", file_repo)
        assert table_fingerprints(target) == old and accepts_connections(target)
        assert comment_of(pg, name) == "the fleet's orders"
        assert accepts_connections(pg.url(undone["set_aside_as"]))
    code, _out, err = run_cli(capsys, "rollback", "--target", target, "--repo", file_repo)
    assert code == 1 and "no pre-restore copy" in error_line(err)
    assert table_fingerprints(target) == old


def test_a_rollback_killed_while_the_target_refuses_connections_is_finished_by_the_next_command(
        capsys, pg, restored_scene, file_repo, tmp_path):
    target, backup_id, old, _new = restored_scene
    cli_json(capsys, "restore", backup_id, "--target", target, "--repo", file_repo, "--no-pre-restore-backup")
    proc, lines = start_pgdr(tmp_path, "rollback", "--target", target, PGDR_DEBUG_PAUSE_AT="swap-blocked")
    wait_for(lambda: "pgdr: paused at swap-blocked" in lines, "paused at swap-blocked", proc, lines)
    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        psycopg.connect(target, connect_timeout=5)
    proc.kill()
    proc.wait(timeout=60)
    # The next command on that target (here a second rollback) repairs first: the killed
    # rollback is finished, and there is nothing left to roll back.
    code, _out, err = run_cli(capsys, "rollback", "--target", target, "--repo", file_repo)
    assert code == 1 and "already rolled back" in error_line(err)
    assert table_fingerprints(target) == old and accepts_connections(target)


@pytest.mark.parametrize("exists", [True, False], ids=["existing-target", "new-name"])
def test_pgdr_killed_during_pg_restore_takes_pg_restore_with_it_and_the_next_run_or_prune_cleans_up(
        exists, capsys, pg, restored_scene, file_repo, tmp_path, monkeypatch):
    target, backup_id, _old, new = restored_scene
    name = target.rsplit("/", 1)[1]
    target = pg.secret_url(name)  # with a password: pg_restore gets a passfile
    if not exists:
        pg.drop_database(name)
    pid_file = tmp_path / "pg_restore.pid"
    bin_dir = hanging_pg_bin(tmp_path / "bin", "pg_restore", pid_file)
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    tmp.mkdir()
    proc, lines = start_pgdr(tmp_path, "restore", backup_id, "--target", target, "--repo", file_repo,
                             "--no-pre-restore-backup", PGDR_PG_BIN=str(bin_dir), PGDR_WORK_DIR=str(work),
                             TMPDIR=str(tmp))
    wait_for(pid_file.exists, "started pg_restore", proc, lines)
    time.sleep(0.2)
    child = int(pid_file.read_text())
    assert list(work.rglob("*.dump")), "the staged dump should be on disk while pg_restore runs"
    assert list(tmp.glob("pgdr-pass-*/pgpass")), "pg_restore should have its passfile"
    proc.kill()
    proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "pg_restore outlived pgdr"
    half_loaded = [d for d in databases(pg) if "_restoring_" in d]
    assert half_loaded and (name in databases(pg)) == exists

    monkeypatch.setenv("PGDR_WORK_DIR", str(work))
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    if exists:
        # The next run on that target (here: a whole restore) removes what the killed one left.
        result = cli_json(capsys, "restore", backup_id, "--target", target, "--repo", file_repo,
                          "--no-pre-restore-backup")
        assert any(half_loaded[0] in line for line in result["repaired"])
        assert table_fingerprints(target) == new
    else:
        # So does prune, with a line for each thing it removed.
        monkeypatch.setenv("DATABASE_URL", pg.url())
        swept = cli_json(capsys, "prune", "--repo", file_repo)["leftovers"]
        assert any(half_loaded[0] in line for line in swept)
        assert any("pgdr-pass-" in line for line in swept) and any(str(work) in line for line in swept)
        assert name not in databases(pg)
    assert not [d for d in databases(pg) if "_restoring_" in d]
    assert not list(work.rglob("*.dump")), "a plaintext dump of the killed run is still on disk"
    assert not list(tmp.glob("pgdr-pass-*")), "the killed run's passfile is still on disk"


@pytest.mark.parametrize("repo_kind", ["file", "s3"])
def test_one_restore_of_a_target_at_a_time(repo_kind, request, capsys, pg, restored_scene, tmp_path):
    repo_url = request.getfixturevalue(f"{repo_kind}_repo")
    target, _backup_id, old, _new = restored_scene
    backup_id = cli_json(capsys, "backup", "--db", target, "--repo", repo_url)["backup_id"]
    proc, lines = start_pgdr(tmp_path, "restore", backup_id, "--target", target, "--repo", repo_url,
                             "--no-pre-restore-backup", PGDR_DEBUG_PAUSE_AT="validated")
    wait_for(lambda: "pgdr: paused at validated" in lines, "paused at validated", proc, lines)
    for command in (["restore", backup_id], ["rollback"]):
        code, _out, err = run_cli(capsys, *command, "--target", target, "--repo", repo_url)
        line = error_line(err)
        assert code == 1 and "a restore of" in line and "is running since" in line and str(proc.pid) in line
    proc.terminate()
    assert proc.wait(timeout=120) == 143
    assert table_fingerprints(target) == old and accepts_connections(target)


def test_the_report_says_how_many_rows_were_written_after_the_pre_restore_backup(capsys, pg, restored_scene,
                                                                                 file_repo):
    from pgdr.catalog.scan import list_backups
    from pgdr.storage.repository import open_repository

    target, backup_id, _old, _new = restored_scene
    stop, inserted = threading.Event(), []

    def writer() -> None:
        with psycopg.connect(target, autocommit=True) as conn:
            while not stop.is_set():
                # Counted before it is sent: an insert cut off by the swap may still have committed.
                inserted.append(1)
                try:
                    conn.execute("INSERT INTO orders VALUES (%s, 'during the restore')",
                                 (1000 + len(inserted),))
                except psycopg.Error:
                    return  # terminated by the swap
                time.sleep(0.005)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = cli_json(capsys, "restore", backup_id, "--target", target, "--repo", file_repo)
    finally:
        stop.set()
        thread.join()
    kept = result["previous_database"]
    written = result["written_after_pre_restore_backup"]
    (pre_restore,) = [m for m in list_backups(open_repository(file_repo)) if m.tier == "pre-restore"]
    with psycopg.connect(pg.url(kept)) as conn:
        in_kept = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    missed = in_kept - pre_restore.row_counts["public.orders"]  # rows neither backed up nor restored
    assert missed > 0 and written["only_in"] == kept
    # Statistics arrive lazily (within a second): rows written just before the pre-restore
    # backup began may still be counted after it, so the count may exceed the rows missed; it
    # never misses a row, and counts only the users' tables (never autovacuum's pg_statistic).
    assert missed <= written["rows"] <= len(inserted)


def test_rows_written_counts_the_users_tables_not_the_statistics_analyze_writes(pg, new_db):
    from pgdr.restore.restore import rows_written

    target = new_db("written")
    name = target.rsplit("/", 1)[1]
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE wide (a int, b text, c date, d numeric, e bool, f int[])")
    before = rows_written(pg.url(), name)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO wide SELECT i, 'x', now(), i, true, ARRAY[i] FROM generate_series(1, 5) i")
        conn.execute("ANALYZE wide")  # what autovacuum does: a pg_statistic row per column
    # The inserting session flushed its statistics when it ended; a new snapshot sees them.
    deadline = time.monotonic() + 10
    while (after := rows_written(pg.url(), name)) != before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after == before + 5


# --- --stop-writes-first: downtime rather than divergence -----------------------------------

WRITER = "pgdr_sw_writer"


@pytest.fixture
def writer_role(pg):
    """An ordinary login role (CONNECTION LIMIT 0 refuses every role but the superusers)."""
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {WRITER}")
        conn.execute(f"CREATE ROLE {WRITER} LOGIN")
    yield WRITER
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f"DROP ROLE {WRITER}")


def stoppable_scene(pg, target: str) -> str:
    """The target with a connection limit of its own and its table writable by PUBLIC (no
    grant that ties the writer role to a database); the writer's URL."""
    name = target.rsplit("/", 1)[1]
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} CONNECTION LIMIT 50")
        conn.execute("GRANT SELECT, INSERT ON orders TO PUBLIC")
    return pg.cluster.url(name, user=WRITER)


def limit_and_comment(pg, name: str) -> tuple[int, str | None]:
    with psycopg.connect(pg.admin_url) as conn:
        return conn.execute("SELECT datconnlimit, shobj_description(oid, 'pg_database') FROM pg_database"
                            " WHERE datname = %s", (name,)).fetchone()


def test_stop_writes_first_refuses_writers_before_the_pre_restore_backup(capsys, pg, writer_role,
                                                                          restored_scene, file_repo):
    from pgdr.catalog.scan import list_backups
    from pgdr.storage.repository import open_repository

    target, backup_id, _old, new = restored_scene
    writer_url = stoppable_scene(pg, target)
    stop, inserted, refused = threading.Event(), [], []

    def writer() -> None:  # reconnects whenever it is cut off, as an application would
        while not stop.is_set():
            try:
                with psycopg.connect(writer_url, autocommit=True, connect_timeout=5) as conn:
                    while not stop.is_set():
                        conn.execute("INSERT INTO orders VALUES (%s, 'during the restore')",
                                     (1000 + len(inserted),))
                        inserted.append(1)
                        time.sleep(0.005)
            except psycopg.Error as exc:  # refused; once swapped, the restored table is not PUBLIC's
                refused.append(str(exc))
                time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(inserted) < 20:  # the application is writing when the restore begins
            time.sleep(0.01)
        result = cli_json(capsys, "restore", backup_id, "--target", target, "--repo", file_repo,
                          "--stop-writes-first")
    finally:
        stop.set()
        thread.join()
    kept = result["previous_database"]
    written = result["written_after_pre_restore_backup"]
    assert written["only_in"] == kept and written["stopped_writes_first"] is True
    # The count comes from statistics, which reach pg_stat_database lazily: the writer's last
    # rows before the stop may be counted. What landed is checked by content below.
    assert written["rows"] <= 5
    assert any("too many connections" in line for line in refused)
    (pre_restore,) = [m for m in list_backups(open_repository(file_repo)) if m.tier == "pre-restore"]
    with psycopg.connect(pg.url(kept)) as conn:
        in_kept = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    assert in_kept == pre_restore.row_counts["public.orders"]  # nothing landed after its snapshot
    # The old database keeps its own limit and comment, and so does its pre-restore backup.
    limit, tag = limit_and_comment(pg, kept)
    assert limit == 50 and json.loads(tag)["comment"] == "the fleet's orders"
    assert pre_restore.database_properties["connection_limit"] == 50
    assert pre_restore.database_properties["comment"] == "the fleet's orders"
    assert table_fingerprints(target) == new and accepts_connections(writer_url)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_restore_stopped_after_stopping_writes_leaves_the_target_open_as_before(
        sig, capsys, pg, writer_role, restored_scene, file_repo, tmp_path):
    target, backup_id, old, _new = restored_scene
    name = target.rsplit("/", 1)[1]
    writer_url = stoppable_scene(pg, target)
    proc, lines = start_pgdr(tmp_path, "restore", backup_id, "--target", target, "--repo", file_repo,
                             "--stop-writes-first", PGDR_DEBUG_PAUSE_AT="writes-stopped")
    wait_for(lambda: "pgdr: paused at writes-stopped" in lines, "paused at writes-stopped", proc, lines)
    with pytest.raises(psycopg.OperationalError, match="too many connections"):
        psycopg.connect(writer_url, connect_timeout=5)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
    else:
        assert proc.returncode == -signal.SIGKILL
        with pytest.raises(psycopg.OperationalError, match="too many connections"):
            psycopg.connect(writer_url, connect_timeout=5)
        repaired = cli_json(capsys, "repair", "--target", target)["repaired"]
        assert any("accepts connections again" in line for line in repaired)
    assert accepts_connections(writer_url)
    assert limit_and_comment(pg, name) == (50, "the fleet's orders")  # exactly as before
    assert table_fingerprints(target) == old
    assert cli_json(capsys, "repair", "--target", target)["repaired"] == []


def test_a_failed_restore_with_stop_writes_first_leaves_the_target_open_as_before(capsys, pg, writer_role,
                                                                                 restored_scene, file_repo):
    from pgdr.catalog.scan import find_backup
    from pgdr.storage.repository import open_repository
    from tests.test_restore import corrupt

    target, backup_id, old, _new = restored_scene
    name = target.rsplit("/", 1)[1]
    writer_url = stoppable_scene(pg, target)
    # Run as an ordinary role, it stops before changing anything: pg_dump could not connect.
    code, _out, err = run_cli(capsys, "restore", backup_id, "--target", writer_url, "--repo", file_repo,
                              "--stop-writes-first")
    assert code == 1 and "needs a superuser" in error_line(err)
    assert limit_and_comment(pg, name) == (50, "the fleet's orders")
    # A dump that fails its checksum, found after writes were stopped and the pre-restore backup taken.
    corrupt(file_repo, find_backup(open_repository(file_repo), backup_id), "flip")
    code, _out, err = run_cli(capsys, "restore", backup_id, "--target", target, "--repo", file_repo,
                              "--stop-writes-first")
    assert code == 1 and "corrupt" in error_line(err)
    assert accepts_connections(writer_url)
    assert limit_and_comment(pg, name) == (50, "the fleet's orders")  # exactly as before
    assert table_fingerprints(target) == old
