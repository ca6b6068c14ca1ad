"""What an operator sees of runs: their names in the Prefect API, one notification per
failure, audit records that say who and from where."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

from prefect import get_client

from flows.backup import backup
from flows.restore import restore
from pgdr.catalog.scan import find_backup
from pgdr.ops import audit
from pgdr.storage.repository import open_repository
from tasks.runs import name_from
from tests.support.cli import cli_json, run_cli
from tests.test_failover import dr_target, failover_args, source_db, zone  # noqa: F401 - fixtures
from tests.test_notify import receiver  # noqa: F401 - fixture


def run_name_of(state: Any) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


def test_run_names_say_which_database_tier_and_target(pg, fleet_db, new_db, file_repo):
    backed_up = backup(db=pg.secret_url("fleet"), repo=file_repo, return_state=True)
    assert run_name_of(backed_up) == "backup-fleet-manual"  # the name, never the URL's password
    target = new_db("into")
    restored = restore(backup_id="latest", target=target, repo=file_repo, db="fleet",
                       pre_restore_backup=False, return_state=True)
    assert run_name_of(restored) == f"restore-fleet-into-{target.rsplit('/', 1)[1]}"


def test_run_name_templates_take_the_first_parameter_that_is_set():
    def configured() -> str:
        return "app"

    params = {"db": None, "target": "postgresql://u:pw@h/prod", "tier": "daily", "tables": ["a", "b"]}
    assert name_from("backup-{db|$db}-{tier}", params, configured) == "backup-app-daily"
    assert name_from("restore-{db|target}-into-{target}", params, configured) == "restore-prod-into-prod"
    assert name_from("prune-{db|all}", params, configured) == "prune-all"
    assert name_from("recover-{tables}", params, configured) == "recover-a+b"
    assert "pw" not in name_from("x-{target}", {"target": "host=h dbname=prod password=pw"}, configured)


def test_a_failed_failover_notifies_once(capsys, monkeypatch, receiver, pg, source_db, s3_repo,  # noqa: F811
                                         zone, dr_target):  # noqa: F811
    backup_summary = cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    repo = open_repository(s3_repo)
    manifest = find_backup(repo, backup_summary["backup_id"])
    raw = json.loads(manifest.to_json())
    raw["row_counts"]["public.vehicles"] += 1  # the restore's verification fails
    repo.put_bytes(manifest.manifest_key, json.dumps(raw).encode())
    monkeypatch.setenv("PGDR_NOTIFY_URL", receiver.url)
    code, _out, _err = run_cli(capsys, *failover_args(s3_repo, dr_target, zone))
    assert code == 1
    assert [m["flow"] for m in receiver.messages] == ["failover"]


def test_audit_records_say_who_started_the_run_and_from_which_address(capsys, fleet_db, file_repo):
    cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo)
    repo = open_repository(file_repo)
    records = [json.loads(repo.get_bytes(o.key)) for o in repo.list("audit/")]
    (record,) = [r for r in records if r["operation"] == "backup"]
    assert record["started_by"] == "cli" and record["user"] == audit.current_user() == record["os_user"]
    assert ipaddress.ip_address(record["ip_address"])
    assert record["host"] == socket.gethostname()


def test_who_started_a_run_follows_what_the_api_says():
    assert audit.started_by("AUTOMATION", "pgdr: retry", "backup/daily", False, "root") == \
        ("automation", "automation pgdr: retry")
    assert audit.started_by(None, None, "backup/daily", True, "root") == \
        ("schedule", "schedule of deployment backup/daily")
    assert audit.started_by(None, None, "backup/daily", False, "root") == \
        ("deployment", "deployment backup/daily")
    assert audit.started_by(None, None, None, False, "alice") == ("cli", "alice")
