"""Fleet: back up (or verify) many databases on many servers, each as its own flow run.

list the fleet (configured URLs, databases discovered on servers) -> set each server's
concurrency limit -> one flow run per database, spread over the work pool's workers
(run_deployment) or run here -> report table -> the run fails if any database failed.

Each run holds a slot of its server's global concurrency limit while it works
(tasks.runs.server_slot), so no server is hit by more than its limit, whichever fleet,
schedule or machine started the runs. One database failing never stops the others.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timedelta
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.objects import State
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run as current_run

from pgdr.catalog import catalog
from pgdr.catalog.scan import backups_since
from pgdr.dr import fleet as fleets
from pgdr.ops.errors import ConfigError, FailedWithReport, PgdrError
from pgdr.ops.settings import check_tier, load_settings
from pgdr.postgres import dsn
from pgdr.storage.repository import Repository
from tasks.artifacts import Progress, Stopwatch, human_bytes, publish_table
from tasks.fleet import list_fleet, set_server_limits
from tasks.records import AuditedStep, audited, open_repo
from tasks.runs import FLOW_HOOKS, failure_reason, run_name

# The deployment each action dispatches to unless told otherwise (prefect.yaml).
DEPLOYMENTS = {"backup": "backup/fleet", "verify": "verify/fleet"}
# How far a worker's clock may lag this one's when finding the backup a run wrote.
CLOCK_SKEW = timedelta(minutes=5)


def check_deployment(name: str) -> None:
    """Refuse a deployment that does not exist before any run is started."""
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ConfigError(f"deployment {name} not found: register it (prefect deploy --all, see "
                          "prefect.yaml) or run the fleet here with --local") from None


def _child_parameters(action: str, member: fleets.Member, repo: str | None, tier: str,
                      verify_server: str | None) -> dict[str, Any]:
    if action == "backup":
        return {"db": member.url, "repo": repo, "tier": tier}
    return {"db": member.database, "repo": repo,
            "server": dsn.strip_password(verify_server) if verify_server else None}


def _run_here(action: str, parameters: dict[str, Any]) -> State:
    """The member's flow as a subflow of this run, in this process."""
    from flows.backup import backup
    from flows.verify import verify

    child = backup if action == "backup" else verify
    return child(**parameters, return_state=True)


def _run_on_pool(deployment: str, parameters: dict[str, Any]) -> State:
    """The member's flow as a run of the deployment, picked up by a worker of its pool;
    waits for it to end."""
    # Prefect types it as possibly a coroutine (its sync/async API); called here, it is a FlowRun.
    run: Any = run_deployment(name=deployment, parameters=parameters, timeout=None, poll_interval=2,
                              tags=["pgdr", "fleet"])
    state: State | None = run.state
    if state is None:
        raise PgdrError(f"flow run {run.id} of {deployment} has no state")
    return state


def _result(state: State, action: str, parameters: dict[str, Any], member: fleets.Member, repo: Repository,
            since: datetime) -> dict[str, Any] | None:
    """What a finished run produced: its return value when it ran here; for a backup run on
    a worker elsewhere, the backup it wrote, as the repository (the shared truth) lists it."""
    try:
        result = state.result()
        return result if isinstance(result, dict) else None
    except Exception:  # results of runs on workers are not persisted: look in the repository
        if action != "backup":
            return None
        written = backups_since(repo, member.database, parameters["tier"], since)
        return dict(written[-1].summary()) if written else None


def run_member(action: str, member: fleets.Member, parameters: dict[str, Any], deployment: str | None,
               repo: Repository) -> dict[str, Any]:
    """One database's run; whatever happens to it becomes a row of the report."""
    clock = Stopwatch()
    since = catalog.utcnow() - CLOCK_SKEW
    run_id, result = None, None
    try:
        state = _run_on_pool(deployment, parameters) if deployment else _run_here(action, parameters)
        run_id = str(state.state_details.flow_run_id)
        ok = state.is_completed()
        if ok:
            result, reason = _result(state, action, parameters, member, repo, since), None
        else:
            reason = failure_reason(state) or f"flow run ended {state.name}"
    except Exception as exc:  # the dispatch itself failed (no such deployment, API down)
        ok, reason = False, failure_reason(exc)
    logger = get_run_logger()
    if ok:
        logger.info("%s of %s: ok in %.1f s", action, member.database, clock.seconds)
    else:
        logger.error("%s of %s failed: %s", action, member.database, reason)
    return fleets.outcome_row(member, ok=ok, seconds=clock.seconds, result=result, reason=reason, run=run_id)


