"""Secrets stay secret where they could slip out sideways: flow-run parameters of subflows,
gpg-agent, the environment of child processes."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import boto3
import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterId, FlowRunFilter, FlowRunFilterStartTime

from flows.backup import backup
from flows.drill import drill
from flows.failover import failover
from flows.restore import restore
from tasks import aws
from tests.support.secrets import PG_SECRET_PASSWORD, PG_SECRET_ROLE

NAME = "db.secrets-test.example.com"


def flow_runs_since(started: datetime) -> list[dict]:
    """Every flow run the Prefect server recorded since `started`, through its API
    (POST /api/flow_runs/filter), with its flow's name."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(
            after_=started)))
        flows = {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(
            any_=list({r.flow_id for r in runs}))))}
    return [{**r.model_dump(mode="json"), "flow_name": flows[r.flow_id]} for r in runs]


@pytest.fixture
def zone(s3) -> str:
    route53 = boto3.client("route53")
    zone_id = route53.create_hosted_zone(Name="secrets-test.example.com", CallerReference=uuid.uuid4().hex)[
        "HostedZone"]["Id"].split("/")[-1]
    aws.upsert_record(route53, aws.DnsRecord(zone_id, NAME, "CNAME", 300, "primary.example.com"), "primary")
    return zone_id


def test_no_password_reaches_any_flow_run_however_the_database_is_configured(
        pg, new_db, file_repo, zone, monkeypatch, secrets):
    source = new_db("secretsrc")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE vehicles AS SELECT g AS id FROM generate_series(1, 100) g")
    backup(db=source, repo=file_repo, tier="daily")
    dr_name, existing_name = f"dr_{uuid.uuid4().hex[:8]}", new_db("secretdst").rsplit("/", 1)[1]
    started = datetime.now(UTC)
    try:
        # DATABASE_URL with the password: failover -> restore; restore over an existing
        # database -> its pre-restore backup.
        monkeypatch.setenv("DATABASE_URL", pg.secret_url(dr_name))
        failover(zone_id=zone, record_name=NAME, record_value="dr.example.com", repo=file_repo)
        # A password given in a parameter: the caller's own run holds it, its subflow (the
        # pre-restore backup of the database it replaces) does not.
        restore(target=pg.secret_url(existing_name), repo=file_repo)
        # The runbook's DB_* names: drill -> failover (dry run) -> restore.
        monkeypatch.delenv("DATABASE_URL")
        for name, value in {"DB_HOST": "127.0.0.1", "DB_PORT": str(pg.port), "DB_USER": PG_SECRET_ROLE,
                            "DB_PASSWORD": PG_SECRET_PASSWORD, "DB_NAME": "postgres"}.items():
            monkeypatch.setenv(name, value)
        database = source.rsplit("/", 1)[1]
        report = drill(repo=file_repo, db=database, failover={
            "zone_id": zone, "record_name": NAME, "record_value": "dr.example.com", "db": database})
        assert report["ok"], report["problems"]
    finally:
        pg.drop_database(dr_name)

    runs = flow_runs_since(started)
    names = sorted(r["flow_name"] for r in runs)
    assert names == ["backup", "drill", "failover", "failover", "restore", "restore", "restore"], names
    assert all(r["state"]["type"] == "COMPLETED" for r in runs)
    [given] = [r for r in runs if r["flow_name"] == "restore" and r["parent_task_run_id"] is None]
    runs.remove(given)
    text = json.dumps(runs)
    assert PG_SECRET_ROLE in text  # the targets are there, as URLs without their password
    for secret in secrets:
        assert secret not in text, "a password reached a flow run's parameters"
