"""Prefect tasks that write records: manifests, audit records (and their Prefect events), metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import get_client, get_run_logger, task

from pgdr.catalog.catalog import StoredManifest
from pgdr.ops import audit
from pgdr.ops.errors import first_line, redact
from pgdr.ops.metrics import put_metrics
from pgdr.ops.settings import Settings
from pgdr.storage.repository import Repository, open_repository
from tasks.artifacts import Stopwatch
from tasks.policy import retrying


def open_repo(url: str, settings: Settings) -> Repository:
    return open_repository(url, sse=settings.s3_sse, kms_key_id=settings.s3_kms_key_id,
                           region=settings.aws_region)


@task(name="write manifest", **retrying(3, 2))
def write_manifest(repo: Repository, manifest: StoredManifest) -> str:
    """The completion marker of a backup, files backup, base backup or storage snapshot:
    written last, so that nothing without one is ever taken for complete."""
    return manifest.write(repo)


@task(name="record audit", **retrying(3, 2))
def record_audit(repo: Repository, record: dict[str, Any]) -> str:
    """The runbook's audit record in the repository, and a Prefect event."""
    record = {**record, **_run_origin(record["user"])}
    key = audit.write_audit(repo, record)
    try:
        from prefect.events import emit_event

        emit_event(
            event=f"pgdr.{record['operation']}.{record['status']}",
            resource={"prefect.resource.id": f"pgdr.database.{record['source']}"},
            payload=record,
        )
    except Exception as exc:  # an event is a convenience; the record is stored
        get_run_logger().warning("could not emit the audit event: %s", exc)
    return key


def _run_origin(os_user: str) -> dict[str, str]:
    """Who started the flow run this runs in (its top run's, for a subflow), as the Prefect
    API says: {"started_by": how, "user": who, "os_user": the user this process runs as}."""
    from prefect.runtime import flow_run as current

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(current.root_flow_run_id or current.id)
            deployment = None
            if run.deployment_id:
                found = client.read_deployment(run.deployment_id)
                deployment = f"{client.read_flow(found.flow_id).name}/{found.name}"
    except Exception:  # no API, or no run: the record keeps the OS user
        return {}
    created_by = run.created_by
    how, who = audit.started_by(created_by.type if created_by else None,
                                created_by.display_value if created_by else None,
                                deployment, bool(run.auto_scheduled), os_user)
    return {"started_by": how, "user": who, "os_user": os_user}


def record_failure(repo: Repository, record: dict[str, Any]) -> None:
    """Audit a failed operation without hiding why it failed: if even the audit record
    cannot be written (the repository may be the problem), say so in the log. One attempt:
    when the store is what failed, retrying its audit record only delays the message."""
    try:
        record_audit.with_options(retries=0)(repo, record)
    except Exception as exc:
        get_run_logger().warning("could not write the audit record of this failure: %s", exc)


class AuditedStep:
    """One audited operation in progress: its clock, and what its audit record says. The
    block fills in what it learns (`type`, `source`, `details`) and, last, what only a
    completed block records (`succeeded`)."""

    def __init__(self, operation: str, type: str, source: str, destination: str,
                 details: dict[str, Any], clock: Stopwatch | None = None) -> None:
        self.operation, self.type, self.source, self.destination = operation, type, source, destination
        self.details = details
        self.clock = clock or Stopwatch()
        self._success: dict[str, Any] = {}

    @property
    def seconds(self) -> float:
        return self.clock.seconds

    def succeeded(self, *, status: str = "success", destination: str | None = None, size_bytes: int = 0,
                  **details: Any) -> None:
        """What the record of the completed block says beyond the common fields: its status
        when not plainly a success (a dry run; a prune that could not delete everything it
        should have), where the result went, its size, operation-specific details."""
        self._success = {"status": status, "destination": destination or self.destination,
                         "size_bytes": size_bytes, "details": details}

    def record(self, error: str | None = None) -> dict[str, Any]:
        """The record of the completed block or, given its error, of the failed one."""
        outcome: dict[str, Any] = (self._success if error is None
                                   else {"status": "failed", "details": {"error": error}})
        return audit.audit_record(
            self.operation, type=self.type, source=self.source,
            destination=outcome.get("destination", self.destination), status=outcome.get("status", "success"),
            size_bytes=outcome.get("size_bytes", 0), duration_seconds=self.clock.seconds,
            **{**self.details, **outcome.get("details", {})})


@contextmanager
def audited(repo: Repository, settings: Settings, operation: str, *, type: str, source: str, destination: str,
            failure_metrics: dict[str, float] | None = None, clock: Stopwatch | None = None,
            **details: Any) -> Iterator[AuditedStep]:
    """Time an operation and write its audit record: `success` (or what `succeeded` said)
    when the block completes (its writing may be retried, and a failure to write it fails
    the run), `failed` with the error's first line, secrets redacted, when it raises
    (record_failure: the error is never hidden), then the block's error goes on.
    failure_metrics are published (source as the database) on a failure; clock, when the
    operation's time started before its audit could."""
    step = AuditedStep(operation, type, source, destination, details, clock)
    try:
        yield step
    except Exception as exc:
        record_failure(repo, step.record(error=first_line(exc, settings.secrets())))
        if failure_metrics:
            publish_metrics(settings, step.source, **failure_metrics)
        raise
    record_audit(repo, step.record())


def publish_metrics(settings: Settings, database: str, **values: float) -> None:
    """CloudWatch metrics when configured; a metric that cannot be sent is a warning,
    never the reason a backup fails."""
    if not settings.cloudwatch_namespace:
        return
    try:
        put_metrics(settings.cloudwatch_namespace, database, values, region=settings.aws_region)
    except Exception as exc:
        get_run_logger().warning("could not publish metrics to CloudWatch: %s",
                                 redact(str(exc), settings.secrets()))
