"""PostgreSQL bin directories whose pg_dump misbehaves part-way (fault tests) or records
when it ran (concurrency tests)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from pgdr.postgres.programs import pg_bin

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
    return _with_pg_dump(directory, lambda real: _WRAPPER.format(python=sys.executable, real=real,
                                                                 limit=limit, then=then))


_TIMED = """#!{python}
# The real pg_dump, held {hold} s longer; appends "<start> <end>" (epoch seconds) to {log}.
import subprocess, sys, time
start = time.time()
code = subprocess.call([{real!r}, *sys.argv[1:]])
time.sleep({hold})
with open({log!r}, "a") as log:
    log.write(f"{{start}} {{time.time()}}\\n")
sys.exit(code)
"""


def timed_pg_bin(directory: Path, log: Path, *, hold: float) -> Path:
    """A bin directory whose pg_dump takes `hold` seconds more than the real one and logs
    when each dump ran, so that a test can see how many ran at once."""
    return _with_pg_dump(directory, lambda real: _TIMED.format(python=sys.executable, real=real, log=str(log),
                                                               hold=hold))


def overlap(log: Path) -> int:
    """The most dumps logged by timed_pg_bin that ran at the same moment."""
    events = []
    for start, end in (map(float, line.split()) for line in log.read_text().splitlines() if line.strip()):
        events += [(start, 1), (end, -1)]
    running = most = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at a tie
        running += change
        most = max(most, running)
    return most


_HANGING = """#!{python}
# Stands in for {real}: writes its pid to {pid_file}, then hangs as a long restore would.
import os
with open({pid_file!r}, "w") as out:
    out.write(str(os.getpid()))
os.execv("/bin/sleep", ["sleep", "600"])
"""


def hanging_pg_bin(directory: Path, program: str, pid_file: Path) -> Path:
    """A bin directory whose `program` (e.g. pg_restore) hangs, its pid in pid_file."""
    return _with_pg_dump(directory, lambda real: _HANGING.format(python=sys.executable, real=real,
                                                                 pid_file=str(pid_file)), program)


def _with_pg_dump(directory: Path, script: Callable[[str], str], program: str = "pg_dump") -> Path:
    """A copy (by symlinks) of the PostgreSQL bin directory with its own pg_dump (or program)."""
    real_dir = Path(pg_bin(program)).parent
    directory.mkdir(parents=True, exist_ok=True)
    for existing in real_dir.iterdir():
        if existing.name != program:
            (directory / existing.name).symlink_to(existing)
    wrapper = directory / program
    wrapper.write_text(script(str(real_dir / program)))
    wrapper.chmod(0o755)
    return directory
