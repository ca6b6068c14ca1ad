"""Failover: the runbook's scenario 2 (the primary region is lost) as a flow.

read the DNS record -> choose the backup (pgdr/dr/failover.py: the newest complete one in
the DR repository whose checksum holds, refused when too old) -> restore it into the DR
database and verify it (the restore flow) -> health checks, which must reach the restored
database -> UPSERT the Route53 record, which must name that database's host, and read it
back -> audit record, artifact with each phase's timing (the total is the achieved RTO).

With an RDS source, RDS restores the instance in the DR region instead (point in time,
or from its newest automated snapshot), and the record points at the new endpoint.
Nothing before the DNS switch changes the record: a failure leaves DNS as it was.

`dry_run` changes nothing anywhere: the backup is restored into a scratch database beside
the target (dropped afterwards) and checked there; the target database, the record and
RDS are left as they were (RDS: no instance is created, only what needs none is checked).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from psycopg.conninfo import make_conninfo

from flows.restore import restore, restore_and_validate
from pgdr.catalog import catalog
from pgdr.dr import failover as choosing
from pgdr.dr.drill import Timeline, phases_markdown
from pgdr.ops.audit import audit_record
from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.ops.settings import Settings, load_settings
from pgdr.postgres import dsn, health
from pgdr.restore import restore as restoring
from pgdr.storage import aws
from pgdr.storage.repository import Repository
from tasks.artifacts import publish_markdown
from tasks.failover import (
    check_rds,
    choose_backup,
    health_checks,
    read_dns,
    restore_rds,
    switch_dns,
    wait_for_rds,
)
from tasks.records import open_repo, record_failure
from tasks.runs import FLOW_HOOKS, run_name


class FailoverFailed(PgdrError):
    """The failover stopped before switching DNS; `.details` has the phases so far."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


def run_health_checks(phase: Any, sql_url: str | None, sql: list[str], urls: list[str],
                      timeout_seconds: float) -> list[dict[str, Any]]:
    results = health_checks(sql_url, sql, urls, timeout_seconds)
    phase.detail = health.summary(results)
    if not all(r["ok"] for r in results):
        raise PgdrError(f"health checks failed: {phase.detail}")
    if not health.reached_database(results):
        raise PgdrError("no health check reached the restored database, so nothing proves clients would "
                        "find it working: give --target (user and database) for the SQL checks")
    return results


def _endpoint_url(target: str, endpoint: dict[str, Any]) -> str:
    """The target's database and user, at the restored instance's endpoint."""
    params = dsn.parse_dsn(target)
    params.update(host=endpoint["Address"], port=str(endpoint["Port"]))
    return make_conninfo("", **params)


def _markdown(summary: dict[str, Any]) -> str:
    dns = summary["dns"]
    change = (f"{dns['previous'] or '(none)'} -> {dns['value']}" if dns else "-")
    verb = "would change" if summary["dry_run"] else "changed"
    return (f"## Failover{' (dry run)' if summary['dry_run'] else ''}: "
            f"{'done' if summary['ok'] else 'FAILED, DNS unchanged'}\n\n"
            f"- source: {summary['source']} ({summary['selection']})\n"
            f"- target: {summary['target'] or '-'}\n"
            f"- DNS {dns['name'] if dns else ''} {dns['type'] if dns else ''}: {verb} {change}\n"
            f"- total (achieved RTO): {summary['rto_seconds']:.1f} s\n\n"
            + phases_markdown(summary["phases"]) + "\n")


@flow(name="failover", flow_run_name=run_name("failover-{db|target|$db}-to-{record_name}"),
      log_prints=True, **FLOW_HOOKS)
