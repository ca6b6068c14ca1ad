"""The Prefect tasks of flows/fleet.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

from prefect import get_client, get_run_logger, task
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound

from pgdr.dr import fleet as fleets
from tasks.policy import retrying


@task(name="list fleet", **retrying(2, 5))
def list_fleet(databases: list[str], servers: list[str], include: list[str],
               exclude: list[str]) -> list[fleets.Member]:
    members = fleets.members_of(databases, servers, include, exclude)
    get_run_logger().info("%d database(s) on %d server(s): %s", len(members),
                          len({m.host for m in members}), ", ".join(m.database for m in members))
    return members


@task(name="set server limits", **retrying(2, 2))
def set_server_limits(hosts: list[str], limit: int | None, default: int) -> dict[str, int]:
    """Each server's global concurrency limit: created with `default` slots when missing,
    set to `limit` (and enabled) when one is given, else left as an operator set it."""
    in_force = {}
    with get_client(sync_client=True) as client:
        for host in hosts:
            name = fleets.HOST_LIMIT_PREFIX + host
            try:
                existing = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit or default, active=True))
                in_force[host] = limit or default
                continue
            if limit and (existing.limit != limit or not existing.active):
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
            in_force[host] = limit or existing.limit
    return in_force
