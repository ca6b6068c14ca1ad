"""The Prefect tasks of flows/failover.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from pgdr.catalog import catalog
from pgdr.dr import failover as choosing
from pgdr.postgres import health
from pgdr.storage import aws
from pgdr.storage.repository import Repository
from tasks.policy import retrying


@task(name="choose backup", **retrying(2, 5))
def choose_backup(repo: Repository, database: str | None, backup_id: str | None,
                  max_age_hours: float, accept_stale: bool,
                  target_database: str | None = None) -> choosing.Choice:
    """The one choice a failover and a drill make (pgdr/dr/failover.py)."""
    choice = choosing.choose_backup(repo, database, catalog.utcnow(),
                                    backup_id=backup_id, max_age_hours=max_age_hours,
                                    accept_stale=accept_stale, target_database=target_database)
    for reason in choice.skipped:
        get_run_logger().warning("skipping %s", reason)
    return choice


@task(name="read dns record", **retrying(2, 5))
def read_dns(zone_id: str, name: str, record_type: str, region: str | None) -> aws.DnsRecord | None:
    return aws.read_record(aws.client("route53", region), zone_id, name, record_type)


@task(name="switch dns", **retrying(2, 5))
def switch_dns(record: aws.DnsRecord, region: str | None, comment: str) -> aws.DnsRecord:
    return aws.upsert_record(aws.client("route53", region), record, comment)


@task(name="check rds restore", **retrying(2, 5))
def check_rds(source: str, instance: str, region: str | None, from_snapshot: bool) -> str:
    return aws.check_rds_restore(aws.client("rds", region), source, instance, from_snapshot=from_snapshot)


@task(name="restore rds instance")
def restore_rds(source: str, instance: str, region: str | None, from_snapshot: bool,
                instance_class: str | None, subnet_group: str | None) -> aws.RdsRestore:
    return aws.restore_rds_instance(aws.client("rds", region), source, instance, from_snapshot=from_snapshot,
                                    instance_class=instance_class, subnet_group=subnet_group)


@task(name="wait for rds instance")
def wait_for_rds(instance: str, region: str | None, timeout_seconds: float,
                 poll_seconds: float) -> dict[str, Any]:
    return aws.wait_until_available(aws.client("rds", region), instance, timeout_seconds, poll_seconds)


@task(name="health checks")
def health_checks(sql_url: str | None, sql: list[str], urls: list[str],
                  timeout_seconds: float) -> list[dict[str, Any]]:
    """All checks run (an operator wants the whole picture); the phase fails if any failed."""
    results = health.sql_checks(sql_url, sql, timeout_seconds) if sql_url else []
    results += [health.http_check(url, timeout_seconds) for url in urls]
    return results