def failover(zone_id: str, record_name: str, record_value: str | None = None, record_type: str = "CNAME",
             ttl: int = 60, repo: str | None = None, target: str | None = None, db: str | None = None,
             health_urls: list[str] | None = None, health_sql: list[str] | None = None,
             health_timeout_seconds: float = 10, dry_run: bool = False, region: str | None = None,
             rds_source_instance: str | None = None, rds_target_instance: str | None = None,
             rds_from_snapshot: bool = False, rds_instance_class: str | None = None,
             rds_subnet_group: str | None = None, rds_timeout_minutes: float = 60,
             rds_poll_seconds: float = 30, backup_id: str | None = None,
             max_backup_age_hours: float = choosing.DEFAULT_MAX_BACKUP_AGE_HOURS, accept_stale: bool = False,
             force_record_value: bool = False, no_owner: bool = False, no_acl: bool = False,
             create_roles: bool = False) -> dict[str, Any]:
    """Bring the database up in the DR region and point `record_name` at it.

    `repo` is the DR repository (default PGDR_REPLICA_REPO, else PGDR_REPO); `target` the
    DR database URL to restore into; `backup_id` pins the backup (default: the newest
    complete one whose checksum holds, refused when older than `max_backup_age_hours`
    unless `accept_stale`). With `rds_source_instance`, RDS restores the instance as
    `rds_target_instance` in `region` instead; `target` then names the user and database
    for the SQL health checks at its endpoint. The record points at the host of the
    database that passed the checks; another `record_value` needs `force_record_value`."""
    settings = load_settings()
    repo_url = repo or settings.replica_repo_url or settings.repo_url
    repository = open_repo(repo_url, settings)  # a bad URL fails here, before anything runs
    region = region or settings.aws_region
    target_url = target or (None if rds_source_instance else settings.db_url)
    if rds_source_instance and not rds_target_instance:
        raise ConfigError("an RDS failover needs the new instance's name: pass --rds-target-instance")
    if rds_source_instance and not target_url:
        raise ConfigError("an RDS failover switches DNS only after a health check reached the new instance: "
                          "pass --target with the user and database to check there")
    if not rds_source_instance and not target_url:
        raise ConfigError("no DR database given: pass --target URL")
    if force_record_value and not record_value:
        raise ConfigError("--force-record-value needs --record-value")
    logger = get_run_logger()
    timeline = Timeline(catalog.utcnow)
    summary: dict[str, Any] = {
        "ok": False, "dry_run": dry_run, "repository": repo_url, "source": rds_source_instance,
        "selection": "rds" if rds_source_instance else None, "backup_id": None,
        "target": dsn.display_dsn(target_url) if target_url else None, "dns": None, "health": [],
        "started_at": catalog.iso(timeline.started)}
    try:
        with timeline.phase("read dns record") as phase:
            current = read_dns(zone_id, record_name, record_type, region)
            phase.detail = current.describe() if current else "no such record yet"
        if rds_source_instance:
            assert rds_target_instance is not None  # checked above
            new_value = _rds_failover(timeline, summary, target_url, record_value, force_record_value,
                                      region, rds_source_instance, rds_target_instance, rds_from_snapshot,
                                      rds_instance_class, rds_subnet_group, rds_timeout_minutes * 60,
                                      rds_poll_seconds, health_sql or [], health_urls or [],
                                      health_timeout_seconds, dry_run)
        else:
            assert target_url is not None  # checked above
            new_value = _database_failover(timeline, summary, repository, settings, target_url, db, backup_id,
                                           max_backup_age_hours, accept_stale, record_value,
                                           force_record_value, health_sql or [], health_urls or [],
                                           health_timeout_seconds, dry_run,
                                           {"no_owner": no_owner, "no_acl": no_acl,
                                            "create_roles": create_roles})
        new = aws.DnsRecord(zone_id, aws.fqdn(record_name), record_type, ttl, new_value)
        summary["dns"] = {"zone_id": zone_id, "name": new.name, "type": record_type, "ttl": ttl,
                          "previous": current.value if current else None, "value": new_value,
                          "changed": False}
        with timeline.phase("dns switch (dry run)" if dry_run else "dns switch") as phase:
            before = current.describe() if current else "(no record)"
            if dry_run:
                phase.detail = f"would change {before} -> {new.describe()}"
            else:
                switch_dns(new, region, f"pgdr failover to {summary['source']}")
                summary["dns"]["changed"] = True
                phase.detail = f"changed {before} -> {new.describe()}"
            logger.info(phase.detail)
    except Exception as exc:
        summary.update(error=str(exc), phases=timeline.to_list(), rto_seconds=round(timeline.elapsed(), 3),
                       finished_at=catalog.iso(catalog.utcnow()))
        _finish(repository, summary, "failed")
        raise FailoverFailed(f"failover stopped, DNS unchanged: {exc}", summary) from None
    summary.update(ok=True, phases=timeline.to_list(), rto_seconds=round(timeline.elapsed(), 3),
                   finished_at=catalog.iso(catalog.utcnow()))
    _finish(repository, summary, "success")
    return summary