@flow(name="fleet", flow_run_name=run_name("fleet-{action}-{tier}"), log_prints=True, **FLOW_HOOKS)
def fleet(action: str = "backup", databases: list[str] | None = None, servers: list[str] | None = None,
          include: list[str] | None = None, exclude: list[str] | None = None, tier: str = "daily",
          repo: str | None = None, host_limit: int | None = None, max_parallel: int = 8,
          deployment: str | None = None, local: bool = False,
          verify_server: str | None = None) -> dict[str, Any]:
    """Back up (or verify) every database of the fleet, each as its own flow run: on the
    work pool's workers through `deployment` (default backup/fleet or verify/fleet), or in
    this process with local=True. Fails if any database failed; the report lists them all."""
    settings = load_settings()
    if action not in DEPLOYMENTS:
        raise ConfigError(f"unknown fleet action {action!r}: choose backup or verify")
    check_tier(tier)
    if max_parallel < 1 or (host_limit is not None and host_limit < 1):
        raise ConfigError("max_parallel and host_limit must be at least 1")
    if action == "verify" and not (verify_server or settings.db_url):
        raise ConfigError("a fleet verify restores into temporary databases: pass --verify-server URL "
                          "or set DATABASE_URL")
    target = None if local else deployment or DEPLOYMENTS[action]
    if target:
        check_deployment(target)
    repository = open_repo(repo or settings.repo_url, settings)  # a bad URL fails here, before anything runs
    with audited(repository, settings, f"fleet-{action}", type=action, source="-",
                 destination=repository.url) as step:
        members = list_fleet(list(databases or settings.fleet_databases),
                             list(servers or settings.fleet_servers), list(include or []),
                             list(exclude or []))
        # Backups work on each database's server; verifications on the server they restore to.
        limited = (members if action == "backup"
                   else [fleets.Member.of(verify_server or settings.db_url or "")])
        limits = set_server_limits(sorted({m.host for m in limited}), host_limit, settings.host_limit)
        step.source = ", ".join(sorted(limits))

        def run_one(member: fleets.Member) -> dict[str, Any]:
            parameters = _child_parameters(action, member, repo, tier, verify_server)
            return run_member(action, member, parameters, target, repository)

        rows = dispatch(f"fleet {action}", members, run_one, max_parallel)
        return report(action, rows, limits, step)


def dispatch(label: str, members: list[fleets.Member], run_one: Callable[[fleets.Member], dict[str, Any]],
             max_parallel: int) -> list[dict[str, Any]]:
    """At most max_parallel runs at once, servers taking turns; rows in the fleet's order."""
    rows: dict[fleets.Member, dict[str, Any]] = {}
    with Progress(f"{label}: {len(members)} databases", len(members), terminal=False) as progress, \
            ThreadPoolExecutor(max_parallel, thread_name_prefix="fleet") as pool:
        # Each thread carries this run's context, so the runs it starts are its children.
        futures = {pool.submit(contextvars.copy_context().run, run_one, member): member
                   for member in fleets.interleave(members)}
        for future in as_completed(futures):
            rows[futures[future]] = future.result()
            progress.update(len(rows))
    return [rows[member] for member in members]


def report(action: str, rows: list[dict[str, Any]], limits: dict[str, int],
           step: AuditedStep) -> dict[str, Any]:
    """The fleet's table artifact and summary, what its audit record says of the databases;
    FailedWithReport if any failed."""
    seconds = step.seconds
    failed = [row for row in rows if row["status"] != "ok"]
    stored = sum(row["size_bytes"] or 0 for row in rows)
    headline = (f"Fleet {action}: {len(rows) - len(failed)} of {len(rows)} ok"
                + (f", {len(failed)} failed" if failed else "")
                + f" on {len({row['server'] for row in rows})} server(s)"
                + (f", {human_bytes(stored)} stored" if action == "backup" else "")
                + f", {seconds:.0f} s")
    publish_table(f"fleet-{action}", [
        {**row, "size": human_bytes(row["size_bytes"]) if row["size_bytes"] is not None else "-"}
        for row in rows], headline)
    summary = {"ok": not failed, "action": action, "databases": rows, "server_limits": limits,
               "flow_run": str(current_run.id), "duration_seconds": round(seconds, 1)}
    step.details.update(databases=len(rows), failed=[row["database"] for row in failed])
    if failed:
        raise FailedWithReport(f"{len(failed)} of {len(rows)} database(s) failed: " + "; ".join(
            f"{row['database']} ({row['reason']})" for row in failed), summary)
    return summary
