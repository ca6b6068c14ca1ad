"""`make demo`: the real backup -> list -> verify -> restore path on a throwaway server.

Starts a private PostgreSQL 15 under .demo/, builds the sample fleet database, backs it
up into the local file repository .demo/repo (the embedded default kind of repository),
lists it, verifies it by a test restore with great-expectations, restores it into a new
database, and prints what happened. Safe to run again: the server is recreated each time,
the repository keeps every backup.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".demo" / "prefect"))

from flows.cli import main as pgdr  # noqa: E402
from pgdr.demo.sample_data import create_fleet_database  # noqa: E402
from pgdr.postgres.cluster import LocalCluster  # noqa: E402

DEMO = ROOT / ".demo"
REPO = (DEMO / "repo").as_uri()
SIZE_MB = int(os.environ.get("DEMO_MB", "40"))


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(*argv: str) -> dict:
    """Run a pgdr command in this process and return its --json object."""
    print("$ pgdr " + " ".join(a if " " not in a else repr(a) for a in argv), flush=True)
    out = StringIO()
    with redirect_stdout(out):
        code = pgdr([*argv, "--json"])
    if code != 0:
        raise SystemExit(f"demo: `pgdr {argv[0]}` failed (exit {code})")
    return json.loads(out.getvalue())


def main() -> None:
    shutil.rmtree(DEMO / "cluster", ignore_errors=True)
    DEMO.mkdir(exist_ok=True)
    started = time.monotonic()

    step("A throwaway PostgreSQL server")
    with LocalCluster.create(DEMO / "cluster") as cluster:
        print(f"PostgreSQL 15 on 127.0.0.1:{cluster.port} (data in {DEMO / 'cluster'})")
        step(f"The sample fleet database (~{SIZE_MB} MB)")
        counts = create_fleet_database(cluster.url(), "fleet", SIZE_MB, replace=True)
        for table, rows in counts.items():
            print(f"  {table:<12} {rows:>10,} rows")

        step("Back up (pg_dump | zstd -> repository, manifest last)")
        backup = run("backup", "--db", cluster.url("fleet"), "--repo", REPO, "--tier", "daily")
        print(f"  {backup['backup_id']}: {backup['size_bytes'] / 2**20:.1f} MiB stored, "
              f"sha256 {backup['sha256'][:16]}…")

        step("List the repository")
        listed = run("list", "--repo", REPO)
        for item in listed["backups"]:
            print(f"  {item['backup_id']}  {item['database']}  {item['tier']}  "
                  f"{item['size_bytes'] / 2**20:.1f} MiB  {item['finished_at']}")

        step("Verify (checksum, test restore, great-expectations row counts)")
        verified = run("verify", "--repo", REPO, "--server", cluster.url(), "--db", "fleet")
        for entry in verified["databases"]:
            print(f"  {entry['database']}: {'ok' if entry['ok'] else 'FAILED'} "
                  f"({entry.get('tables', 0)} tables checked, backup {entry['age_hours']} h old)")

        step("Restore into a new database")
        restored = run("restore", "latest", "--db", "fleet", "--repo", REPO,
                       "--target", cluster.url("fleet_restored"))
        same = restored["row_counts"] == backup["row_counts"]
        print(f"  fleet_restored: verified={restored['verified']}, row counts equal the backup's: {same}")

    step("Summary")
    rows = sum(backup["row_counts"].values())
    print(f"  backed up {len(backup['row_counts'])} tables / {rows:,} rows of `fleet`, verified, restored "
          f"in {time.monotonic() - started:.0f} s")
    print(f"  repository: {REPO} ({len(listed['backups'])} backup(s) kept; the server was thrown away)")
    print("  try: .venv/bin/pgdr list --repo " + REPO)
    if not (same and restored["verified"] and verified["ok"]):
        raise SystemExit("demo: the restored database does not match the backup")


if __name__ == "__main__":
    main()
