"""A PostgreSQL bin directory whose pg_dump misbehaves part-way, for fault tests."""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.postgres import pg_bin

_WRAPPER = """#!{python}
# The real pg_dump; after {limit} bytes: {then}.
import os, signal, subprocess, sys, time
real = subprocess.Popen([{real!r}, *sys.argv[1:]], stdout=subprocess.PIPE)
sent = 0
paused = False
while chunk := real.stdout.read1(65536):
    sys.stdout.buffer.write(chunk)
    sent += len(chunk)
    if sent >= {limit} and not paused:
        sys.stdout.flush()
        if {then!r} == "pause":
            paused = True
            time.sleep(3)
            continue
        if {then!r} == "hang":
            time.sleep(3600)
        real.kill()
        os.kill(os.getpid(), signal.SIGKILL)
sys.exit(real.wait())
"""


def broken_pg_bin(directory: Path, *, limit: int, then: str) -> Path:
    """A copy (by symlinks) of the PostgreSQL bin directory whose pg_dump streams `limit`
    bytes and then is SIGKILLed (`then="kill"`), hangs (`"hang"`, as a dump stuck on a
    lock) or pauses 3 s and goes on (`"pause"`, a slow dump). Point PGDR_PG_BIN at the
    returned directory."""
    real_dir = Path(pg_bin("pg_dump")).parent
    directory.mkdir(parents=True, exist_ok=True)
    for program in real_dir.iterdir():
        if program.name != "pg_dump":
            (directory / program.name).symlink_to(program)
    wrapper = directory / "pg_dump"
    wrapper.write_text(_WRAPPER.format(python=sys.executable, real=str(real_dir / "pg_dump"), limit=limit,
                                       then=then))
    wrapper.chmod(0o755)
    return directory
