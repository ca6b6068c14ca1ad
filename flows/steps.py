"""The named steps flows are made of: Prefect tasks around the plain functions in tasks/.

tasks/ never imports Prefect (the WAL commands must start in milliseconds); retries,
timeouts, tags, artifacts and progress live here.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import get_client, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.logging.loggers import flow_run_logger
from prefect.settings import get_current_settings
from prefect.tasks import exponential_backoff

from pgdr.catalog.catalog import StoredManifest
from pgdr.dr import fleet
from pgdr.ops import audit, notify
from pgdr.ops.errors import PgdrError, is_transient, redact
from pgdr.ops.metrics import put_metrics
from pgdr.ops.settings import Settings, load_settings
from pgdr.storage.repository import Repository, open_repository

ProgressListener = Callable[[str, int, int | None], None]
_listeners: list[ProgressListener] = []


def add_progress_listener(listener: ProgressListener) -> None:
    """The command line registers its progress bar here."""
    _listeners.append(listener)


class Progress:
    """One long operation's progress, as a context manager: a Prefect progress artifact,
    and the terminal's progress bar when a person is watching. The artifact is updated from
    a thread of its own, once a second at most: a call to the Prefect API never holds up
    the data. It reaches 100% only when the operation ends without an error."""

    def __init__(self, label: str, total: int | None, *, terminal: bool = True) -> None:
        self.label = label
        self.total = total
        # The terminal's bar counts bytes: a count of other things stays in the artifact.
        self.listeners = _listeners if terminal else []
        self.artifact_id = _quietly(create_progress_artifact, progress=0.0, description=label)
        self.done = 0
        self.finished = threading.Event()
        self.poster: threading.Thread | None = None

    def update(self, done: int) -> None:
        self.done = done
        for listener in self.listeners:
            listener(self.label, done, self.total)
        if self.artifact_id and self.total and self.poster is None:
            # With this context: it says which Prefect API to talk to.
            self.poster = threading.Thread(target=contextvars.copy_context().run, args=(self._post,),
                                           name="progress", daemon=True)
            self.poster.start()

    def _post(self) -> None:
        posted = -1
        while not self.finished.wait(1.0):
            if self.done != posted:
                posted = self.done
                percent = min(99.0, 100.0 * posted / (self.total or 1))
                _quietly(update_progress_artifact, self.artifact_id, percent)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.finished.set()
        if self.poster:
            self.poster.join()
        for listener in self.listeners:
            listener(self.label, -1, self.total)
        if self.artifact_id and exc_type is None:
            _quietly(update_progress_artifact, self.artifact_id, 100.0)


def _quietly(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Progress is a nicety, never a reason for a backup to fail."""
    try:
        return function(*args, **kwargs)
    except Exception:
        return None


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may succeed when tried again (pgdr.ops.errors.is_transient: a dropped
    connection, a throttled or briefly failing S3, a PostgreSQL shutting down), never a
    permanent error (bad credentials, a missing bucket or database, bad input, a checksum
    mismatch) nor a bug: retrying those only delays the message."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


# Multiplies every retry delay: tests shorten them; an operator may lengthen them. Read at
# import, because Prefect fixes a task's delays when the task is defined.
_RETRY_DELAY_FACTOR = float(os.environ.get("PGDR_RETRY_DELAY_FACTOR", "1"))


def retrying(times: int, first_delay: float) -> dict[str, Any]:
    """Task options: retry transient failures `times` times, the first after about
    first_delay seconds, doubling each time, with jitter so that runs that failed together
    do not retry together. Prefect logs each retry with its error and delay."""
    return {"retries": times,
            "retry_delay_seconds": exponential_backoff(first_delay * _RETRY_DELAY_FACTOR),
            "retry_jitter_factor": 0.5, "retry_condition_fn": transient_only}


def open_repo(url: str, settings: Settings) -> Repository:
    return open_repository(url, sse=settings.s3_sse, kms_key_id=settings.s3_kms_key_id,
                           region=settings.aws_region)


@task(name="write manifest", **retrying(3, 2))
def write_manifest(repo_url: str, settings: Settings, manifest: StoredManifest) -> str:
    """The completion marker of a backup, files backup, base backup or storage snapshot:
    written last, so that nothing without one is ever taken for complete."""
    return manifest.write(open_repo(repo_url, settings))


@task(name="record audit", **retrying(3, 2))
def record_audit(repo_url: str, settings: Settings, record: dict[str, Any]) -> str:
    """The runbook's audit record in the repository, and a Prefect event."""
    record = {**record, **_run_origin(record["user"])}
    key = audit.write_audit(open_repo(repo_url, settings), record)
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


