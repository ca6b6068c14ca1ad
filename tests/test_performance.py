"""What keeps pgdr's costs down, checked for what it means to a user: the raw dump never
passes through pgdr's Python process, and its size is still known exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tasks.dump import stream_dump
from tasks.process import CommandError
from tasks.repository import FileRepository, PutResult


def _children() -> dict[str, int]:
    """name -> pid of this process's direct children."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            if int(stat[stat.rindex(")") + 2:].split()[1]) == os.getpid():
                found[name] = int(entry.name)
    return found


def _fd_target(pid: int | str, fd: int | str) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


class _WatchingRepository(FileRepository):
    """A real file repository that looks at the processes of the pipeline before it
    stores anything, then lets pg_dump go on (`release`)."""

    seen: dict[str, Any]
    release: Callable[[], None]

    def put_stream(self, key: str, chunks: Iterable[bytes], **kwargs: Any) -> PutResult:
        def watched() -> Iterator[bytes]:
            children = _children()
            self.seen.update(
                dump_out=_fd_target(children["pg_dump"], 1),
                zstd_in=_fd_target(children["zstd"], 0),
                ours={_fd_target("self", fd) for fd in os.listdir("/proc/self/fd")
                      if os.path.exists(f"/proc/self/fd/{fd}")})
            self.release()
            yield from chunks

        return super().put_stream(key, watched(), **kwargs)


def test_pg_dump_writes_into_zstd_through_an_os_pipe_and_its_size_is_counted(fleet_db, tmp_path):
    repo = _WatchingRepository(tmp_path / "repo")
    repo.seen = {}
    # pg_dump waits for this lock: it is still running when the repository looks.
    with psycopg.connect(fleet_db) as locker:
        locker.execute("LOCK TABLE drivers IN ACCESS EXCLUSIVE MODE")
        repo.release = locker.commit
        result = stream_dump(fleet_db, repo, "fleet/dump.pgdr", snapshot=None)

    seen = repo.seen
    # pg_dump's stdout is zstd's stdin, a pipe this process holds no end of: no raw byte
    # is copied through Python.
    assert seen["dump_out"].startswith("pipe:") and seen["dump_out"] == seen["zstd_in"]
    assert seen["dump_out"] not in seen["ours"]

    # The raw size is still exact: the kernel counted pg_dump's writes.
    stored = (tmp_path / "repo" / "fleet" / "dump.pgdr").read_bytes()
    assert len(stored) == result.stored.size
    raw = subprocess.run(["zstd", "-d", "-c", "-q"], input=stored, capture_output=True, check=True).stdout
    assert result.dump_bytes == len(raw) > 0
    assert raw.startswith(b"PGDMP")


def test_a_compressor_that_dies_midway_is_named_and_nothing_is_stored(fleet_db, tmp_path, monkeypatch):
    # A zstd that compresses the first 100 kB, then fails: pg_dump then dies of the broken
    # pipe, which is not the cause the operator needs to read.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "zstd"
    fake.write_text(f'#!/bin/sh\nhead -c 100000 | {shutil.which("zstd")} "$@"\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    repo = FileRepository(tmp_path / "repo")

    with pytest.raises(CommandError, match=r"^zstd exited with status 3"):
        stream_dump(fleet_db, repo, "fleet/dump.pgdr", snapshot=None)
    assert not [path for path in (tmp_path / "repo").rglob("*") if path.is_file()]
