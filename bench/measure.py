"""Wall time, CPU time and peak memory of a command's whole process tree.

CPU time is user + system seconds of the command and of every descendant it waited for
(what wait4 reports for it: the kernel adds each reaped child's time to its parent). A
daemon a command starts (PostgreSQL's postmaster from pg_ctl) and PostgreSQL backends
serving the command are not its descendants, so their CPU is not counted.

A thread samples the resident set size of the process and of all its descendants every
~50 ms (from /proc) and keeps the largest sum. resource.getrusage cannot do this: its
maxrss is one process's peak, not a pipeline's.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SAMPLE_SECONDS = 0.05
_PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024


class BenchError(RuntimeError):
    """A measured command failed: the benchmark stops rather than report a wrong number."""


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_rss_mb: float
    stdout: str
    cpu_seconds: float = 0.0


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # exited while we looked
        # The command name may contain spaces and parentheses: fields start after the last ')'.
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree_rss(root: int) -> int:
    """Bytes resident in `root` and every process below it, right now."""
    children = _children_by_parent()
    total = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/statm", "rb") as handle:
                total += int(handle.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakSampler(threading.Thread):
    """The largest resident size of a process tree, sampled every SAMPLE_SECONDS."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._done.wait(SAMPLE_SECONDS)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def measure(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, logs: Path, label: str,
            stdout: Path | None = None) -> Measurement:
    """Run argv to completion; BenchError (with its last stderr lines) unless it exits 0."""
    out_path = stdout or logs / f"{label}.out"
    err_path = logs / f"{label}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=dict(env), cwd=cwd)
        sampler = PeakSampler(proc.pid)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = returncode = os.waitstatus_to_exitcode(status)
        finally:
            seconds = time.monotonic() - start
            peak = sampler.stop()
    if returncode != 0:
        tail = " | ".join(err_path.read_text(errors="replace").strip().splitlines()[-5:])
        raise BenchError(f"{label} exited with status {returncode}: {tail}")
    text = "" if stdout else out_path.read_text(errors="replace")
    return Measurement(seconds, peak / MB, text, usage.ru_utime + usage.ru_stime)