def record_failure(repo_url: str, settings: Settings, record: dict[str, Any]) -> None:
    """Audit a failed operation without hiding why it failed: if even the audit record
    cannot be written (the repository may be the problem), say so in the log. One attempt:
    when the store is what failed, retrying its audit record only delays the message."""
    try:
        record_audit.with_options(retries=0)(repo_url, settings, record)
    except Exception as exc:
        get_run_logger().warning("could not write the audit record of this failure: %s", exc)


class AuditedStep:
    """One audited operation in progress: its clock, and what its audit record says. The
    block fills in what it learns (`type`, `source`, `details`) and, last, what only a
    success records (`succeeded`)."""

    def __init__(self, operation: str, type: str, source: str, destination: str,
                 details: dict[str, Any], clock: Stopwatch | None = None) -> None:
        self.operation, self.type, self.source, self.destination = operation, type, source, destination
        self.details = details
        self.clock = clock or Stopwatch()
        self._success: dict[str, Any] = {}

    @property
    def seconds(self) -> float:
        return self.clock.seconds

    def succeeded(self, *, destination: str | None = None, size_bytes: int = 0, **details: Any) -> None:
        """What the success record says beyond the common fields: where the result went,
        its size, operation-specific details."""
        self._success = {"destination": destination or self.destination, "size_bytes": size_bytes,
                         "details": details}

    def record(self, status: str, **details: Any) -> dict[str, Any]:
        success = self._success if status == "success" else {}
        return audit.audit_record(
            self.operation, type=self.type, source=self.source,
            destination=success.get("destination", self.destination), status=status,
            size_bytes=success.get("size_bytes", 0), duration_seconds=self.clock.seconds,
            **{**self.details, **success.get("details", {}), **details})


@contextmanager
def audited(repo_url: str, settings: Settings, operation: str, *, type: str, source: str, destination: str,
            failure_metrics: dict[str, float] | None = None, clock: Stopwatch | None = None,
            **details: Any) -> Iterator[AuditedStep]:
    """Time an operation and write its audit record: `success` when the block completes
    (its writing may be retried, and a failure to write it fails the run), `failed` with
    the error when it raises (record_failure: the error is never hidden), then the block's
    error goes on. failure_metrics are published (source as the database) on a failure;
    clock, when the operation's time started before its audit could."""
    step = AuditedStep(operation, type, source, destination, details, clock)
    try:
        yield step
    except Exception as exc:
        record_failure(repo_url, settings, step.record("failed", error=str(exc)))
        if failure_metrics:
            publish_metrics(settings, step.source, **failure_metrics)
        raise
    record_audit(repo_url, settings, step.record("success"))


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def artifact_key(kind: str, name: str) -> str:
    """`<kind>-<name>` as Prefect accepts artifact keys (lower-case ASCII letters, digits,
    dashes): a name that is not one already becomes its ASCII slug plus a short hash, so
    that any database name works and two names never share a key."""
    if re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name):
        return f"{kind}-{name}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{kind}-{slug}-{digest}" if slug else f"{kind}-{digest}"


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    create_table_artifact(key=key, table=rows, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=key, markdown=markdown, description=description)


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TB"


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


# --- one server, many runs ----------------------------------------------------------------


@contextmanager
def server_slot(db_url: str) -> Iterator[None]:
    """Hold a slot of the server's global concurrency limit (`pgdr-host:<host>:<port>`)
    while working on it, when that limit exists: the fleet flow creates it, an operator may
    too (`prefect gcl create`). Without it, runs are not limited. The slot is a lease: if
    this process dies, the server frees it when the lease expires."""
    name = fleet.host_limit_name(db_url)
    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        yield
        return
    get_run_logger().info("waiting for a slot of %s", name)
    with concurrency(name, occupy=1, strict=True):
        yield


# --- notifications and metrics ------------------------------------------------------------


def _database_of(parameters: dict[str, Any], settings: Settings) -> str | None:
    """The database a run was about, from its parameters (a URL or a name) or the settings."""
    from pgdr.postgres.postgres import database_name

    for key in ("db", "target", "database"):
        value = parameters.get(key)
        if isinstance(value, str) and value:
            return database_name(value) if "://" in value or "=" in value else value
    return database_name(settings.db_url) if settings.db_url else None


