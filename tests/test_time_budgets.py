"""Time budgets: a stream that stops moving fails fast and says which side stalled.

A real pg_dump that hangs part-way, and a real TCP endpoint that accepts S3 connections and
never answers, with the stall budget (PGDR_STALL_SECONDS) set low.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgdr.catalog.scan import find_backup
from pgdr.pipeline.watchdog import blame
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.fake_pg_dump import broken_pg_bin
from tests.test_backup import assert_nothing_left


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """http://127.0.0.1:<port>: accepts every connection, reads what it is sent, never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.setblocking(False)
            held.append(conn)
            for other in held:  # drain, so that a sender is never blocked by a full window
                try:
                    while other.recv(65536):
                        pass
                except (BlockingIOError, OSError):
                    pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_backup_to_an_s3_endpoint_that_never_answers_fails_within_the_budget(
        capsys, fleet_db, s3_repo, silent_endpoint, monkeypatch):
    monkeypatch.setenv("PGDR_STALL_SECONDS", "2")
    with monkeypatch.context() as stalled:
        stalled.setenv("AWS_ENDPOINT_URL", silent_endpoint)
        started = time.monotonic()
        code, out, err = run_cli(capsys, "backup", "--db", fleet_db, "--repo", s3_repo, "--json")
        elapsed = time.monotonic() - started
    assert code == 1 and out == ""
    line = error_line(err)
    assert "timeout" in line.lower() and silent_endpoint in line, line
    # 4 attempts of 2 s and botocore's backoff between them: well under a minute, not hours.
    assert elapsed < 60, elapsed
    assert_nothing_left(s3_repo)


def test_a_dump_that_stops_sending_fails_naming_the_database(capsys, fleet_db, file_repo, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("PGDR_PG_BIN", str(broken_pg_bin(tmp_path / "bin", limit=256 * 1024, then="hang")))
    monkeypatch.setenv("PGDR_STALL_SECONDS", "2")
    started = time.monotonic()
    code, _out, err = run_cli(capsys, "backup", "--db", fleet_db, "--repo", file_repo)
    assert "the database stalled: no byte of the dump moved for 2 s" in error_line(err)
    assert code == 1 and time.monotonic() - started < 60
    assert_nothing_left(file_repo)


def test_the_side_to_blame_is_the_one_that_holds_the_others_up():
    assert blame(["encoder", "store"]) == "store"  # the store takes nothing: all wait
    assert blame(["encoder", "database"]) == "database"  # the encoder starves
    assert blame(["encoder", "encoder"]) == "encoder"  # it neither reads nor writes
    assert blame([]) == "encoder"  # nobody waits on anyone: the encoder is busy forever


def test_a_download_that_stops_arriving_fails_naming_the_store(capsys, pg, fleet_db, file_repo, monkeypatch):
    """The stored dump becomes a pipe that sends a few bytes and then nothing (a hung mount)."""
    backup = cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo)
    repo = open_repository(file_repo)
    manifest = find_backup(repo, backup["backup_id"])
    stored = Path(repo.root) / manifest.prefix / manifest.data_key
    stored.unlink()
    os.mkfifo(stored)
    release = threading.Event()

    def write_a_little_then_hang() -> None:
        with open(stored, "wb") as pipe:
            pipe.write(b"\x28\xb5\x2f\xfd")
            pipe.flush()
            release.wait(120)

    writer = threading.Thread(target=write_a_little_then_hang, daemon=True)
    writer.start()
    monkeypatch.setenv("PGDR_STALL_SECONDS", "2")
    started = time.monotonic()
    try:
        code, _out, err = run_cli(capsys, "restore-temp", backup["backup_id"], "--repo", file_repo,
                                  "--server", pg.admin_url)
    finally:
        release.set()
        writer.join()
    assert code == 1 and time.monotonic() - started < 60
    assert "the store stalled: no byte of the download moved for 2 s" in error_line(err)
