"""Bring the DR copy up to date: copy every database backup, base backup, WAL file, files
backup and storage snapshot that PGDR_REPLICA_REPO lacks (backups made before the replica
was configured, or whose copy failed), then report how far the replica still lags."""

from __future__ import annotations

from typing import Any, TypedDict

from prefect import flow, get_run_logger

from pgdr.catalog import catalog
from pgdr.ops.errors import ConfigError
from pgdr.ops.settings import load_settings
from pgdr.storage import replica
from tasks.artifacts import Stopwatch
from tasks.records import audited, open_repo
from tasks.replicate import copy_missing
from tasks.runs import FLOW_HOOKS, run_name


class Replicated(TypedDict):
    repository: str
    replica: str | None  # None: no replica configured, nothing copied (the schedule's run)
    copied: dict[str, int]


class ReplicateResult(Replicated, total=False):
    """`pgdr replicate --json`: what was copied, by kind, and how far the replica lags."""

    lag: dict[str, Any]
    duration_seconds: float


@flow(name="replicate", flow_run_name=run_name("replicate-all"), log_prints=True, **FLOW_HOOKS)
def replicate(repo: str | None = None, replica_repo: str | None = None,
              only_when_configured: bool = False) -> ReplicateResult:
    """Copy everything `replica_repo` (default PGDR_REPLICA_REPO) lacks from `repo`.
    `only_when_configured` (the schedule's): with no replica configured, log it and copy
    nothing instead of failing."""
    settings = load_settings()
    repo_url = repo or settings.repo_url
    replica_url = replica_repo or settings.replica_repo_url
    if not replica_url and only_when_configured:
        get_run_logger().info("no DR copy configured (PGDR_REPLICA_REPO): nothing to copy")
        return {"repository": repo_url, "replica": None, "copied": {}}
    if not replica_url:
        raise ConfigError("no DR copy configured: set PGDR_REPLICA_REPO or pass --replica URL")
    if replica_url.rstrip("/") == repo_url.rstrip("/"):
        raise ConfigError("the replica must be another repository than the one it copies")
    repository, replica_repository = open_repo(repo_url, settings), open_repo(replica_url, settings)
    clock = Stopwatch()
    with audited(repository, settings, "replicate", type="all", source=repo_url, destination=replica_url,
                 clock=clock) as step:
        copied = copy_missing(repository, replica_repository, settings)
        lag = replica.replica_lag(repository, replica_repository, catalog.utcnow())
        get_run_logger().info("copied %s to %s", ", ".join(f"{n} {kind}" for kind, n in copied.items()),
                              replica_url)
        step.succeeded(copied=copied)
    return {"repository": repo_url, "replica": replica_url, "copied": copied, "lag": lag,
            "duration_seconds": round(clock.seconds, 3)}
