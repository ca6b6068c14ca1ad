"""A real Prefect process worker, started for a test and stopped after it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.settings import get_current_settings

PREFECT = str(Path(sys.executable).parent / "prefect")


def worker_env(**extra: str) -> dict[str, str]:
    """This environment, pointed at the session's Prefect server, polling every second."""
    env = {**os.environ, "PREFECT_API_URL": get_current_settings().api.url or "",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **extra}
    assert env["PREFECT_API_URL"].startswith("http://127.0.0.1")
    return env


@contextmanager
def process_worker(pool: str, workdir: Path, env: dict[str, str], *extra: str) -> Iterator[Path]:
    """`prefect worker start --pool <pool> --type process` in workdir; yields its log file."""
    log_path = workdir / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--type", "process",
                                   "--install-policy", "never", *extra],
                                  cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield log_path
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
