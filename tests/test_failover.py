"""Failover (Route53, RDS) and DR drills on real PostgreSQL and a moto AWS endpoint."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import psycopg
import pytest

from flows.drill import drill
from pgdr.catalog import catalog, verification
from pgdr.catalog.scan import find_backup, list_backups
from pgdr.dr import drill as drilling
from pgdr.dr import failover as choosing
from pgdr.ops.errors import PgdrError
from pgdr.postgres import health
from pgdr.storage import aws
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import counts_in

NAME = "db.pgdr-test.example.com"
PRIMARY = "primary.eu-west-1.example.com"
DR_HOST = "localhost"  # resolves to the DR server (127.0.0.1)


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
               replayed_age: float | None = None, **items: bool | None) -> dict:
    started = T0
    snapshot = started - timedelta(seconds=snapshot_age)
    replayed = None if replayed_age is None else started - timedelta(seconds=replayed_age)
    return drilling.drill_report(
        scenario="database-corruption", targets=drilling.targets_for("database-corruption", None, rpo_target),
        started=started, finished=started + timedelta(seconds=1000),
        recovered=None if recovered_after is None else started + timedelta(seconds=recovered_after),
        restored=drilling.restored_point(snapshot, replayed, pitr=replayed_age is not None),
        items={"backup_found": True, **items}, phases=[], repository="file:///r", database="fleet",
        backup_id="20261103T015500Z-daily-abcd", problems=[])


def test_rto_and_rpo_are_measured_from_the_drill_start():
    report = report_for(recovered_after=600, snapshot_age=180)
    assert (report["rto_seconds"], report["rpo_seconds"]) == (600, 180)
    assert report["rto_met"] and report["rpo_met"] and report["ok"] and report["missed"] == []
    assert report["rpo_source"] == "backup-snapshot"
    assert report["restored_point"] == "2026-11-03T01:57:00.000Z"
    assert drilling.drill_metrics(report) == {"DrillFailed": 0, "DrillRTOSeconds": 600,
                                              "DrillRPOSeconds": 180}


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
    assert drilling.drill_metrics(report) == {"DrillFailed": 1, "DrillRPOSeconds": 60}


def test_the_rpo_comes_from_what_was_restored_never_from_wal_that_was_not_replayed():
    snapshot, later = T0 - timedelta(hours=1), T0 - timedelta(seconds=20)
    # A dump restore brings back its snapshot, however much WAL was archived after it.
    assert drilling.restored_point(snapshot, later) == (snapshot, "backup-snapshot")
    # Point-in-time recovery: the last transaction actually replayed.
    assert drilling.restored_point(snapshot, later, pitr=True) == (later, "replayed-wal")
    # Nothing replayed: the base backup's own point.
    assert drilling.restored_point(snapshot, None, pitr=True) == (snapshot, "base-backup")
    report = report_for(recovered_after=60, snapshot_age=3600, replayed_age=20)
    assert report["rpo_seconds"] == 20 and report["rpo_source"] == "replayed-wal" and report["rpo_met"]


def manifest_at(snapshot: datetime, tier: str = "daily") -> catalog.Manifest:
    backup_id = catalog.new_backup_id(snapshot, tier)
    return catalog.Manifest(
        backup_id=backup_id, database="fleet", tier=tier, started_at=catalog.iso(snapshot),
        finished_at=catalog.iso(snapshot), snapshot_at=catalog.iso(snapshot), server_version="15",
        tool_version="test", format="custom", compression="zstd", encryption=None, size_bytes=1, dump_bytes=1,
        sha256="0" * 64, row_counts={}, wal_lsn_start=None, source="test", data_key="dump.pgdr")


def test_a_backup_older_than_allowed_is_refused_unless_accepted():
    manifest = manifest_at(T0 - timedelta(hours=26))
    assert choosing.check_age(manifest, T0, 26, accept_stale=False) == 26 * 3600  # the boundary passes
    later = T0 + timedelta(seconds=1)
    with pytest.raises(choosing.StaleBackup, match=r"26.0 h old \(more than 26 h\).*--accept-stale"):
        choosing.check_age(manifest, later, 26, accept_stale=False)
    assert choosing.check_age(manifest, later, 26, accept_stale=True) == 26 * 3600 + 1
    with pytest.raises(PgdrError, match="more than zero"):
        choosing.check_age(manifest, T0, 0, accept_stale=True)


def test_the_record_must_name_the_checked_host_unless_forced():
    assert choosing.check_record_value(None, "dr-db.example.com", forced=False) == "dr-db.example.com"
    assert choosing.check_record_value("DR-DB.example.com.", "dr-db.example.com", False) == \
        "DR-DB.example.com."
    assert choosing.check_record_value("localhost", "127.0.0.1", False) == "localhost"  # resolves to it
    with pytest.raises(PgdrError, match=r"does not name dr-db\.example\.com.*--force-record-value"):
        choosing.check_record_value("primary.example.com", "dr-db.example.com", False)
    assert choosing.check_record_value("cname.example.com", "dr-db.example.com", True) == "cname.example.com"
    with pytest.raises(PgdrError, match="local socket"):
        choosing.check_record_value(None, "/var/run/postgresql", False)


def test_the_choice_skips_damaged_backups_and_safety_copies_and_names_its_database(tmp_path):
    import hashlib

    repo = open_repository(f"file://{tmp_path}/repo")

    def stored(database: str, minutes_ago: int, tier: str = "daily", damaged: bool = False) -> str:
        manifest = manifest_at(T0 - timedelta(minutes=minutes_ago), tier)
        manifest.database, data = database, f"{database} {minutes_ago}".encode()
        manifest.size_bytes, manifest.sha256 = len(data), hashlib.sha256(data).hexdigest()
        repo.put_bytes(f"{manifest.prefix}/{manifest.data_key}", b"X" + data[1:] if damaged else data)
        repo.put_bytes(manifest.manifest_key, manifest.to_json())
        return manifest.backup_id

    good = stored("fleet", 30)
    damaged = stored("fleet", 20, damaged=True)
    stored("fleet", 10, tier="pre-restore")
    stored("billing", 5)
    with pytest.raises(PgdrError, match="several databases"):
        choosing.choose_backup(repo, None, T0)
    choice = choosing.choose_backup(repo, None, T0, target_database="fleet")
    assert choice.manifest.backup_id == good and choice.age_seconds == 30 * 60
    assert [s.split(":")[0] for s in choice.skipped] == [damaged]
    assert choice.to_dict()["evidence"] == "checksum ok; restore never tested in this repository"
    with pytest.raises(PgdrError, match="is corrupt"):
        choosing.choose_backup(repo, "fleet", T0, backup_id=damaged)
    with pytest.raises(choosing.StaleBackup):
        choosing.choose_backup(repo, "fleet", T0, max_age_hours=0.25)


@pytest.mark.parametrize(("row", "ok"), [((True,), True), ((True, False), True), (None, False),
                                         ((False,), False), ((None,), False), ((1,), False), (("t",), False)])
def test_a_sql_check_passes_only_on_a_first_value_that_is_true(row, ok):
    assert health.passes(row) is ok


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
    # Older than allowed: refused before anything changes.
    code, _, err = run_cli(capsys, *failover_args(s3_repo, dr_target, zone,
                                                  "--max-backup-age-hours", "0.000001"))
    assert code == 1 and "--accept-stale" in error_line(err) and backup["backup_id"] in error_line(err)
    assert served(zone).value == PRIMARY and dr_target.rsplit("/", 1)[1] not in databases(pg)

    result = cli_json(capsys, *failover_args(
        s3_repo, dr_target, zone, "--health-url", f"{health_url}/ok", "--max-backup-age-hours", "0.000001",
        "--accept-stale", "--health-sql", "SELECT count(*) = 250 FROM vehicles"))
    assert result["ok"] and not result["dry_run"] and result["backup_id"] == backup["backup_id"]
    assert result["choice"]["evidence"] == "checksum ok; restore never tested in this repository"
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
    done = [a for a in audits if a["operation"] == "failover" and a["status"] == "success"]
    assert len(done) == 1 and done[0]["details"]["dns"]["value"] == DR_HOST


def test_failover_takes_the_newest_good_dr_backup_not_the_last_drilled_one(capsys, monkeypatch, pg, source_db,
                                                                           s3_repo, zone, dr_target):
    """Two buckets: backups reach the DR one through PGDR_REPLICA_REPO; a drill there marks
    the older backup verified; 43 rows and a newer backup follow; a newer pre-restore
    safety copy sits in the DR repository too."""
    dr_repo = s3_repo.replace("pgdr-test-", "pgdr-dr-")
    boto3.client("s3").create_bucket(Bucket=dr_repo.split("/")[2])
    monkeypatch.setenv("PGDR_REPLICA_REPO", dr_repo)
    drilled = cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    drilling_report = drill(repo=dr_repo, server=pg.admin_url, rto_target_minutes=10**6)
    assert drilling_report["backup_id"] == drilled["backup_id"]
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO vehicles SELECT g, 'N-' || g FROM generate_series(251, 293) g")
    newest = cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("DELETE FROM trips")
    safety = cli_json(capsys, "backup", "--db", source_db, "--repo", dr_repo, "--tier", "pre-restore")
    repo = open_repository(dr_repo)
    assert [m.backup_id for m in list_backups(repo)][-1] == safety["backup_id"]
    assert verification.read_verification(repo, find_backup(repo, drilled["backup_id"]))["verified"]

    result = cli_json(capsys, *failover_args(dr_repo, dr_target, zone))
    assert result["backup_id"] == newest["backup_id"]
    assert counts_in(dr_target) == {"public.trips": 1000, "public.vehicles": 293}
    # --backup pins one; its verification is shown as evidence.
    pinned = cli_json(capsys, *failover_args(dr_repo, dr_target, zone, "--backup", drilled["backup_id"],
                                             "--dry-run"))
    assert pinned["backup_id"] == drilled["backup_id"]
    assert pinned["choice"]["evidence"].startswith("checksum ok; restore verified")


def test_a_dry_run_after_a_real_failover_changes_nothing(capsys, pg, source_db, s3_repo, zone, dr_target):
    cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    cli_json(capsys, *failover_args(s3_repo, dr_target, zone))
    # Clients work on the DR database now.
    with psycopg.connect(dr_target, autocommit=True) as conn:
        conn.execute("CREATE TABLE after_failover (id int)")
        conn.execute("INSERT INTO after_failover SELECT generate_series(1, 7)")
        conn.execute("DELETE FROM trips WHERE id > 900")
    before = counts_in(dr_target)
    assert before["public.after_failover"] == 7 and before["public.trips"] == 900
    with_databases = databases(pg)

    code, out, err = run_cli(capsys, *failover_args(s3_repo, dr_target, zone, "--dry-run", "--ttl", "30",
                                                    "--health-sql", "SELECT count(*) = 250 FROM vehicles"))
    assert code == 0, err
    assert f"would change {NAME}. CNAME {DR_HOST} (TTL 60) -> {NAME}. CNAME {DR_HOST} (TTL 30)" in out
    assert counts_in(dr_target) == before
    assert databases(pg) == with_databases  # no safety copy, no scratch database left
    assert (served(zone).value, served(zone).ttl) == (DR_HOST, 60)
    result = cli_json(capsys, *failover_args(s3_repo, dr_target, zone, "--dry-run"))
    assert [p["name"] for p in result["phases"]] == [
        "read dns record", "choose backup", "restore and verify (scratch database)",
        "health checks (scratch database)", "drop scratch database", "dns switch (dry run)"]
    assert result["dns"]["changed"] is False and counts_in(dr_target) == before


def test_failed_verification_leaves_dns_untouched(capsys, pg, source_db, s3_repo, zone, dr_target):
    backup = cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    repo = open_repository(s3_repo)
    manifest = find_backup(repo, backup["backup_id"])
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


def test_health_checks_fail_closed_and_the_record_must_name_the_checked_host(capsys, pg, source_db, s3_repo,
                                                                             zone, dr_target, health_url):
    cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    # A record naming another host is refused before anything changes.
    code, _, err = run_cli(capsys, *failover_args(s3_repo, dr_target, zone, "--record-value",
                                                  "primary.eu-west-1.example.com"))
    assert code == 1 and "--force-record-value" in error_line(err)
    assert dr_target.rsplit("/", 1)[1] not in databases(pg) and served(zone).value == PRIMARY
    forced = cli_json(capsys, *failover_args(s3_repo, dr_target, zone, "--record-value", "dr-lb.example.com",
                                             "--force-record-value", "--dry-run"))
    assert forced["dns"]["value"] == "dr-lb.example.com"

    # Every check runs; each failed one is named, and DNS stays.
    code, _, err = run_cli(capsys, *failover_args(
        s3_repo, dr_target, zone, "--health-sql", "SELECT true FROM vehicles WHERE id < 0",
        "--health-sql", "SELECT 1", "--health-sql", "SELECT count(*) = 250 FROM vehicles",
        "--health-url", f"{health_url}/down"))
    assert code == 1 and served(zone).value == PRIMARY
    failed = error_line(err).split("health checks failed: ")[1].split("; ")
    assert failed == ["SELECT true FROM vehicles WHERE id < 0: no rows", "SELECT 1: returned 1",
                      f"{health_url}/down: HTTP 503"]


@pytest.fixture
def rds_source(s3) -> str:
    rds = boto3.client("rds")
    source = f"prod-{uuid.uuid4().hex[:6]}"
    rds.create_db_instance(DBInstanceIdentifier=source, Engine="postgres", DBInstanceClass="db.t3.micro",
                           AllocatedStorage=20, MasterUsername="pgdr", MasterUserPassword="not-a-secret-1")
    return source


def rds_args(zone_id: str, source: str, restored: str, *extra: str) -> list[str]:
    return ["failover", "--zone-id", zone_id, "--record-name", NAME, "--rds-source-instance", source,
            "--rds-target-instance", restored, "--rds-poll-seconds", "1", "--rds-timeout-minutes", "1",
            *extra]


def instances() -> set[str]:
    return {i["DBInstanceIdentifier"] for i in boto3.client("rds").describe_db_instances()["DBInstances"]}


def test_rds_dry_run_creates_nothing_and_a_failover_without_a_database_check_is_refused(capsys, rds_source,
                                                                                         zone, source_db):
    restored = f"{rds_source}-dr"
    before = instances()
    for extra in ((), ("--rds-from-snapshot",)):
        result = cli_json(capsys, *rds_args(zone, rds_source, restored, "--target", source_db, "--dry-run",
                                            *extra))
        assert instances() == before and served(zone).value == PRIMARY
        assert [p["name"] for p in result["phases"]] == [
            "read dns record", "check rds restore", "health checks (dry run)", "dns switch (dry run)"]
        assert result["phases"][1]["detail"].startswith("would restore")
    assert "snapshot rds:" in result["phases"][1]["detail"]

    # No check could reach the new instance: refused before anything is created.
    code, _, err = run_cli(capsys, *rds_args(zone, rds_source, restored))
    assert code == 1 and "--target" in error_line(err)
    assert instances() == before and served(zone).value == PRIMARY
    # A leftover instance of that name: the dry run says so instead of leaving the real run to fail.
    boto3.client("rds").create_db_instance(
        DBInstanceIdentifier=restored, Engine="postgres", DBInstanceClass="db.t3.micro", AllocatedStorage=20,
        MasterUsername="pgdr", MasterUserPassword="not-a-secret-1")
    code, _, err = run_cli(capsys, *rds_args(zone, rds_source, restored, "--target", source_db, "--dry-run"))
    assert code == 1 and f"an RDS instance named {restored} already exists" in error_line(err)


def test_rds_failover_checks_the_new_instance_and_points_dns_at_its_endpoint(capsys, monkeypatch, pg,
                                                                            rds_source, zone, source_db):
    """moto's instance is not a server: its endpoint is rewritten (a botocore hook) to
    this test's PostgreSQL, so the SQL checks really reach a database."""

    def to_local_server(client):
        def rewrite(parsed, **_):
            for found in parsed.get("DBInstances", []):
                if found["DBInstanceIdentifier"].endswith("-dr"):
                    found["Endpoint"] = {"Address": "localhost", "Port": pg.port}
        client.meta.events.register("after-call.rds.DescribeDBInstances", rewrite)

    monkeypatch.setattr(aws, "CLIENT_HOOKS", [to_local_server])
    restored = f"{rds_source}-dr"
    result = cli_json(capsys, *rds_args(zone, rds_source, restored, "--target", source_db,
                                        "--health-sql", "SELECT count(*) = 250 FROM vehicles"))
    assert restored in instances()
    assert result["rds"]["method"] == "point-in-time" and result["rds"]["endpoint"]["Address"] == "localhost"
    assert [h["ok"] for h in result["health"]] == [True, True]
    assert served(zone).value == "localhost"
    assert [p["name"] for p in result["phases"]] == [
        "read dns record", "check rds restore", "rds restore", "wait for rds instance", "health checks",
        "dns switch"]


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
    return find_backup(open_repository(repo_url), result["backup_id"])


