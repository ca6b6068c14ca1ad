"""Failover: the runbook's scenario 2 (the primary region is lost) as a flow.

read the DNS record -> choose the newest verified backup in the DR repository -> restore
it into the DR database and verify it (the restore flow) -> health checks -> UPSERT the
Route53 record and read it back -> audit record, artifact with each phase's timing (the
total is the achieved RTO).

With an RDS source, RDS restores the instance in the DR region instead (point in time,
or from its newest automated snapshot), and the record points at the new endpoint.
Nothing before the DNS switch changes the record: a failure leaves DNS as it was.
`dry_run` does everything except the switch and says what it would change.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from psycopg.conninfo import make_conninfo

from flows.restore import restore
from flows.steps import FLOW_HOOKS, open_repo, publish_markdown, record_failure, retrying, run_name
from tasks import aws, catalog, health, postgres
from tasks.audit import audit_record
from tasks.drill import Timeline, phases_markdown
from tasks.errors import ConfigError, IntegrityError, NotFoundError, PgdrError
from tasks.repository import Repository
from tasks.settings import Settings, load_settings


class FailoverFailed(PgdrError):
    """The failover stopped before switching DNS; `.details` has the phases so far."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


def choose_backup(repository: Repository, database: str | None) -> tuple[catalog.Manifest, str]:
    """The newest backup whose restore was verified; without one, the newest whose stored
    bytes still match their checksum. Returns (manifest, "verified" | "checksum")."""
    newest = catalog.resolve_backup(repository, "latest", database)
    backups = catalog.list_backups(repository, newest.database)[::-1]
    for manifest in backups:
        if (catalog.read_verification(repository, manifest) or {}).get("verified") is True:
            return manifest, "verified"
    for manifest in backups:
        try:
            repository.verify(f"{manifest.prefix}/{manifest.data_key}", manifest.size_bytes, manifest.sha256)
        except IntegrityError as exc:
            get_run_logger().warning("skipping %s: %s", manifest.backup_id, exc)
            continue
        return manifest, "checksum"
    raise NotFoundError(f"no backup of {newest.database} in {repository.url} passes its checksum")


@task(name="choose backup", **retrying(2, 5))
def choose_backup_task(repo_url: str, settings: Settings,
                       database: str | None) -> tuple[catalog.Manifest, str]:
    return choose_backup(open_repo(repo_url, settings), database)


@task(name="read dns record", **retrying(2, 5))
def read_dns(zone_id: str, name: str, record_type: str, region: str | None) -> aws.DnsRecord | None:
    return aws.read_record(aws.client("route53", region), zone_id, name, record_type)


@task(name="switch dns", **retrying(2, 5))
def switch_dns(record: aws.DnsRecord, region: str | None, comment: str) -> aws.DnsRecord:
    return aws.upsert_record(aws.client("route53", region), record, comment)


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


def run_health_checks(phase: Any, sql_url: str | None, sql: list[str], urls: list[str],
                      timeout_seconds: float) -> list[dict[str, Any]]:
    results = health_checks(sql_url, sql, urls, timeout_seconds)
    phase.detail = health.summary(results)
    if not all(r["ok"] for r in results):
        raise PgdrError(f"health checks failed: {phase.detail}")
    return results


