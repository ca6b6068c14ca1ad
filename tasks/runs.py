"""A flow run's own glue: run names, failure/success notification hooks, server concurrency slots."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import get_client, get_run_logger
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

from pgdr.dr import fleet
from pgdr.ops import notify
from pgdr.ops.errors import PgdrError, redact
from pgdr.ops.settings import Settings, load_settings


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


def _database_of(parameters: dict[str, Any], settings: Settings) -> str | None:
    """The database a run was about, from its parameters (a URL or a name) or the settings."""
    from pgdr.postgres.dsn import database_name

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


def _name_part(value: Any) -> str:
    """A parameter as a piece of a run name: a PostgreSQL URL or DSN as its database name
    (a URL may hold a password), a list as its items, at most 40 characters."""
    from pgdr.postgres.dsn import database_name

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
    from pgdr.postgres.dsn import database_name

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
