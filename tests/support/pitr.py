"""Helpers for tests of point-in-time recovery: a directory for a recovered server, SQL
statements, and waiting for the archiver."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest


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
