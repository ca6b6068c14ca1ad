"""`python -m bench`: BENCH_MB (1000), BENCH_RUNS (3), BENCH_RESULTS (bench/results/latest.json),
BENCH_JOBS (pg_restore jobs for both restores: pgdr's default, min(4, nproc)),
BENCH_CATALOG_BACKUPS (2000: backups in the catalog cases' repository), BENCH_WAL_MB (MB of
WAL each archiving case writes: BENCH_MB, at least 64), BENCH_WAL_JOBS (4: wal-push --jobs of
the parallel archiving case). zstd threads of the plain pipe and pgBackRest's process-max are
the number of cores; the archiving cases' write load runs one writer per core."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.cases import Cases, Result, database_mb, server_version
from bench.environment import BenchEnvironment, bench_environment, say
from bench.measure import BenchError

DEFAULT_RESULTS = Path(__file__).parent / "results" / "latest.json"


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise SystemExit(f"bench: {name} must be a whole number, not {raw!r}") from None
    if value < 1:
        raise SystemExit(f"bench: {name} must be at least 1")
    return value


def one_round(cases: Cases, number: int, total: int) -> dict[str, Result]:
    results: dict[str, Result] = {}

    def step(name: str, result: Result) -> Result:
        results[name] = result
        m = result.measurement
        say(f"round {number}/{total}: {name} {m.seconds:.1f} s, {m.cpu_seconds:.1f} CPU s, "
            f"peak {m.peak_rss_mb:.0f} MB")
        if result.figures:
            say(f"round {number}/{total}: {name} " + ", ".join(f"{k} {v}" for k, v in result.figures.items()))
        return result

    step("raw_dump", cases.raw_dump())
    step("row_counts", cases.row_counts())
    step("content_digests", cases.content_digests())
    step("plain_pipe", cases.plain_pipe())
    step("pg_dump_default", cases.pg_dump_default())
    step("old_backup", cases.old_backup())
    step("pgbackrest_backup", cases.pgbackrest_backup())
    step("pgdr_backup_file", cases.pgdr_backup(file_repo=True)[0])
    backup, summary = cases.pgdr_backup()
    step("pgdr_backup", backup)
    step("pgdr_backup_encrypted", cases.pgdr_backup(encrypted=True)[0])
    step("old_restore", cases.old_restore())
    step("bare_restore", cases.bare_restore())
    step("pgbackrest_restore", cases.pgbackrest_restore())
    with cases.archiving_to_pitr_repo():
        step("pgdr_basebackup", cases.pgdr_basebackup())
        step("pgdr_restore_physical", cases.pgdr_restore_physical())
    step("wal_archive_serial", cases.wal_archiving(jobs=1))
    step("wal_archive_parallel", cases.wal_archiving(jobs=cases.wal_jobs))
    step("wal_push_segment", cases.wal_push_segment())
    step("pgdr_restore_temp", cases.pgdr_restore_temp(summary["backup_id"]))
    step("pgdr_recover_table", cases.pgdr_recover_table(summary["backup_id"]))
    step("catalog_list", cases.catalog_list())
    step("catalog_status", cases.catalog_status())
    step("empty_backup", cases.empty_backup(prefect_server=True))
    step("empty_backup_no_server", cases.empty_backup(prefect_server=False))
    cases.clean_up()
    return results


def machine_info(bench: BenchEnvironment) -> dict[str, Any]:
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_mb": pages * page_size // 2**20,
        "postgresql": server_version(bench),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> int:
    size_mb = _int_env("BENCH_MB", 1000)
    rounds = _int_env("BENCH_RUNS", 3)
    catalog_backups = _int_env("BENCH_CATALOG_BACKUPS", 2000)
    cores = os.cpu_count() or 1
    jobs = _int_env("BENCH_JOBS", min(4, cores))
    wal_mb = _int_env("BENCH_WAL_MB", max(64, size_mb))
    wal_jobs = _int_env("BENCH_WAL_JOBS", 4)
    results_path = Path(os.environ.get("BENCH_RESULTS") or DEFAULT_RESULTS)
    try:
        with bench_environment(size_mb, cores) as bench:
            machine = machine_info(bench)
            cases = Cases(bench, jobs, cores, wal_mb=wal_mb, wal_jobs=wal_jobs)
            db_mb = database_mb(bench)
            say(f"database {db_mb:.0f} MB; dump {cases.prepare() / 2**20:.0f} MB; {rounds} round(s), "
                f"pg_restore --jobs={jobs}")
            say(f"writing the manifests of {catalog_backups} backups for the catalog cases")
            cases.prepare_catalog(catalog_backups)
            collected = [one_round(cases, n + 1, rounds) for n in range(rounds)]
            machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
            machine["restore_jobs"] = jobs
            machine["wal_push_jobs"] = wal_jobs
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    result = report.summarize(db_mb, collected, machine)
    report.write(result, results_path)
    print(report.table(result))
    print(f"\nmachine: {machine}\nresults written to {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