def test_a_drill_that_misses_a_target_fails_notifies_and_reports_to_cloudwatch(capsys, monkeypatch, pg,
                                                                               source_db, s3_repo, zone):
    from tests.test_notify import Receiver

    receiver = Receiver()
    monkeypatch.setenv("PGDR_NOTIFY_URL", receiver.url)
    monkeypatch.setenv("PGDR_CLOUDWATCH_NAMESPACE", f"pgdr-drill-{uuid.uuid4().hex[:6]}")
    cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    code, out, err = run_cli(capsys, "drill", "--repo", s3_repo, "--server", pg.admin_url,
                             "--scenario", "region-failure", "--rpo-target-minutes", "0",
                             "--rto-target-minutes", "100000", "--with-failover-dry-run", "--zone-id", zone,
                             "--record-name", NAME, "--record-value", DR_HOST, "--json")
    receiver.server.shutdown()
    assert code == 1 and "DR drill needs attention: RPO" in error_line(err)
    report = json.loads(out)
    assert report["ok"] is False and report["rpo_met"] is False and report["rto_met"] is True
    assert report["targets"] == {"rto_minutes": 100000, "rpo_minutes": 0}
    assert len(report["missed"]) == 1 and report["missed"][0].startswith("RPO")
    ticks = {i["item"]: i["done"] for i in report["checklist"]}
    assert ticks["failover_dry_run_ok"] is True and ticks["rpo_met"] is False and ticks["scratch_dropped"]
    assert "would change" in next(p for p in report["phases"] if p["name"] == "failover dry-run")["detail"]
    assert served(zone).value == PRIMARY
    assert not [d for d in databases(pg) if "_drill" in d or "_dry_run" in d]
    assert open_repository(s3_repo).head(report["report_key"])
    # RTO counts from pgdr's own start (here: this process's).
    from flows.drill import process_started_at

    assert abs((catalog.parse_iso(report["started_at"]) - process_started_at()).total_seconds()) < 0.1
    # The run failed: the notification went out, and CloudWatch has the numbers.
    (message,) = receiver.messages
    assert (message["flow"], message["status"]) == ("drill", "failed") and "RPO" in message["reason"]
    listed = boto3.client("cloudwatch").list_metrics(Namespace=os.environ["PGDR_CLOUDWATCH_NAMESPACE"])
    names = {m["MetricName"] for m in listed["Metrics"]}
    assert {"DrillFailed", "DrillRTOSeconds", "DrillRPOSeconds"} <= names


def test_a_dump_drill_takes_its_rpo_from_the_dump_not_from_newer_wal_and_ends_failed(pg, source_db, file_repo,
                                                                                  tmp_path):
    from pgdr.pitr import wal

    backup = drill_backup(source_db, file_repo)
    time.sleep(1.1)  # times are kept to the second: archive in a later one than the snapshot
    segment = tmp_path / "000000010000000000000003"
    segment.write_bytes(b"\0" * 8192)
    wal.push(open_repository(file_repo), backup.database, segment)
    state = drill(repo=file_repo, server=pg.admin_url, rpo_target_minutes=0, return_state=True)
    assert state.is_failed()
    report = state.result(raise_on_failure=False).details
    started = catalog.parse_iso(report["disaster_at"])
    assert report["rpo_source"] == "backup-snapshot"
    assert report["rpo_seconds"] == pytest.approx((started - backup.snapshot).total_seconds(), abs=0.002)
