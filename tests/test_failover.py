"""Failover (Route53, RDS) and DR drills on real PostgreSQL and a moto AWS endpoint."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import psycopg
import pytest

from flows.drill import drill
from tasks import aws, catalog
from tasks import drill as drilling
from tasks.errors import PgdrError
from tasks.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import counts_in

NAME = "db.pgdr-test.example.com"
PRIMARY = "primary.eu-west-1.example.com"
DR_HOST = "dr.us-east-1.example.com"


# --- pure: RTO/RPO arithmetic, phases, checklist -------------------------------------------


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


T0 = datetime(2026, 11, 3, 2, 0, 0, tzinfo=UTC)


def test_timeline_times_phases_with_the_given_clock():
    clock = FakeClock(T0)
    timeline = drilling.Timeline(clock)
    with timeline.phase("restore") as phase:
        clock.advance(90)
        phase.detail = "3 tables"
    with pytest.raises(PgdrError), timeline.phase("health checks"):
        clock.advance(2.5)
        raise PgdrError("SELECT 1 failed\nsecond line")
    phases = timeline.to_list()
    assert [(p["name"], p["duration_seconds"], p["ok"]) for p in phases] == [
        ("restore", 90.0, True), ("health checks", 2.5, False)]
    assert phases[1]["detail"] == "SELECT 1 failed"
    assert phases[0]["started_at"] == "2026-11-03T02:00:00.000Z"
    assert timeline.elapsed() == 92.5


def report_for(recovered_after: float | None, snapshot_age: float, rpo_target: float | None = None,
               archived_age: float | None = None, **items: bool | None) -> dict:
    started = T0
    return drilling.drill_report(
        scenario="database-corruption", targets=drilling.targets_for("database-corruption", None, rpo_target),
        started=started, finished=started + timedelta(seconds=1000),
        recovered=None if recovered_after is None else started + timedelta(seconds=recovered_after),
        snapshot_at=started - timedelta(seconds=snapshot_age),
        last_archived_at=None if archived_age is None else started - timedelta(seconds=archived_age),
        items={"backup_found": True, **items}, phases=[], repository="file:///r", database="fleet",
        backup_id="20261103T015500Z-daily-abcd", problems=[])


def test_rto_and_rpo_are_measured_from_the_drill_start():
    report = report_for(recovered_after=600, snapshot_age=180)
    assert (report["rto_seconds"], report["rpo_seconds"]) == (600, 180)
    assert report["rto_met"] and report["rpo_met"] and report["ok"] and report["missed"] == []
    assert report["rpo_source"] == "backup-snapshot"
    assert report["restorable_point"] == "2026-11-03T01:57:00.000Z"


def test_targets_are_compared_at_their_boundary():
    exactly = report_for(recovered_after=30 * 60, snapshot_age=5 * 60)
    assert exactly["rto_met"] and exactly["rpo_met"]
    over = report_for(recovered_after=30 * 60 + 1, snapshot_age=5 * 60 + 1)
    assert not over["rto_met"] and not over["rpo_met"] and not over["ok"]
    assert [m.split()[0] for m in over["missed"]] == ["RTO", "RPO"]


def test_a_zero_rpo_target_is_missed_and_a_failed_restore_has_no_rto():
    report = report_for(recovered_after=None, snapshot_age=60, rpo_target=0, restored=False)
    assert report["rto_seconds"] is None and not report["rto_met"]
    assert "RTO not reached" in report["missed"][0] and "RPO 1.00 min" in report["missed"][1]
    ticks = {i["item"]: i["done"] for i in report["checklist"]}
    assert ticks["restored"] is False and ticks["rpo_met"] is False and ticks["failover_dry_run_ok"] is None


def test_archived_wal_newer_than_the_snapshot_sets_the_rpo():
    report = report_for(recovered_after=60, snapshot_age=3600, archived_age=20)
    assert report["rpo_seconds"] == 20 and report["rpo_source"] == "wal-archive" and report["rpo_met"]
    older = report_for(recovered_after=60, snapshot_age=100, archived_age=500)
    assert older["rpo_seconds"] == 100 and older["rpo_source"] == "backup-snapshot"


def test_scenarios_have_targets_and_overrides():
    assert drilling.targets_for("database-corruption") == drilling.Targets(30, 5)
    assert drilling.targets_for("region-failure", rpo_minutes=0).rpo_minutes == 0
    with pytest.raises(PgdrError, match="unknown scenario"):
        drilling.targets_for("meteor")
    assert drilling.drill_key(T0) == "drills/20261103T020000000000Z.json"


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def zone(s3) -> str:
    """A hosted zone whose NAME points at the primary region."""
    route53 = boto3.client("route53")
    zone_id = route53.create_hosted_zone(Name="pgdr-test.example.com", CallerReference=uuid.uuid4().hex)[
        "HostedZone"]["Id"].split("/")[-1]
    aws.upsert_record(route53, aws.DnsRecord(zone_id, NAME, "CNAME", 300, PRIMARY), "primary")
    return zone_id


def served(zone_id: str) -> aws.DnsRecord | None:
    return aws.read_record(boto3.client("route53"), zone_id, NAME, "CNAME")


@pytest.fixture
def health_url():
    """An HTTP endpoint answering 200 on /ok and 503 elsewhere."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def source_db(new_db) -> str:
    url = new_db("prod")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE vehicles (id int PRIMARY KEY, plate text)")
        conn.execute("INSERT INTO vehicles SELECT g, 'P-' || g FROM generate_series(1, 250) g")
        conn.execute("CREATE TABLE trips (id int PRIMARY KEY, vehicle int REFERENCES vehicles)")
        conn.execute("INSERT INTO trips SELECT g, 1 + g % 250 FROM generate_series(1, 1000) g")
    return url


