"""The benchmark's numbers: medians, ratios, targets, a table and latest.json."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.archiving import LAG_KEYS
from bench.cases import Result
from bench.measure import MB

# name -> what it measures, in the order the table shows them.
CASES = {
    "raw_dump": "pg_dump -Fc -Z0 > /dev/null (the read)",
    "row_counts": "the snapshot's row counts alone: count(*) of every table (psql)",
    "content_digests": "row counts with content digests (pgdr's default) of every table (psql)",
    "plain_pipe": "pg_dump -Fc -Z0 | zstd -3 -T<cores> > file (the plain pipe)",
    "pg_dump_default": "pg_dump -Fc -f file (zlib, pg_dump's default)",
    "old_backup": "old: pg_dump | gzip > file; upload (boto3)",
    "pgbackrest_backup": "pgBackRest full backup, zst, process-max = cores (physical)",
    "pgdr_backup_file": "pgdr backup to a file repository",
    "pgdr_backup": "pgdr backup to S3",
    "pgdr_backup_encrypted": "pgdr backup to S3, gpg-encrypted",
    "old_restore": "old: download; gunzip | psql",
    "bare_restore": "pg_restore -j of the same dump",
    "pgbackrest_restore": "pgBackRest restore + server start",
    "pgdr_basebackup": "pgdr basebackup to a file repository (physical)",
    "pgdr_restore_physical": "pgdr restore --physical (base backup, WAL to the archive's end) + server start",
    "wal_archive_serial": "write load, archive_command = pgdr wal-push (file repository), until archived",
    "wal_archive_parallel": "the same with wal-push --jobs N --spool DIR (pushing ahead)",
    "wal_push_segment": "one pgdr wal-push of a 16 MB segment to a file repository",
    "pgdr_restore_temp": "pgdr restore-temp (checksum + row counts)",
    "pgdr_recover_table": "pgdr recover-table of one small table",
    "catalog_list": "pgdr list, S3 repository of BENCH_CATALOG_BACKUPS backups of 5 databases",
    "catalog_status": "pgdr status (latest of each database), same repository",
    "empty_backup": "pgdr backup, empty db, Prefect server running",
    "empty_backup_no_server": "pgdr backup, empty db, temporary Prefect server",
}
# Cases whose throughput means something (they move the whole database).
_MOVES_DATA = {"raw_dump", "plain_pipe", "pg_dump_default", "old_backup", "pgbackrest_backup",
               "pgdr_backup_file", "pgdr_backup", "pgdr_backup_encrypted", "old_restore", "bare_restore",
               "pgbackrest_restore", "pgdr_restore_temp", "pgdr_basebackup", "pgdr_restore_physical"}
# The archiving cases: their figures (throughput, lag) are reported apart.
WAL_CASES = ("wal_archive_serial", "wal_archive_parallel")
PEAK_MB = 300
WAL_GOAL_MB_S = 100.0
WAL_PUSH_GOAL_SECONDS = 0.3


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    value: float
    limit: float  # the value must not exceed it (at_least: must reach it)
    at_least: bool = False

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit


def summarize(db_mb: float, rounds: list[dict[str, Result]], machine: dict[str, Any]) -> dict[str, Any]:
    samples = {name: [r[name].measurement.seconds for r in rounds] for name in CASES}
    runs = {name: statistics.median(values) for name, values in samples.items()}
    # Peak memory: the largest seen in any round (a peak, not a typical value).
    peak = {name: max(r[name].measurement.peak_rss_mb for r in rounds) for name in CASES}
    cpu = {name: statistics.median(r[name].measurement.cpu_seconds for r in rounds) for name in CASES}
    stored = {name: rounds[-1][name].stored_bytes / MB for name in CASES
              if rounds[-1][name].stored_bytes is not None}
    reported = {name: statistics.median(r[name].reported_seconds for r in rounds) for name in CASES
                if rounds[-1][name].reported_seconds is not None}
    wal = {name: median_figures([r[name].figures or {} for r in rounds]) for name in WAL_CASES}
    ratios = {
        "backup_vs_pipe": runs["pgdr_backup_file"] / runs["plain_pipe"],
        "backup_vs_pgbackrest": runs["pgdr_backup_file"] / runs["pgbackrest_backup"],
        "restore_vs_bare": runs["pgdr_restore_temp"] / runs["bare_restore"],
        "empty_backup_seconds": runs["empty_backup"],
        "recover_table_vs_restore": runs["pgdr_recover_table"] / runs["pgdr_restore_temp"],
        "catalog_list_seconds": runs["catalog_list"],
        "catalog_status_seconds": runs["catalog_status"],
        "s3_backup_vs_file_backup": runs["pgdr_backup"] / runs["pgdr_backup_file"],
        # The snapshot's scan runs beside pg_dump: above 1, the backup waits for the digests.
        "digest_scan_vs_dump": runs["content_digests"] / runs["raw_dump"],
        "digest_scan_vs_counts": runs["content_digests"] / max(runs["row_counts"], 1e-3),
        "backup_cpu_vs_pipe": cpu["pgdr_backup_file"] / max(cpu["plain_pipe"], 1e-3),
        "backup_vs_raw_dump": runs["pgdr_backup"] / runs["raw_dump"],
        "backup_vs_old": runs["old_backup"] / runs["pgdr_backup"],
        "encrypted_backup_vs_backup": runs["pgdr_backup_encrypted"] / runs["pgdr_backup"],
        "prefect_fixed_cost_no_server_vs_server": runs["empty_backup_no_server"] / runs["empty_backup"],
        "physical_backup_vs_pgbackrest": runs["pgdr_basebackup"] / runs["pgbackrest_backup"],
        "physical_restore_vs_pgbackrest": runs["pgdr_restore_physical"] / runs["pgbackrest_restore"],
        "physical_backup_vs_logical": runs["pgdr_basebackup"] / runs["pgdr_backup_file"],
        # Sustained: WAL archived per second until the archive caught up, pushing ahead.
        "wal_throughput_mb_s": wal["wal_archive_parallel"]["wal_archived_mb_s"],
        "wal_throughput_serial_mb_s": wal["wal_archive_serial"]["wal_archived_mb_s"],
        "wal_generated_mb_s": wal["wal_archive_parallel"]["wal_generated_mb_s"],
        "wal_push_segment_seconds": runs["wal_push_segment"],
        **{key: wal["wal_archive_parallel"][key] for key in LAG_KEYS},
    }
    # Not empty_backup_no_server: most of its memory is the temporary Prefect server it starts.
    pgdr_peak = max(mb for name, mb in peak.items()
                    if name.startswith(("pgdr_", "catalog_")) or name == "empty_backup")
    targets = [
        Target("backup_vs_pipe", "pgdr backup (file repository) within 1.15x of the plain pipe",
               ratios["backup_vs_pipe"], 1.15),
        Target("backup_vs_pgbackrest", "pgdr backup (file repository) faster than pgBackRest's full backup",
               ratios["backup_vs_pgbackrest"], 1.0),
        Target("restore_vs_bare", "pgdr restore-temp within 1.2x of bare pg_restore -j",
               ratios["restore_vs_bare"], 1.2),
        Target("empty_backup_seconds", "empty backup, Prefect server running, within 1.5 s",
               ratios["empty_backup_seconds"], 1.5),
        Target("catalog_list_seconds", "list over the catalog's backups within 2 s",
               ratios["catalog_list_seconds"], 2.0),
        Target("catalog_status_seconds", "latest of every database (status) within 2 s",
               ratios["catalog_status_seconds"], 2.0),
        Target("pgdr_peak_rss_mb", f"every pgdr case under {PEAK_MB} MB peak memory", pgdr_peak, PEAK_MB),
        Target("wal_throughput_mb_s", f"WAL archived to a local repository at {WAL_GOAL_MB_S:.0f} MB/s "
               "or more (wal-push --jobs)", ratios["wal_throughput_mb_s"], WAL_GOAL_MB_S, at_least=True),
        Target("wal_push_segment_seconds", "one wal-push of a 16 MB segment within "
               f"{WAL_PUSH_GOAL_SECONDS} s", ratios["wal_push_segment_seconds"], WAL_PUSH_GOAL_SECONDS),
    ]
    return {
        "db_mb": round(db_mb, 1),
        "rounds": len(rounds),
        "runs": {k: round(v, 3) for k, v in runs.items()},
        "samples": {k: [round(v, 3) for v in values] for k, values in samples.items()},
        "peak_rss_mb": {k: round(v, 1) for k, v in peak.items()},
        "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
        "stored_mb": {k: round(v, 1) for k, v in stored.items()},
        "pgdr_reported_seconds": {k: round(v, 3) for k, v in reported.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "wal_archiving": wal,
        "targets": [{"name": t.name, "description": t.description, "value": round(t.value, 3),
                     "limit": t.limit, "at_least": t.at_least, "met": t.met} for t in targets],
        "machine": machine,
    }


def median_figures(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (the figures every round has)."""
    keys = set.intersection(*(set(r) for r in rounds)) if rounds else set()
    return {key: round(statistics.median(r[key] for r in rounds), 3) for key in sorted(keys)}


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (readable in a terminal, pasteable into the docs)."""
    db_mb = result["db_mb"]
    lines = [
        f"Database: {db_mb} MB (pg_database_size), median of {result['rounds']} round(s)",
        "",
        "| case | what | median s | CPU s | MB/s | peak RSS MB | stored MB | all runs (s) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, what in CASES.items():
        seconds = result["runs"][name]
        rate = f"{db_mb / seconds:.1f}" if name in _MOVES_DATA and seconds else "-"
        stored = result["stored_mb"].get(name)
        runs = ", ".join(f"{s:.1f}" for s in result["samples"][name])
        what = what.replace("|", "\\|")  # a pipe inside a Markdown cell
        lines.append(f"| {name} | {what} | {seconds:.1f} | {result['cpu_seconds'][name]:.1f} | {rate} | "
                     f"{result['peak_rss_mb'][name]:.0f} | "
                     f"{'-' if stored is None else f'{stored:.1f}'} | {runs} |")
    lines += ["", "| target | value | limit | met |", "|---|---:|---:|---|"]
    for target in result["targets"]:
        bound = ">=" if target["at_least"] else "<="
        lines.append(f"| {target['description']} | {target['value']:.2f} | {bound} {target['limit']} | "
                     f"{'yes' if target['met'] else 'NO'} |")
    lines += ["", "| WAL archiving | WAL MB | generated MB/s | archived MB/s | catch-up s | "
              "lag max (segments, s) | lag at end (segments, s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, wal in result["wal_archiving"].items():
        lines.append(f"| {name} | {wal['wal_generated_mb']:.0f} | {wal['wal_generated_mb_s']:.1f} | "
                     f"{wal['wal_archived_mb_s']:.1f} | {wal['catch_up_seconds']:.1f} | "
                     f"{wal['archive_lag_max_segments']:.0f}, {wal['archive_lag_max_seconds']:.1f} | "
                     f"{wal['archive_lag_end_segments']:.0f}, {wal['archive_lag_end_seconds']:.1f} |")
    lines += ["", "Inside the flow (pgdr's duration_seconds; the rest of the wall time is start-up): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in result["pgdr_reported_seconds"].items())]
    lines += ["", "Other ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items())]
    return "\n".join(lines)


def write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
