"""What keeps pgdr's costs down, checked for what it means to a user: the raw dump never
passes through pgdr's Python process, and its size is still known exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgdr.pipeline.dump import stream_dump
from pgdr.pipeline.process import CommandError
from pgdr.storage.filerepo import FileRepository
from pgdr.storage.repository import PutResult


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
            # Children start as setpriv, which then becomes the program: wait for both names.
            deadline = time.monotonic() + 20
            while not {"pg_dump", "zstd"} <= set(children := _children()) and time.monotonic() < deadline:
                time.sleep(0.05)
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


def test_the_pgdr_process_exits_fast_with_its_status_its_output_and_its_run_records(fleet_db, file_repo):
    """`pgdr` skips the interpreter's teardown once Prefect's exit handlers ran: the exit
    status, the JSON on stdout and the run's last logs must all still be there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "INFO"}
    command = [sys.executable, "-m", "flows.cli"]
    done = subprocess.run([*command, "backup", "--db", fleet_db, "--repo", file_repo, "--json"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["database"] == "fleet"
    with get_client(sync_client=True) as client:
        # This test's repository is its own: one run used it.
        [run] = [r for r in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=50)
                 if r.parameters.get("repo") == file_repo]
        assert run.state.is_completed()
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        steps = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    # The engine's very last records of the run reached the server: its log, and the final
    # state of every step (sent as events).
    assert any("Finished in state Completed" in log.message for log in logs)
    assert steps and all(step.state and step.state.is_completed() for step in steps), \
        [(step.name, step.state_type) for step in steps]

    failed = subprocess.run([*command, "list", "--repo", "nowhere://at/all", "--json"], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("pgdr: error: ") and "Traceback" not in failed.stderr


def test_great_expectations_loads_without_its_distribution_tests_dependencies_until_used():
    """The validation's import leaves scipy.stats and altair unexecuted (DEFERRED_IMPORTS: about
    60 MB of a restore's peak memory); an expectation that needs them still gets them."""
    probe = """
import sys
import time
from pgdr.restore import quality
quality.defer_unused_imports()
import great_expectations.expectations
print(sorted(name for name in ("scipy.stats._stats_py", "altair.vegalite") if name in sys.modules))
from scipy import stats
print(stats.entropy([0.5, 0.5]) > 0, "scipy.stats._stats_py" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          check=True, cwd=Path(__file__).parent.parent)
    assert done.stdout.split("\n")[:2] == ["[]", "True True"], done.stdout + done.stderr


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_children_start_without_a_copy_of_pgdr_and_still_die_with_it():
    """A child starts through setpriv --pdeathsig (no preexec_fn: vfork, no copy of pgdr's
    memory) and the kernel still kills it when pgdr dies, even by SIGKILL."""
    from pgdr.pipeline.process import dying_with_parent

    argv, options = dying_with_parent(["sleep", "60"], None)
    assert options == {} and argv[:4] == [shutil.which("setpriv"), "--pdeathsig", "KILL", "--"]
    assert argv[4:] == [shutil.which("sleep"), "60"]
    assert "preexec_fn" in dying_with_parent(["no-such-program-here"], None)[1]  # Popen names it

    pgdr = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom pgdr.pipeline.process import Pipeline\n"
         "with Pipeline([['sleep', '60']]) as pipeline:\n"
         "    print(pipeline.processes[0].pid, flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    child = int(pgdr.stdout.readline())  # type: ignore[union-attr]
    # setpriv replaces itself with sleep: on a busy machine the exec may not have happened yet.
    deadline = time.monotonic() + 20
    while Path(f"/proc/{child}/comm").read_text().strip() == "setpriv" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive(child) and Path(f"/proc/{child}/comm").read_text().strip() == "sleep"
    pgdr.kill()
    pgdr.wait(timeout=30)
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