@pytest.fixture
def dr_target(pg):
    """URL of a database that does not exist yet on the DR server (dropped afterwards)."""
    name = f"dr_{uuid.uuid4().hex[:10]}"
    yield pg.url(name)
    pg.drop_database(name)


def databases(pg) -> set[str]:
    with psycopg.connect(pg.admin_url) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def failover_args(repo: str, target: str, zone_id: str, *extra: str) -> list[str]:
    return ["failover", "--repo", repo, "--target", target, "--zone-id", zone_id, "--record-name", NAME,
            "--record-type", "CNAME", "--record-value", DR_HOST, "--ttl", "60", *extra]


# --- failover --------------------------------------------------------------------------------


def test_failover_restores_the_dr_copy_switches_dns_and_reports_rto(capsys, pg, source_db, s3_repo, zone,
                                                                     dr_target, health_url):
    backup = cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    result = cli_json(capsys, *failover_args(
        s3_repo, dr_target, zone, "--health-url", f"{health_url}/ok",
        "--health-sql", "SELECT count(*) = 250 FROM vehicles"))

    assert result["ok"] and not result["dry_run"] and result["backup_id"] == backup["backup_id"]
    assert result["selection"] == "checksum"  # never restore-tested before: said so
    assert counts_in(dr_target) == counts_in(source_db)
    now = served(zone)
    assert (now.value, now.ttl) == (DR_HOST, 60)
    assert result["dns"] == {"zone_id": zone, "name": NAME + ".", "type": "CNAME", "ttl": 60,
                                  "previous": PRIMARY, "value": DR_HOST, "changed": True}
    assert [p["name"] for p in result["phases"]] == [
        "read dns record", "choose backup", "restore and verify", "health checks", "dns switch"]
    assert all(p["ok"] for p in result["phases"])
    assert [h["ok"] for h in result["health"]] == [True, True, True]
    # The total runs from the start to the switch: at least every phase.
    assert result["rto_seconds"] >= sum(p["duration_seconds"] for p in result["phases"]) - 0.01
    repo = open_repository(s3_repo)
    audits = [json.loads(repo.get_bytes(i.key)) for i in repo.list("audit/")]
    done = [a for a in audits if a["operation"] == "failover"]
    assert len(done) == 1 and done[0]["status"] == "success"
    assert done[0]["details"]["dns"]["value"] == DR_HOST


