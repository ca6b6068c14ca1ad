"""The one way pgdr runs child processes: argument lists, never a shell, secrets kept out.

A `Pipeline` connects commands stdout-to-stdin the way `a | b | c` would, collects each
command's stderr, and reports the command that really failed (not the ones that only died
of a broken pipe because of it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any, TypedDict, Unpack

from pgdr.ops.errors import PgdrError, redact

# Stderr lines kept per command (the last ones), and at most how many a failure quotes.
_STDERR_TAIL_LINES = 200
_QUOTED_LINES = 10
# Lines that say what went wrong, preferred when a command printed more than can be quoted.
_ERROR_WORDS = re.compile(r"error|fatal|fail|denied|does not exist|bad|invalid|cannot|could not|no such|"
                          r"unexpected|refused|not found|no secret key", re.IGNORECASE)


# What a child may see of pgdr's environment: where programs and libraries are, locale and
# time zone, home and temporary directories, libpq's own settings (Kerberos' for GSSAPI
# logins) and gpg's home. Never a secret (AWS keys, the gpg passphrase, a webhook URL), nor
# PGPASSWORD or PGSERVICE, which could give a child another password or server than the one
# pgdr named.
_INHERITED = frozenset({"PATH", "LD_LIBRARY_PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ",
                        "TMPDIR", "GNUPGHOME", "KRB5CCNAME", "KRB5_CONFIG"})
_LIBPQ_SETTINGS = frozenset({
    "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSFILE", "PGOPTIONS", "PGAPPNAME",
    "PGSSLMODE", "PGREQUIRESSL", "PGSSLCOMPRESSION", "PGSSLCERT", "PGSSLKEY", "PGSSLROOTCERT", "PGSSLCRL",
    "PGSSLCRLDIR", "PGSSLSNI", "PGREQUIREPEER", "PGSSLMINPROTOCOLVERSION", "PGSSLMAXPROTOCOLVERSION",
    "PGGSSENCMODE", "PGKRBSRVNAME", "PGGSSLIB", "PGCONNECT_TIMEOUT", "PGCLIENTENCODING",
    "PGTARGETSESSIONATTRS", "PGLOADBALANCEHOSTS", "PGCHANNELBINDING", "PGREQUIREAUTH", "PGDATESTYLE",
    "PGTZ", "PGGEQO", "PGSYSCONFDIR", "PGLOCALEDIR",
})


def inherited_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of environ a child gets (see _INHERITED and _LIBPQ_SETTINGS)."""
    return {k: v for k, v in environ.items()
            if k in _INHERITED or k in _LIBPQ_SETTINGS or k.startswith("LC_")}


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: what it needs of ours, plus extra."""
    env = inherited_env(os.environ)
    env.update(extra or {})
    return env


# --- children die with pgdr -------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_prctl = None
if sys.platform == "linux":  # resolved here, not in the forked child
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl


def die_with_parent() -> None:
    """preexec_fn of every child: the kernel SIGKILLs it when pgdr dies, even by SIGKILL,
    so that no pg_restore goes on loading into a database nobody will validate."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# setpriv(1) (util-linux) sets the same parent-death signal and then executes the program.
# Without a preexec_fn Python starts the child with vfork() instead of fork(): fork() copies
# the page tables of pgdr's whole process (200-300 MB once great-expectations is loaded:
# measured 20 ms of CPU and up to 450 ms on a busy machine per child) and, until the
# child executes, its memory is counted twice in the process tree.
_SETPRIV = shutil.which("setpriv") if sys.platform == "linux" else None


def dying_with_parent(argv: Sequence[str], env: Mapping[str, str] | None) -> tuple[list[str], dict[str, Any]]:
    """The argv and Popen options of a child that dies with pgdr (die_with_parent): through
    setpriv where it is installed and the program is found (a missing program keeps the
    error Popen gives for it)."""
    program = shutil.which(argv[0], path=os.pathsep.join(os.get_exec_path(env))) if _SETPRIV else None
    if program is None:
        return list(argv), {"preexec_fn": die_with_parent}
    return [_SETPRIV, "--pdeathsig", "KILL", "--", program, *argv[1:]], {}  # type: ignore[list-item]


class _StderrCollector(threading.Thread):
    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.lines.append(line)
        self.stream.close()


def quoted_lines(lines: Sequence[str], limit: int = _QUOTED_LINES) -> list[str]:
    """What a failure message quotes of a command's stderr: every distinct line, in order;
    when there are more than `limit`, the ones that say what went wrong (the cause printed
    first is kept, not only the consequence printed last)."""
    distinct = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if len(distinct) > limit:
        distinct = [line for line in distinct if _ERROR_WORDS.search(line)] or distinct[-limit:]
    if len(distinct) > limit:
        distinct = [*distinct[:limit - 2], f"... {len(distinct) - limit + 1} more", distinct[-1]]
    return distinct


class CommandError(PgdrError):
    """A child process failed; the message names it and quotes what it printed on stderr
    (quoted_lines: distinct lines, secrets already redacted by the caller), on one line."""

    def __init__(self, name: str, returncode: int, stderr_lines: Sequence[str]) -> None:
        self.name = name
        self.returncode = returncode
        self.stderr_lines = list(stderr_lines)
        if returncode < 0:
            how = f"was killed by signal {signal.Signals(-returncode).name}"
        else:
            how = f"exited with status {returncode}"
        quoted = " | ".join(quoted_lines(self.stderr_lines))
        super().__init__(f"{name} {how}" + (f": {quoted}" if quoted else ""))


