"""Who owns a leftover: a run is named by host, pid and the pid's start time.

Scratch databases, staging and passfile directories and repository locks record the run
that made them, so that the next run can tell a leftover (its run is gone) from work in
progress.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _started(pid: int) -> str | None:
    """The start time of process pid in clock ticks since boot (tells a reused pid apart)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_run() -> dict[str, Any]:
    """host, pid and pid start of this process: recorded on everything a run leaves behind
    until it is done (scratch databases, staging and passfile directories)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _started(os.getpid())}


def run_is_gone(owner: Mapping[str, Any]) -> bool:
    """True when owner names a process of this host that no longer runs (killed, or its pid
    reused by another). A run of another host is never presumed gone here."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another user
    recorded = owner.get("pid_started")
    return recorded is not None and _started(owner["pid"]) not in (None, recorded)


def private_directory(prefix: str, base: str | Path | None = None) -> Path:
    """A new 0700 directory named after this run (`<prefix><pid>.<start>-<random>`), so that
    once the run is gone, sweep_dead_runs knows it is a leftover."""
    run = this_run()
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{run['pid']}.{run['pid_started']}-", dir=base))


def sweep_dead_runs(base: str | Path | None, prefix: str) -> list[Path]:
    """Remove the private directories under base (default: the temporary directory) whose
    run is gone; returns what was removed."""
    removed = []
    root = Path(base or tempfile.gettempdir())
    for entry in root.glob(f"{prefix}*"):
        pid, _dot, rest = entry.name[len(prefix):].partition(".")
        started = rest.split("-", 1)[0]
        if not (pid.isdigit() and _dot and entry.is_dir()):  # only names private_directory gives
            continue
        owner = {"host": socket.gethostname(), "pid": int(pid),
                 "pid_started": None if started == "None" else started}
        if run_is_gone(owner):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