def test_dry_run_restores_and_checks_but_changes_no_record(capsys, pg, source_db, s3_repo, zone, dr_target):
    cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    # A restore test earlier makes this backup the verified choice.
    cli_json(capsys, "restore-temp", "latest", "--repo", s3_repo, "--server", pg.admin_url)
    code, out, err = run_cli(capsys, *failover_args(s3_repo, dr_target, zone, "--dry-run"))
    assert code == 0, err
    assert f"would change {NAME}. CNAME {PRIMARY} (TTL 300) -> {NAME}. CNAME {DR_HOST} (TTL 60)" in out
    result = cli_json(capsys, *failover_args(s3_repo, dr_target, zone, "--dry-run"))
    assert result["selection"] == "verified" and result["dns"]["changed"] is False
    assert result["phases"][-1]["name"] == "dns switch (dry run)"
    assert (served(zone).value, served(zone).ttl) == (PRIMARY, 300)


def test_failed_verification_leaves_dns_untouched(capsys, pg, source_db, s3_repo, zone, dr_target):
    backup = cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    repo = open_repository(s3_repo)
    manifest = catalog.find_backup(repo, backup["backup_id"])
    raw = json.loads(manifest.to_json())
    raw["row_counts"]["public.vehicles"] += 1
    repo.put_bytes(manifest.manifest_key, json.dumps(raw).encode())

    code, out, err = run_cli(capsys, *failover_args(s3_repo, dr_target, zone), "--json")
    assert code == 1
    assert "failover stopped, DNS unchanged" in error_line(err) and "public.vehicles" in error_line(err)
    details = json.loads(out)
    assert details["ok"] is False and details["dns"] is None
    assert details["phases"][-1]["name"] == "restore and verify" and details["phases"][-1]["ok"] is False
    assert (served(zone).value, served(zone).ttl) == (PRIMARY, 300)
    assert dr_target.rsplit("/", 1)[1] not in databases(pg)


def test_failing_health_check_leaves_dns_untouched(capsys, source_db, s3_repo, zone, dr_target, health_url):
    cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    code, _, err = run_cli(capsys, *failover_args(s3_repo, dr_target, zone, "--health-url",
                                                  f"{health_url}/down"))
    assert code == 1 and "HTTP 503" in error_line(err)
    assert served(zone).value == PRIMARY


def test_rds_failover_restores_the_instance_waits_and_points_dns_at_it(capsys, s3_repo, zone):
    rds = boto3.client("rds")
    source = f"prod-{uuid.uuid4().hex[:6]}"
    rds.create_db_instance(DBInstanceIdentifier=source, Engine="postgres", DBInstanceClass="db.t3.micro",
                           AllocatedStorage=20, MasterUsername="pgdr", MasterUserPassword="not-a-secret-1")
    restored = f"{source}-dr"
    result = cli_json(capsys, "failover", "--repo", s3_repo, "--zone-id", zone, "--record-name", NAME,
                      "--rds-source-instance", source, "--rds-target-instance", restored,
                      "--rds-poll-seconds", "1", "--rds-timeout-minutes", "1")
    instance = rds.describe_db_instances(DBInstanceIdentifier=restored)["DBInstances"][0]
    assert instance["DBInstanceStatus"] == "available"
    assert result["rds"]["method"] == "point-in-time"
    assert result["rds"]["endpoint"]["Address"] == instance["Endpoint"]["Address"]
    assert served(zone).value == instance["Endpoint"]["Address"]
    assert [p["name"] for p in result["phases"]] == [
        "read dns record", "rds restore", "wait for rds instance", "health checks", "dns switch"]

    from_snapshot = cli_json(capsys, "failover", "--repo", s3_repo, "--zone-id", zone, "--record-name", NAME,
                             "--rds-source-instance", source, "--rds-target-instance", f"{source}-snap",
                             "--rds-from-snapshot", "--rds-poll-seconds", "1", "--dry-run")
    assert from_snapshot["rds"]["method"] == "snapshot"
    assert from_snapshot["rds"]["restored_from"].startswith(f"rds:{source}")
    assert served(zone).value == instance["Endpoint"]["Address"]  # dry run