def _database_failover(timeline: Timeline, summary: dict[str, Any], repo: Repository, settings: Settings,
                       target_url: str, db: str | None, backup_id: str | None, max_age_hours: float,
                       accept_stale: bool, record_value: str | None, force_record_value: bool,
                       health_sql: list[str], health_urls: list[str], health_timeout: float,
                       dry_run: bool, roles: dict[str, Any]) -> str:
    """Choose, restore (a dry run: into a scratch database beside the target), check;
    returns the value the record gets (checked first: a wrong one changes nothing).
    `roles`: no_owner, no_acl, create_roles, as restore takes them."""
    new_value = choosing.check_record_value(record_value, dsn.parse_dsn(target_url).get("host"),
                                            force_record_value)
    with timeline.phase("choose backup") as phase:
        choice = choose_backup(repo, db, backup_id, max_age_hours, accept_stale,
                               dsn.database_name(target_url))
        manifest = choice.manifest
        summary.update(source=manifest.backup_id, backup_id=manifest.backup_id, selection=choice.evidence,
                       snapshot_at=manifest.snapshot_at, choice=choice.to_dict())
        phase.detail = f"{manifest.backup_id} ({choice.evidence}, {choice.age_seconds / 3600:.1f} h old)"
    if not dry_run:
        with timeline.phase("restore and verify") as phase:
            restored = restore(backup_id=manifest.backup_id, target=dsn.strip_password(target_url),
                               repo=repo.url, db=manifest.database, pre_restore_backup=False, **roles)
            phase.detail = f"{len(restored['row_counts'])} tables match the manifest"
            summary["row_counts"] = restored["row_counts"]
        with timeline.phase("health checks") as phase:
            summary["health"] = run_health_checks(phase, target_url, health_sql, health_urls, health_timeout)
    else:
        scratch = restoring.derived_name(dsn.database_name(target_url), "failover_dry_run",
                                         timeline.started)
        try:
            with timeline.phase("restore and verify (scratch database)") as phase:
                result = restore_and_validate(repo, settings, manifest, target_url, scratch, None,
                                              roles["no_owner"], by="failover dry run", properties=True,
                                              no_acl=roles["no_acl"], create_roles=roles["create_roles"])
                phase.detail = f"{result['statistics']['evaluated']} tables match the manifest in {scratch}"
                summary["row_counts"] = {t["table"]: t["observed"] for t in result["tables"]}
            with timeline.phase("health checks (scratch database)") as phase:
                summary["health"] = run_health_checks(phase, dsn.with_database(target_url, scratch),
                                                      health_sql, health_urls, health_timeout)
        finally:
            with timeline.phase("drop scratch database") as phase:
                restoring.drop_quietly(target_url, scratch)
                phase.detail = scratch
    return new_value


def _rds_failover(timeline: Timeline, summary: dict[str, Any], target_url: str | None,
                  record_value: str | None, force_record_value: bool, region: str | None, source: str,
                  instance: str, from_snapshot: bool, instance_class: str | None, subnet_group: str | None,
                  timeout_seconds: float, poll_seconds: float, health_sql: list[str],
                  health_urls: list[str], health_timeout: float, dry_run: bool) -> str:
    """Restore the instance (a dry run: only check that it could be), wait, check;
    returns the value the record gets."""
    with timeline.phase("check rds restore") as phase:
        phase.detail = check_rds(source, instance, region, from_snapshot)
        summary["rds"] = {"instance": instance, "method": "snapshot" if from_snapshot else "point-in-time"}
    if dry_run:
        with timeline.phase("health checks (dry run)") as phase:
            phase.detail = "not run: a dry run creates no instance to check"
        if record_value and not force_record_value:
            raise PgdrError("--record-value for an RDS failover must be the new endpoint, which a dry run "
                            "does not know: leave it out, or add --force-record-value")
        return record_value or f"<endpoint of {instance}>"
    with timeline.phase("rds restore") as phase:
        started = restore_rds(source, instance, region, from_snapshot, instance_class, subnet_group)
        phase.detail = f"{started.method} restore of {started.source} ({started.restored_from})"
        summary["rds"].update(method=started.method, restored_from=started.restored_from)
    with timeline.phase("wait for rds instance") as phase:
        endpoint = wait_for_rds(instance, region, timeout_seconds, poll_seconds)
        phase.detail = f"available at {endpoint['Address']}:{endpoint['Port']}"
        summary["rds"]["endpoint"] = endpoint
    summary["target"] = f"{endpoint['Address']}:{endpoint['Port']}"
    with timeline.phase("health checks") as phase:
        sql_url = _endpoint_url(target_url, endpoint) if target_url else None
        summary["health"] = run_health_checks(phase, sql_url, health_sql, health_urls, health_timeout)
    return choosing.check_record_value(record_value, endpoint["Address"], force_record_value)


def _finish(repo: Repository, summary: dict[str, Any], status: str) -> None:
    publish_markdown("failover-dry-run" if summary["dry_run"] else "failover", _markdown(summary),
                     f"Failover to {summary['target']}")
    # record_failure only warns when the record cannot be written: a completed switch must
    # not be reported as failed because the audit area is unreachable.
    kind = "rds" if summary["selection"] == "rds" else "region"
    record_failure(repo, audit_record(
        "failover", type="dry-run" if summary["dry_run"] else kind,
        source=summary["source"] or "-", destination=summary["target"] or "-", status=status,
        duration_seconds=summary["rto_seconds"], dns=summary["dns"], phases=summary["phases"],
        selection=summary["selection"], error=summary.get("error")))