# Every pipeline still running, so that a termination signal can stop their children
# whatever the state of the stack it interrupts.
_RUNNING: weakref.WeakSet[Pipeline] = weakref.WeakSet()


def kill_running_pipelines() -> None:
    """SIGKILL the children of every pipeline of this process (on SIGTERM)."""
    for pipeline in list(_RUNNING):
        pipeline.kill()


class Pipeline:
    """`cmd1 | cmd2 | ...` with the last stdout read by the caller (or sent to a file).

    Use as a context manager: leaving the block early kills every command, so a failed
    upload never leaves pg_dump running.
    """

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        *,
        env: Mapping[str, str] | None = None,
        stdin: IO[bytes] | int | None = subprocess.DEVNULL,
        stdout: IO[bytes] | int = subprocess.PIPE,
        secrets: Iterable[str] = (),
        pass_fds: Sequence[int] = (),
    ) -> None:
        if not commands:
            raise ValueError("a pipeline needs at least one command")
        self.names = [os.path.basename(cmd[0]) for cmd in commands]
        _RUNNING.add(self)
        self.secrets = list(secrets)
        self.processes: list[subprocess.Popen[bytes]] = []
        self._collectors: list[_StderrCollector] = []
        full_env = child_env(env)
        upstream: Any = stdin
        try:
            for index, argv in enumerate(commands):
                last = index == len(commands) - 1
                spawned, options = dying_with_parent(argv, full_env)
                proc = subprocess.Popen(
                    spawned,
                    stdin=upstream,
                    stdout=stdout if last else subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=full_env,
                    pass_fds=tuple(pass_fds),
                    start_new_session=True,
                    **options,
                )
                if index > 0 and upstream is not None:
                    upstream.close()  # only the child holds the read end now
                upstream = proc.stdout if not last else None
                self.processes.append(proc)
                collector = _StderrCollector(proc.stderr)  # type: ignore[arg-type]
                collector.start()
                self._collectors.append(collector)
        except OSError as exc:
            self.kill()
            raise PgdrError(f"cannot start {os.path.basename(argv[0])}: {exc.strerror}") from None

    @property
    def stdin(self) -> IO[bytes] | None:
        return self.processes[0].stdin

    @property
    def stdout(self) -> IO[bytes] | None:
        return self.processes[-1].stdout

    def kill(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def bytes_written(self, index: int, *, final: bool = False) -> int | None:
        """Bytes command `index` has written so far (its stdout and its stderr), as the
        kernel counts them (Linux /proc/<pid>/io): bytes that flow from one command to the
        next through an OS pipe, never through this process. With final, first wait until
        the command has exited (without reaping it, so that its count stays readable).
        None where the system does not say."""
        pid = self.processes[index].pid
        try:
            if final:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            with open(f"/proc/{pid}/io", "rb") as handle:
                for line in handle:
                    if line.startswith(b"wchar:"):
                        return int(line.split()[1])
        except (OSError, ValueError, AttributeError):  # not Linux, or already reaped
            return None
        return None

    def wait(self, timeout: float | None = None) -> None:
        """Wait for every command; raise CommandError for the one that really failed."""
        for proc in self.processes:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                proc.wait()
        for collector in self._collectors:
            collector.join(timeout=5)
        failure = self.failure()
        if failure:
            raise failure

    def stderr_lines(self, index: int) -> list[str]:
        """The last stderr lines of command `index` (complete once wait() returned)."""
        return [redact(line, self.secrets) for line in self._collectors[index].lines]

    def failure(self) -> CommandError | None:
        failed = [
            (name, proc.returncode, collector)
            for name, proc, collector in zip(
                self.names, self.processes, self._collectors, strict=True
            )
            if proc.returncode not in (0, None)
        ]
        if not failed:
            return None
        # A command killed by SIGPIPE only reacts to a failure further down the line.
        real = [f for f in failed if f[1] != -signal.SIGPIPE] or failed
        name, code, collector = real[0]
        return CommandError(name, code, [redact(line, self.secrets) for line in collector.lines])

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.kill()
        for proc in self.processes:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
            if proc.poll() is None and exc_type is not None:
                proc.wait()


class RunOptions(TypedDict, total=False):
    """The keywords of run and run_bytes."""

    env: Mapping[str, str] | None
    input: bytes | None
    timeout: float | None
    secrets: Iterable[str]
    pass_fds: Sequence[int]


def run(argv: Sequence[str], **options: Unpack[RunOptions]) -> str:
    """Run one command to completion and return its stdout as text; CommandError on failure."""
    return run_bytes(argv, **options).decode("utf-8", "replace")


def run_bytes(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    secrets: Iterable[str] = (),
    pass_fds: Sequence[int] = (),
) -> bytes:
    """run() for binary output (a compressor, gpg): stdout as bytes."""
    full_env = child_env(env)
    spawned, options = dying_with_parent(argv, full_env)
    try:
        proc = subprocess.run(
            spawned,
            input=input,
            capture_output=True,
            env=full_env,
            timeout=timeout,
            pass_fds=tuple(pass_fds),
            check=False,
            start_new_session=True,
            **options,
        )
    except FileNotFoundError:
        raise PgdrError(f"{argv[0]} is not installed or not on PATH") from None
    except subprocess.TimeoutExpired:
        raise PgdrError(f"{os.path.basename(argv[0])} did not finish within {timeout} s") from None
    if proc.returncode != 0:
        lines = [
            redact(line, secrets)
            for line in proc.stderr.decode("utf-8", "replace").splitlines()
            if line.strip()
        ]
        raise CommandError(os.path.basename(argv[0]), proc.returncode, lines[-_STDERR_TAIL_LINES:])
    output: bytes = proc.stdout
    return output
