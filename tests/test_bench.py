"""The benchmark harness end to end at a tiny size: it runs every case and writes
latest.json in the documented shape. Nothing is timed here: speed is the benchmark's
business (`make bench`), never a test's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.archiving import LAG_KEYS, LagSample, lag_figures, throughput_figures
from bench.report import CASES, WAL_CASES, Target

ROOT = Path(__file__).resolve().parents[1]
BACKUPS = {"raw_dump", "plain_pipe", "pg_dump_default", "old_backup", "pgbackrest_backup", "pgdr_backup_file",
           "pgdr_backup", "pgdr_backup_encrypted", "pgdr_basebackup"}
RATIOS = {"backup_vs_pipe", "backup_vs_pgbackrest", "restore_vs_bare", "empty_backup_seconds",
          "catalog_list_seconds"}
WAL_RATIOS = {"physical_backup_vs_pgbackrest", "physical_restore_vs_pgbackrest", "wal_throughput_mb_s",
              "wal_push_segment_seconds"}
WAL_FIGURES = {"wal_generated_mb", "wal_generated_mb_s", "wal_archived_mb_s", "archived_segments",
               "load_seconds", "catch_up_seconds", *LAG_KEYS}
WAL_MB = 48


@pytest.mark.slow
def test_bench_runs_every_case_and_writes_results(tmp_path: Path) -> None:
    results = tmp_path / "latest.json"
    env = {**os.environ, "BENCH_MB": "20", "BENCH_RUNS": "1", "BENCH_RESULTS": str(results),
           "BENCH_CATALOG_BACKUPS": "40", "BENCH_WAL_MB": str(WAL_MB), "BENCH_WAL_JOBS": "3"}
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
    assert set(data["ratios"]) >= RATIOS | WAL_RATIOS | set(LAG_KEYS)
    assert all(ratio > 0 for name, ratio in data["ratios"].items() if name not in LAG_KEYS)
    assert {t["name"] for t in data["targets"]} >= RATIOS | {"pgdr_peak_rss_mb", "wal_throughput_mb_s",
                                                             "wal_push_segment_seconds"}
    assert all(isinstance(t["met"], bool) for t in data["targets"])
    # Physical backup and restore beside pgBackRest's: the whole cluster, stored compressed.
    assert data["stored_mb"]["pgdr_basebackup"] > data["stored_mb"]["pgdr_backup_file"]
    # WAL archiving: the load wrote what it was asked to, the archiver's children did the work
    # (wal-push: CPU and memory of the archiver's process tree), every segment was archived.
    assert set(data["wal_archiving"]) == set(WAL_CASES)
    for figures in data["wal_archiving"].values():
        assert set(figures) == WAL_FIGURES
        assert figures["wal_generated_mb"] >= WAL_MB
        assert figures["archived_segments"] >= WAL_MB // 16
        assert figures["wal_generated_mb_s"] > 0 and figures["wal_archived_mb_s"] > 0
        assert all(figures[key] >= 0 for key in LAG_KEYS)
    assert all(data["cpu_seconds"][name] > 0.1 for name in WAL_CASES)
    assert all(data["peak_rss_mb"][name] > 1 for name in (*WAL_CASES, "wal_push_segment"))
    assert data["ratios"]["wal_throughput_mb_s"] == data["wal_archiving"]["wal_archive_parallel"][
        "wal_archived_mb_s"]
    machine = data["machine"]
    assert machine["nproc"] >= 1 and machine["memory_mb"] > 0
    assert machine["postgresql"].startswith("15")
    assert machine["date"].endswith("Z")
    # The table names every case.
    assert all(f"| {name} |" in proc.stdout for name in CASES)


def test_archive_lag_is_the_largest_seen_and_the_one_when_the_load_ended() -> None:
    samples = [LagSample(0.0, 0, 0.0), LagSample(1.0, 5, 2.5), LagSample(2.0, 3, 1.0), LagSample(2.2, 1, 0.4),
               LagSample(3.0, 0, 0.0)]
    assert lag_figures(samples, load_seconds=2.1) == {
        "archive_lag_max_segments": 5, "archive_lag_max_seconds": 2.5,
        "archive_lag_end_segments": 1, "archive_lag_end_seconds": 0.4}
    # The load outlasted every sample: the last one is the lag at its end.
    assert lag_figures(samples, load_seconds=9.0)["archive_lag_end_segments"] == 0
    assert lag_figures([], load_seconds=1.0)["archive_lag_max_segments"] == 0


def test_wal_throughput_counts_what_was_written_and_archived() -> None:
    figures = throughput_figures(wal_bytes=320 << 20, archived_segments=21, load_seconds=4.0,
                                 total_seconds=6.0)
    assert figures["wal_generated_mb_s"] == 80.0 and figures["wal_archived_mb_s"] == 56.0
    assert figures["catch_up_seconds"] == 2.0


def test_a_target_to_reach_is_met_at_or_above_its_limit() -> None:
    assert Target("t", "", 120.0, 100.0, at_least=True).met
    assert not Target("t", "", 80.0, 100.0, at_least=True).met
    assert Target("t", "", 0.2, 0.3).met and not Target("t", "", 0.4, 0.3).met
