"""The benchmark's numbers: medians, ratios, targets, a table and latest.json."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cases import Result
from bench.measure import MB

# name -> what it measures, in the order the table shows them.
CASES = {
    "raw_dump": "pg_dump -Fc -Z0 > /dev/null (lower bound)",
    "old_backup": "old: pg_dump | gzip > file; upload (boto3)",
    "pgdr_backup": "pgdr backup to S3",
    "pgdr_backup_encrypted": "pgdr backup to S3, gpg-encrypted",
    "old_restore": "old: download; gunzip | psql",
    "bare_restore": "pg_restore -j of the same dump",
    "pgdr_restore_temp": "pgdr restore-temp (checksum + row counts)",
    "empty_backup": "pgdr backup, empty db, Prefect server running",
    "empty_backup_no_server": "pgdr backup, empty db, temporary Prefect server",
}
# Cases whose throughput means something (they move the whole database).
_MOVES_DATA = {"raw_dump", "old_backup", "pgdr_backup", "pgdr_backup_encrypted", "old_restore",
               "bare_restore", "pgdr_restore_temp"}
BACKUP_PEAK_MB = 300


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    value: float
    limit: float
    at_least: bool  # True: value must be >= limit; False: <= limit

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit


def summarize(db_mb: float, rounds: list[dict[str, Result]], machine: dict[str, Any]) -> dict[str, Any]:
    samples = {name: [r[name].measurement.seconds for r in rounds] for name in CASES}
    runs = {name: statistics.median(values) for name, values in samples.items()}
    # Peak memory: the largest seen in any round (a peak, not a typical value).
    peak = {name: max(r[name].measurement.peak_rss_mb for r in rounds) for name in CASES}
    stored = {name: rounds[-1][name].stored_bytes / MB for name in CASES
              if rounds[-1][name].stored_bytes is not None}
    reported = {name: statistics.median(r[name].reported_seconds for r in rounds) for name in CASES
                if rounds[-1][name].reported_seconds is not None}
    ratios = {
        "backup_vs_old": runs["old_backup"] / runs["pgdr_backup"],
        "backup_vs_raw_dump": runs["pgdr_backup"] / runs["raw_dump"],
        "encrypted_backup_vs_raw_dump": runs["pgdr_backup_encrypted"] / runs["raw_dump"],
        "restore_vs_bare": runs["pgdr_restore_temp"] / runs["bare_restore"],
        "old_restore_vs_restore": runs["old_restore"] / runs["pgdr_restore_temp"],
        "prefect_fixed_cost_no_server_vs_server": runs["empty_backup_no_server"] / runs["empty_backup"],
    }
    targets = [
        Target("backup_vs_old", "pgdr backup at least 4x faster than the old way",
               ratios["backup_vs_old"], 4.0, True),
        Target("backup_vs_raw_dump", "pgdr backup within 1.3x of the raw dump",
               ratios["backup_vs_raw_dump"], 1.3, False),
        Target("encrypted_backup_vs_raw_dump", "encrypted pgdr backup within 1.5x of the raw dump",
               ratios["encrypted_backup_vs_raw_dump"], 1.5, False),
        Target("backup_peak_rss_mb", f"pgdr backup peak memory under {BACKUP_PEAK_MB} MB",
               max(peak["pgdr_backup"], peak["pgdr_backup_encrypted"]), BACKUP_PEAK_MB, False),
        Target("restore_vs_bare", "pgdr restore-temp within 1.3x of bare pg_restore -j",
               ratios["restore_vs_bare"], 1.3, False),
    ]
    return {
        "db_mb": round(db_mb, 1),
        "rounds": len(rounds),
        "runs": {k: round(v, 3) for k, v in runs.items()},
        "samples": {k: [round(v, 3) for v in values] for k, values in samples.items()},
        "peak_rss_mb": {k: round(v, 1) for k, v in peak.items()},
        "stored_mb": {k: round(v, 1) for k, v in stored.items()},
        "pgdr_reported_seconds": {k: round(v, 3) for k, v in reported.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": [{"name": t.name, "description": t.description, "value": round(t.value, 3),
                     "limit": t.limit, "met": t.met} for t in targets],
        "machine": machine,
    }


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (readable in a terminal, pasteable into the docs)."""
    db_mb = result["db_mb"]
    lines = [
        f"Database: {db_mb} MB (pg_database_size), median of {result['rounds']} round(s)",
        "",
        "| case | what | median s | MB/s | peak RSS MB | stored MB | all runs (s) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, what in CASES.items():
        seconds = result["runs"][name]
        rate = f"{db_mb / seconds:.1f}" if name in _MOVES_DATA and seconds else "-"
        stored = result["stored_mb"].get(name)
        runs = ", ".join(f"{s:.1f}" for s in result["samples"][name])
        what = what.replace("|", "\\|")  # a pipe inside a Markdown cell
        lines.append(f"| {name} | {what} | {seconds:.1f} | {rate} | {result['peak_rss_mb'][name]:.0f} | "
                     f"{'-' if stored is None else f'{stored:.1f}'} | {runs} |")
    lines += ["", "| target | value | limit | met |", "|---|---:|---:|---|"]
    for target in result["targets"]:
        bound = ">=" if target["name"] == "backup_vs_old" else "<="
        lines.append(f"| {target['description']} | {target['value']:.2f} | {bound} {target['limit']} | "
                     f"{'yes' if target['met'] else 'NO'} |")
    lines += ["", "Inside the flow (pgdr's duration_seconds; the rest of the wall time is start-up): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in result["pgdr_reported_seconds"].items())]
    lines += ["", "Other ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items())]
    return "\n".join(lines)


def write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
