"""Register prefect.yaml's deployments from Python (what `prefect deploy` does, for
scripts and tests): each flow from this checkout, on the process work pool."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from uuid import UUID

from deployments.specs import PREFECT_YAML, DeploymentSpec, load_specs, select, split_available

logger = logging.getLogger("pgdr.deployments")


def available_specs(names: list[str] | None = None, path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """The chosen deployments whose flow is in this checkout; the others are logged and skipped."""
    present, missing = split_available(select(load_specs(path), names))
    for spec in missing:
        logger.warning("skipping %s: %s is not in this checkout", spec.label, spec.path.name)
    return present


def register(names: list[str] | None = None, *, work_pool: str | None = None, timezone: str | None = None,
             path: Path = PREFECT_YAML) -> dict[str, UUID]:
    """Create or update the deployments; returns their ids by `flow/deployment`."""
    return deploy(available_specs(names, path), work_pool=work_pool, timezone=timezone)


def deploy(specs: list[DeploymentSpec], *, work_pool: str | None = None,
           timezone: str | None = None) -> dict[str, UUID]:
    """Create or update these deployments, each flow from its spec's checkout."""
    from prefect import Flow

    ids = {}
    for spec in specs:
        # Prefect types it as possibly a coroutine (its sync/async API); called here, it is a Flow.
        flow: Any = Flow.from_source(source=str(spec.root), entrypoint=spec.entrypoint)
        ids[spec.label] = flow.deploy(
            name=spec.name, work_pool_name=work_pool or spec.work_pool, work_queue_name=spec.work_queue,
            schedules=spec.cron_schedules(timezone), parameters=spec.parameters,
            job_variables=spec.job_variables,
            description=spec.description, tags=list(spec.tags), build=False, push=False,
            print_next_steps=False, ignore_warnings=True)
    return ids
