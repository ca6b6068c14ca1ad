"""`pgdr status`: the last backup, its age and size, and the last verification per database."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.cli import cli_json, run_cli


def test_status_shows_last_backup_and_last_verification_without_prefect(capsys, pg, fleet_db, file_repo):
    empty = cli_json(capsys, "status", "--repo", file_repo)
    assert empty["databases"] == []

    first = cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo, "--tier", "daily")
    cli_json(capsys, "restore-temp", first["backup_id"], "--repo", file_repo, "--server", pg.admin_url)
    latest = cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo, "--tier", "manual")

    (fleet,) = cli_json(capsys, "status", "--repo", file_repo)["databases"]
    assert fleet["database"] == "fleet" and fleet["backups"] == 2
    assert (fleet["last_backup"], fleet["tier"]) == (latest["backup_id"], "manual")
    assert fleet["size_bytes"] == latest["size_bytes"] and 0 <= fleet["age_hours"] < 0.1
    # The newest backup was never verified (its own state); the newest verified one is the first.
    assert (fleet["last_backup_state"], fleet["verified"]) == ("never verified", None)
    assert fleet["verified_backup"] == first["backup_id"] and fleet["verified_at"]

    code, out, _ = run_cli(capsys, "status", "--repo", file_repo)
    assert code == 0 and latest["backup_id"] in out and "never verified" in out
    assert f"{first['backup_id']} at {fleet['verified_at']}" in out

    # A read-only command: no Prefect import, no server.
    probe = ("import json, sys; from flows.cli import main;"
             "main(['status', '--repo', sys.argv[1], '--json']);"
             "print(json.dumps('prefect' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, file_repo], capture_output=True, text=True,
                          check=True, timeout=60)
    assert json.loads(done.stdout.splitlines()[-1]) is False