def _failed_step(flow_run_id: Any) -> str | None:
    """The name of the run's last failed task (None when the flow's own code failed)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                type=TaskRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED]))))
    if not runs:
        return None
    ended = [(run.end_time, run) for run in runs if run.end_time]
    last = max(ended, key=lambda pair: pair[0])[1] if ended else runs[0]
    return last.name.removesuffix(f"-{last.dynamic_key[:3]}")  # run names: "<task name>-<key[:3]>"


def failure_reason(outcome: Any) -> str | None:
    """Why a run failed, in one line: from its exception, or from its final state."""
    if isinstance(outcome, BaseException):
        return notify.one_line(outcome)
    try:
        error = outcome.result(raise_on_failure=False)
    except Exception:  # the result is not readable here: the state's message says enough
        error = None
    return notify.one_line(error if isinstance(error, BaseException) else outcome.message)


def _run_url(flow_run_id: Any) -> str | None:
    ui_url = get_current_settings().ui_url
    return f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui_url else None


def notify_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook: tell the configured channel that a run failed (or, when
    PGDR_NOTIFY_ON_SUCCESS is set, succeeded). Never raises: the run's outcome stands."""
    try:
        settings = load_settings()
    except PgdrError:
        return  # the run itself reported the configuration error
    ok = state.is_completed()
    if not notify.configured(settings) or (ok and not settings.notify_on_success):
        return
    if flow_run.parent_task_run_id is not None:
        return  # a subflow (failover's restore, a fleet member): the run that called it reports
    logger = flow_run_logger(flow_run, flow)
    if not ok and flow_run.deployment_id is not None:
        from deployments.automations import server_notifies_failures

        try:
            if server_notifies_failures():
                return  # `pgdr automations apply` made the server the one that tells
        except Exception as exc:
            logger.warning("could not ask the server for its automations: %s", exc)
    try:
        notice = notify.Notice(
            flow=flow.name, ok=ok, database=_database_of(dict(flow_run.parameters or {}), settings),
            step=None if ok else _failed_step(flow_run.id) or f"{flow.name} (flow)",
            reason=None if ok else failure_reason(state),
            run_name=flow_run.name, run_url=_run_url(flow_run.id))
        notify.send(notice, settings)
    except Exception as exc:
        logger.warning("could not send the notification: %s", redact(str(exc), settings.secrets()))


# --- run names ------------------------------------------------------------------------------


def _name_part(value: Any) -> str:
    """A parameter as a piece of a run name: a PostgreSQL URL or DSN as its database name
    (a URL may hold a password), a list as its items, at most 40 characters."""
    from pgdr.postgres.postgres import database_name

    if isinstance(value, list | tuple):
        return "+".join(_name_part(item) for item in value[:3]) + ("+..." if len(value) > 3 else "")
    text = str(value)
    if text.startswith(("postgres://", "postgresql://")) or "dbname=" in text:
        text = database_name(text)
    return text[:40]


def name_from(template: str, parameters: dict[str, Any], configured_db: Callable[[], str | None]) -> str:
    """The run name that `template` gives these parameters: `{a|b|word}` is the first of
    parameters a, b that is set, else the word (not a parameter); `$db` is the configured
    database."""
    def field(match: re.Match[str]) -> str:
        for choice in match.group(1).split("|"):
            if choice == "$db":
                value = configured_db()
            else:
                value = parameters.get(choice) if choice in parameters else choice
            if value not in (None, "", [], ()):
                return _name_part(value)
        return "default"
    return re.sub(r"\{([^}]+)\}", field, template)


def run_name(template: str) -> Callable[[], str]:
    """`@flow(flow_run_name=run_name("backup-{db|$db}-{tier}"))`: the runs list of the Prefect
    UI says which database and tier a run was about."""
    def name() -> str:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        parameters: dict[str, Any] = {}
        if context is not None and context.flow is not None:
            defaults = inspect.signature(context.flow.fn).parameters.values()
            parameters = {p.name: p.default for p in defaults if p.default is not inspect.Parameter.empty}
            parameters.update(context.parameters or {})
        return name_from(template, parameters, _configured_database)
    return name


def _configured_database() -> str | None:
    from pgdr.postgres.postgres import database_name

    try:
        db_url = load_settings().db_url
    except PgdrError:
        return None
    return database_name(db_url) if db_url else None


# Every flow takes these: `@flow(name=..., **FLOW_HOOKS)`.
FLOW_HOOKS: dict[str, Any] = {
    "on_failure": [notify_hook],
    "on_crashed": [notify_hook],
    "on_completion": [notify_hook],
}


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
