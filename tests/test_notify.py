"""Notifications of failed (and succeeded) runs, audit events on the Prefect server, and
CloudWatch metrics on a moto endpoint."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
from prefect.settings import get_current_settings

from tests.support.cli import cli_json, error_line, run_cli
from tests.support.secrets import GPG_PASSPHRASE

HOOK_TOKEN = "T0ken-In-The-Webhook-Url"


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        received = self.messages

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{HOOK_TOKEN}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.server.shutdown()


def assert_no_secret(text: str, secrets: tuple[str, ...]) -> None:
    for secret in (*secrets, HOOK_TOKEN):
        assert secret not in text


def test_failed_backup_notifies_the_webhook_with_database_step_reason_and_link(
        capsys, monkeypatch, receiver, pg, file_repo, secrets):
    monkeypatch.setenv("PGDR_NOTIFY_URL", receiver.url)
    monkeypatch.setenv("PGDR_GPG_PASSPHRASE", GPG_PASSPHRASE)
    monkeypatch.setenv("DATABASE_URL", pg.secret_url("postgres"))
    code, _, err = run_cli(capsys, "backup", "--db", pg.secret_url("no_such_db"), "--repo", file_repo)
    assert code == 1 and "no_such_db" in error_line(err)

    (message,) = receiver.messages
    assert message["status"] == "failed" and message["ok"] is False
    assert message["flow"] == "backup" and message["database"] == "no_such_db"
    assert message["step"] == "dump database"
    assert 'database "no_such_db" does not exist' in message["reason"]
    assert "\n" not in message["reason"]
    assert "no_such_db" in message["text"] and message["reason"] in message["text"]
    ui_url = get_current_settings().ui_url
    assert ui_url and message["run_url"].startswith(f"{ui_url.rstrip('/')}/runs/flow-run/")
    assert_no_secret(json.dumps(message), secrets)


def test_failure_in_the_flow_itself_goes_through_a_prefect_notification_block(
        capsys, monkeypatch, receiver, pg, file_repo, secrets):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    CustomWebhookNotificationBlock(
        name="pgdr", url=receiver.url, json_data={"text": "{{subject}}", "body": "{{body}}"},
    ).save("pgdr-test-alerts", overwrite=True)
    monkeypatch.setenv("PGDR_NOTIFY_BLOCK", "custom-webhook/pgdr-test-alerts")
    code, _, _ = run_cli(capsys, "verify", "--repo", file_repo, "--db", "fleet", "--server", pg.secret_url())
    assert code == 1

    (message,) = receiver.messages
    assert message["text"] == "pgdr verify FAILED for fleet"
    assert "step: verify (flow)" in message["body"]
    assert "reason: no backup of fleet" in message["body"]
    assert "/runs/flow-run/" in message["body"]
    assert_no_secret(json.dumps(message), secrets)


def test_success_is_announced_only_when_asked_and_audit_events_reach_the_server(
        capsys, monkeypatch, receiver, fleet_db, file_repo):
    monkeypatch.setenv("PGDR_NOTIFY_URL", receiver.url)
    cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo, "--tier", "daily")
    assert receiver.messages == []

    monkeypatch.setenv("PGDR_NOTIFY_ON_SUCCESS", "1")
    # Events carry the time they were emitted, on this clock: the first backup's are older.
    started = datetime.now(UTC)
    result = cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo, "--tier", "daily")
    (message,) = receiver.messages
    assert message["status"] == "success" and message["subject"] == "pgdr backup succeeded for fleet"
    assert message["step"] is None and message["reason"] is None

    events = _events_since(started, "pgdr.backup.")
    assert [e.event for e in events] == ["pgdr.backup.success"]
    assert events[0].payload["details"]["backup_id"] == result["backup_id"]
    assert events[0].resource.id == "pgdr.database.fleet"


def _events_since(since: datetime, prefix: str) -> list:
    """The server's events; emitted events arrive asynchronously, so wait a little."""
    from prefect.client.orchestration import get_client

    for _ in range(60):
        with get_client(sync_client=True) as client:
            # limit: the client's default (100) is above what the 3.8 server accepts (50).
            page = client.read_events(EventFilter(event=EventNameFilter(prefix=[prefix]),
                                                  occurred=EventOccurredFilter(since=since)), limit=50)
        if page.events:
            return page.events
        time.sleep(0.5)
    return []


def _statistics(cloudwatch, name: str, database: str) -> dict:
    points = cloudwatch.get_metric_statistics(
        Namespace="UVIS/Backup", MetricName=name, Dimensions=[{"Name": "Database", "Value": database}],
        StartTime=datetime.now(UTC) - timedelta(hours=1), EndTime=datetime.now(UTC) + timedelta(hours=1),
        Period=3600, Statistics=["Sum", "Maximum", "SampleCount"])["Datapoints"]
    assert len(points) == 1, (name, points)
    return points[0]


def test_metrics_arrive_at_cloudwatch_with_the_database_dimension(capsys, monkeypatch, s3, pg, fleet_db,
                                                                  s3_repo):
    monkeypatch.setenv("PGDR_CLOUDWATCH", "1")
    backup = cli_json(capsys, "backup", "--db", fleet_db, "--repo", s3_repo, "--tier", "daily")
    restored = cli_json(capsys, "restore-temp", "latest", "--repo", s3_repo, "--server", pg.admin_url)
    checked = cli_json(capsys, "verify", "--repo", s3_repo, "--server", pg.admin_url)
    code, _, _ = run_cli(capsys, "backup", "--db", pg.url("no_such_db"), "--repo", s3_repo)
    assert code == 1

    cloudwatch = boto3.client("cloudwatch")
    listed = cloudwatch.list_metrics(Namespace="UVIS/Backup")["Metrics"]
    assert {m["MetricName"] for m in listed} == {
        "BackupFailureCount", "HoursSinceLastBackup", "BackupSizeBytes", "BackupDurationSeconds",
        "RestoreDurationSeconds", "VerifyFailureCount"}
    size = _statistics(cloudwatch, "BackupSizeBytes", "fleet")
    assert size["Maximum"] == backup["size_bytes"] and size["Unit"] == "Bytes"
    duration = _statistics(cloudwatch, "BackupDurationSeconds", "fleet")
    assert 0 < duration["Maximum"] <= backup["duration_seconds"] + 1
    restore = _statistics(cloudwatch, "RestoreDurationSeconds", "fleet")
    assert 0 < restore["Maximum"] <= restored["duration_seconds"] + 1
    verify = _statistics(cloudwatch, "VerifyFailureCount", "fleet")
    assert (verify["Sum"], verify["SampleCount"]) == (0, 1) and checked["ok"]
    age = _statistics(cloudwatch, "HoursSinceLastBackup", "fleet")
    assert age["SampleCount"] == 2 and 0 <= age["Maximum"] < 1  # backup (0) and verify (its age)
    assert _statistics(cloudwatch, "BackupFailureCount", "fleet")["Sum"] == 0
    assert _statistics(cloudwatch, "BackupFailureCount", "no_such_db")["Sum"] == 1