def _endpoint_url(target: str, endpoint: dict[str, Any]) -> str:
    """The target's database and user, at the restored instance's endpoint."""
    params = postgres.parse_dsn(target)
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
             rds_poll_seconds: float = 30) -> dict[str, Any]:
    """Bring the database up in the DR region and point `record_name` at it.

    `repo` is the DR repository (default PGDR_REPLICA_REPO, else PGDR_REPO); `target` the
    DR database URL to restore into. With `rds_source_instance`, RDS restores the
    instance as `rds_target_instance` in `region` instead, and the record points at its
    endpoint unless `record_value` is given; `target` (optional) then names the user and
    database for the SQL health checks at that endpoint."""
    settings = load_settings()
    repo_url = repo or settings.replica_repo_url or settings.repo_url
    region = region or settings.aws_region
    target_url = target or (None if rds_source_instance else settings.db_url)
    if rds_source_instance and not rds_target_instance:
        raise ConfigError("an RDS failover needs the new instance's name: pass --rds-target-instance")
    if not rds_source_instance and not target_url:
        raise ConfigError("no DR database given: pass --target URL")
    if not rds_source_instance and not record_value:
        raise ConfigError("no record value given: pass --record-value (the DR database's host name)")
    logger = get_run_logger()
    timeline = Timeline(catalog.utcnow)
    summary: dict[str, Any] = {
        "ok": False, "dry_run": dry_run, "repository": repo_url, "source": rds_source_instance,
        "selection": "rds" if rds_source_instance else None, "backup_id": None,
        "target": postgres.display_dsn(target_url) if target_url else None, "dns": None, "health": [],
        "started_at": catalog.iso(timeline.started)}
    try:
        with timeline.phase("read dns record") as phase:
            current = read_dns(zone_id, record_name, record_type, region)
            phase.detail = current.describe() if current else "no such record yet"
        sql_url = target_url
        if rds_source_instance:
            assert rds_target_instance is not None  # checked above
            with timeline.phase("rds restore") as phase:
                started = restore_rds(rds_source_instance, rds_target_instance, region, rds_from_snapshot,
                                      rds_instance_class, rds_subnet_group)
                phase.detail = f"{started.method} restore of {started.source} ({started.restored_from})"
                summary["rds"] = {"instance": started.instance, "method": started.method,
                                  "restored_from": started.restored_from}
            with timeline.phase("wait for rds instance") as phase:
                endpoint = wait_for_rds(rds_target_instance, region, rds_timeout_minutes * 60,
                                        rds_poll_seconds)
                phase.detail = f"available at {endpoint['Address']}:{endpoint['Port']}"
                summary["rds"]["endpoint"] = endpoint
            record_value = record_value or endpoint["Address"]
            sql_url = _endpoint_url(target_url, endpoint) if target_url else None
            summary["target"] = f"{endpoint['Address']}:{endpoint['Port']}"
        else:
            assert target_url is not None  # checked above
            with timeline.phase("choose backup") as phase:
                manifest, selection = choose_backup_task(repo_url, settings, db)
                summary.update(source=manifest.backup_id, backup_id=manifest.backup_id, selection=selection,
                               snapshot_at=manifest.snapshot_at)
                phase.detail = f"{manifest.backup_id} ({selection})"
                if selection != "verified":
                    logger.warning("no verified backup in %s: using %s, whose checksum verifies but whose "
                                   "restore was never tested", repo_url, manifest.backup_id)
            with timeline.phase("restore and verify") as phase:
                restored = restore(backup_id=manifest.backup_id, target=target_url, repo=repo_url,
                                   db=manifest.database, pre_restore_backup=False)
                phase.detail = f"{len(restored['row_counts'])} tables match the manifest"
                summary["row_counts"] = restored["row_counts"]
        with timeline.phase("health checks") as phase:
            summary["health"] = run_health_checks(phase, sql_url, health_sql or [], health_urls or [],
                                                  health_timeout_seconds)
        assert record_value is not None  # checked above, or the RDS endpoint
        new = aws.DnsRecord(zone_id, aws.fqdn(record_name), record_type, ttl, record_value)
        summary["dns"] = {"zone_id": zone_id, "name": new.name, "type": record_type, "ttl": ttl,
                          "previous": current.value if current else None, "value": record_value,
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
        _finish(repo_url, settings, summary, "failed")
        raise FailoverFailed(f"failover stopped, DNS unchanged: {exc}", summary) from None
    summary.update(ok=True, phases=timeline.to_list(), rto_seconds=round(timeline.elapsed(), 3),
                   finished_at=catalog.iso(catalog.utcnow()))
    _finish(repo_url, settings, summary, "success")
    return summary


def _finish(repo_url: str, settings: Settings, summary: dict[str, Any], status: str) -> None:
    publish_markdown("failover-dry-run" if summary["dry_run"] else "failover", _markdown(summary),
                     f"Failover to {summary['target']}")
    # record_failure only warns when the record cannot be written: a completed switch must
    # not be reported as failed because the audit area is unreachable.
    kind = "rds" if summary["selection"] == "rds" else "region"
    record_failure(repo_url, settings, audit_record(
        "failover", type="dry-run" if summary["dry_run"] else kind,
        source=summary["source"] or "-", destination=summary["target"] or "-", status=status,
        duration_seconds=summary["rto_seconds"], dns=summary["dns"], phases=summary["phases"],
        selection=summary["selection"], error=summary.get("error")))