def test_waiting_for_a_missing_rds_instance_fails_clearly(s3):
    with pytest.raises(PgdrError, match="did not become available"):
        aws.wait_until_available(boto3.client("rds"), "no-such-instance", timeout_seconds=2, poll_seconds=1)


# --- drill -----------------------------------------------------------------------------------


def test_drill_measures_rto_and_rpo_against_the_clock_and_writes_its_report(pg, source_db, file_repo):
    backup = drill_backup(source_db, file_repo)
    before = catalog.utcnow()
    report = drill(repo=file_repo, server=pg.admin_url, health_sql=["SELECT count(*) > 0 FROM trips"])
    after = catalog.utcnow()

    started = catalog.parse_iso(report["started_at"])
    assert before <= started <= after
    assert 0 < report["rto_seconds"] <= (after - before).total_seconds()
    snapshot = catalog.parse_iso(backup.snapshot_at)
    assert report["rpo_seconds"] == pytest.approx((started - snapshot).total_seconds(), abs=0.002)
    assert report["ok"] and report["rto_met"] and report["rpo_met"] and report["missed"] == []
    ticks = {i["item"]: i["done"] for i in report["checklist"]}
    assert ticks == {"backup_found": True, "checksum_verified": True, "restored": True,
                     "row_counts_validated": True, "health_checks_passed": True, "failover_dry_run_ok": None,
                     "rto_met": True, "rpo_met": True, "scratch_dropped": True}
    stored = json.loads(open_repository(file_repo).get_bytes(report["report_key"]))
    assert stored == json.loads(json.dumps(report))
    assert report["report_key"].startswith("drills/")
    assert not [d for d in databases(pg) if "_drill_" in d]


def drill_backup(db_url: str, repo_url: str) -> catalog.Manifest:
    from flows.backup import backup

    result = backup(db=db_url, repo=repo_url, tier="daily")
    return catalog.find_backup(open_repository(repo_url), result["backup_id"])


def test_drill_flags_a_missed_target_and_runs_the_failover_dry_run(capsys, pg, source_db, s3_repo, zone):
    cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    code, out, err = run_cli(capsys, "drill", "--repo", s3_repo, "--server", pg.admin_url,
                             "--scenario", "region-failure", "--rpo-target-minutes", "0",
                             "--with-failover-dry-run", "--zone-id", zone, "--record-name", NAME,
                             "--record-value", DR_HOST, "--json")
    assert code == 1, err
    report = json.loads(out)
    assert report["ok"] is False and report["rpo_met"] is False and report["rto_met"] is True
    assert report["targets"] == {"rto_minutes": 60, "rpo_minutes": 0}
    assert len(report["missed"]) == 1 and report["missed"][0].startswith("RPO")
    ticks = {i["item"]: i["done"] for i in report["checklist"]}
    assert ticks["failover_dry_run_ok"] is True and ticks["rpo_met"] is False and ticks["scratch_dropped"]
    assert "would change" in next(p for p in report["phases"] if p["name"] == "failover dry-run")["detail"]
    assert served(zone).value == PRIMARY
    assert not [d for d in databases(pg) if "_drill" in d]
    assert open_repository(s3_repo).head(report["report_key"])


def test_drill_takes_its_rpo_from_the_wal_archive_when_there_is_one(pg, source_db, file_repo, tmp_path):
    from tasks import wal

    backup = drill_backup(source_db, file_repo)
    time.sleep(1.1)  # times are kept to the second: archive in a later one than the snapshot
    segment = tmp_path / "000000010000000000000003"
    segment.write_bytes(b"\0" * 8192)
    wal.push(open_repository(file_repo), backup.database, segment)
    archived = catalog.parse_iso(wal.archive_status(open_repository(file_repo),
                                                    backup.database)["last_archived_at"])
    assert archived > catalog.parse_iso(backup.snapshot_at)
    report = drill(repo=file_repo, server=pg.admin_url)
    started = catalog.parse_iso(report["started_at"])
    assert report["rpo_seconds"] == pytest.approx((started - archived).total_seconds(), abs=0.002)
