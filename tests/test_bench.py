"""The benchmark harness end to end at a tiny size: it runs every case and writes
latest.json in the documented shape. Nothing is timed here: speed is the benchmark's
business (`make bench`), never a test's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import CASES

ROOT = Path(__file__).resolve().parents[1]
BACKUPS = {"raw_dump", "plain_pipe", "pg_dump_default", "old_backup", "pgbackrest_backup", "pgdr_backup_file",
           "pgdr_backup", "pgdr_backup_encrypted"}
RATIOS = {"backup_vs_pipe", "backup_vs_pgbackrest", "restore_vs_bare", "empty_backup_seconds",
          "catalog_list_seconds"}


@pytest.mark.slow
def test_bench_runs_every_case_and_writes_results(tmp_path: Path) -> None:
    results = tmp_path / "latest.json"
    env = {**os.environ, "BENCH_MB": "20", "BENCH_RUNS": "1", "BENCH_RESULTS": str(results),
           "BENCH_CATALOG_BACKUPS": "40"}
    proc = subprocess.run([sys.executable, "-m", "bench"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    data = json.loads(results.read_text())
    assert 15 < data["db_mb"] < 40
    assert data["rounds"] == 1
    assert set(data["runs"]) == set(CASES)
    assert all(seconds > 0 for seconds in data["runs"].values())
    assert all(len(samples) == 1 for samples in data["samples"].values())
    # Every case ran as a process tree that held memory.
    assert set(data["peak_rss_mb"]) == set(CASES)
    assert all(mb > 1 for mb in data["peak_rss_mb"].values())
    # CPU seconds of each process tree: pgdr (Python) always uses some, compressing more than reading.
    assert set(data["cpu_seconds"]) == set(CASES)
    assert all(data["cpu_seconds"][name] > 0.1 for name in CASES if name.startswith(("pgdr_", "empty_")))
    assert data["cpu_seconds"]["plain_pipe"] >= data["cpu_seconds"]["raw_dump"]
    # Compressed backups are smaller than the uncompressed dump they came from.
    assert set(data["stored_mb"]) == BACKUPS
    assert 0 < data["stored_mb"]["pgdr_backup"] < data["stored_mb"]["raw_dump"]
    # The same pipe stores the same bytes, whichever repository holds them.
    assert abs(data["stored_mb"]["pgdr_backup_file"] - data["stored_mb"]["pgdr_backup"]) < 0.2
    # pgBackRest copies the files of the whole cluster: more than the logical dump compressed.
    assert data["stored_mb"]["pgbackrest_backup"] > data["stored_mb"]["plain_pipe"]
    assert data["stored_mb"]["pgdr_backup_encrypted"] >= data["stored_mb"]["pgdr_backup"] > 0
    pgdr_cases = {name for name in CASES if name.startswith(("pgdr_", "empty_"))}
    assert set(data["pgdr_reported_seconds"]) == pgdr_cases
    assert set(data["ratios"]) >= RATIOS
    assert all(ratio > 0 for ratio in data["ratios"].values())
    assert {t["name"] for t in data["targets"]} >= RATIOS | {"pgdr_peak_rss_mb"}
    assert all(isinstance(t["met"], bool) for t in data["targets"])
    machine = data["machine"]
    assert machine["nproc"] >= 1 and machine["memory_mb"] > 0
    assert machine["postgresql"].startswith("15")
    assert machine["date"].endswith("Z")
    # The table names every case.
    assert all(f"| {name} |" in proc.stdout for name in CASES)
