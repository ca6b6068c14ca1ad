"""The monthly DR drill: the runbook's drill checklist as a flow, with RTO and RPO measured.

find the newest backup -> restore it into a scratch database and verify it -> health
checks -> [failover dry-run] -> drop the scratch databases -> report (JSON in the
repository under drills/, a markdown artifact, an audit record) -> attention when a
target is missed or a step failed.

RTO = from the drill's start to a verified, healthy restore. RPO = the drill's start
minus the newest restorable point: the backup's snapshot, or the last archived WAL when
`last_archived_at` is given (point-in-time recovery; `pgdr archive-status` reports it).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task

from flows.failover import failover as failover_flow
from flows.failover import run_health_checks
from flows.restore import VerificationFailed, restore_and_validate
from flows.steps import FLOW_HOOKS, open_repo, publish_markdown, record_failure, retrying, run_name
from tasks import catalog, postgres, wal
from tasks import drill as drilling
from tasks import restore as restoring
from tasks.audit import audit_record
from tasks.errors import ConfigError, IntegrityError, PgdrError
from tasks.settings import Settings, load_settings


@task(name="write drill report", **retrying(3, 2))
def write_report(repo_url: str, settings: Settings, key: str, report: dict[str, Any]) -> str:
    open_repo(repo_url, settings).put_bytes(key, json.dumps(report, indent=2, sort_keys=True).encode())
    return key


def needs_attention(report: dict[str, Any]) -> None:
    """The one place a drill that missed a target, or failed a step, is raised to people.
    Notification channels (Slack, e-mail, PagerDuty) hook in here."""
    get_run_logger().error("DR drill %s needs attention: %s", report["started_at"],
                           "; ".join(report["missed"] + report["problems"]))


def _dropped(server_url: str, dbname: str) -> bool:
    restoring.drop_quietly(server_url, dbname)
    with postgres.connect(server_url, dbname=restoring.admin_database(dbname)) as conn:
        return not postgres.database_exists(conn, dbname)


@flow(name="drill", flow_run_name=run_name("drill-{db|$db}"), log_prints=True, **FLOW_HOOKS)
def drill(repo: str | None = None, db: str | None = None, server: str | None = None,
          scenario: str = drilling.DEFAULT_SCENARIO, rto_target_minutes: float | None = None,
          rpo_target_minutes: float | None = None, health_sql: list[str] | None = None,
          failover: dict[str, Any] | None = None, last_archived_at: datetime | None = None) -> dict[str, Any]:
    """Rehearse a recovery and measure it against the scenario's targets.

    `failover`, when given, holds the failover flow's DNS parameters (zone_id,
    record_name, record_value, record_type, ttl, repo, health_urls): it runs as a dry run
    into a second scratch database. The report's `ok` is false, and the drill needs
    attention, when a target is missed or a checklist step failed."""
    settings = load_settings()
    server_url = server or settings.db_url
    if not server_url:
        raise ConfigError("a drill restores into a scratch database: pass --server URL or set DATABASE_URL")
    repo_url = repo or settings.repo_url
    targets = drilling.targets_for(scenario, rto_target_minutes, rpo_target_minutes)
    timeline = drilling.Timeline(catalog.utcnow)
    items: dict[str, bool | None] = {key: None for key, _ in drilling.CHECKLIST}
    problems: list[str] = []
    manifest: catalog.Manifest | None = None
    recovered: datetime | None = None
    scratch: list[str] = []
    try:
        with timeline.phase("find backup") as phase:
            manifest = catalog.resolve_backup(open_repo(repo_url, settings), "latest", db)
            items["backup_found"] = True
            phase.detail = f"{manifest.backup_id}, snapshot at {manifest.snapshot_at}"
        scratch.append(restoring.derived_name(manifest.database, "drill", timeline.started))
        with timeline.phase("restore and verify") as phase:
            try:
                result = restore_and_validate(repo_url, settings, manifest, server_url, scratch[0], None,
                                              True, by="drill")
            except IntegrityError:
                items["checksum_verified"] = False
                raise
            except VerificationFailed:
                items.update(checksum_verified=True, restored=True, row_counts_validated=False)
                raise
            except PgdrError:
                items.update(checksum_verified=True, restored=False)
                raise
            items.update(checksum_verified=True, restored=True, row_counts_validated=True)
            phase.detail = f"{result['statistics']['evaluated']} tables match the manifest"
        with timeline.phase("health checks") as phase:
            items["health_checks_passed"] = False
            run_health_checks(phase, postgres.with_database(server_url, scratch[0]), health_sql or [], [], 30)
            items["health_checks_passed"] = True
        recovered = catalog.utcnow()
    except PgdrError as exc:
        if items["backup_found"] is None:
            items["backup_found"] = False
        problems.append(str(exc))
    if failover is not None and recovered is not None:
        assert manifest is not None
        scratch.append(restoring.derived_name(manifest.database, "drill_failover", timeline.started))
        with timeline.phase("failover dry-run") as phase:
            try:
                outcome = failover_flow(**{"repo": repo_url, **failover, "dry_run": True,
                                           "target": postgres.with_database(server_url, scratch[1])})
                items["failover_dry_run_ok"] = True
                phase.detail = next(p["detail"] for p in outcome["phases"] if p["name"].startswith("dns"))
            except PgdrError as exc:
                items["failover_dry_run_ok"] = False
                phase.ok, phase.detail = False, str(exc)
                problems.append(f"failover dry-run: {exc}")
    if scratch:
        with timeline.phase("drop scratch databases") as phase:
            items["scratch_dropped"] = all(_dropped(server_url, name) for name in scratch)
            phase.detail = ", ".join(scratch)
            if not items["scratch_dropped"]:
                problems.append(f"could not drop the scratch databases {phase.detail}")
    if last_archived_at is None and manifest is not None:
        # With WAL archiving set up, the newest restorable point is the last archived segment.
        archived = wal.archive_status(open_repo(repo_url, settings), manifest.database)["last_archived_at"]
        last_archived_at = catalog.parse_iso(archived) if archived else None
    report = drilling.drill_report(
        scenario=scenario, targets=targets, started=timeline.started, finished=catalog.utcnow(),
        recovered=recovered, snapshot_at=manifest.snapshot if manifest else None,
        last_archived_at=last_archived_at, items=items, phases=timeline.to_list(), repository=repo_url,
        database=manifest.database if manifest else db, backup_id=manifest.backup_id if manifest else None,
        problems=problems)
    report["report_key"] = drilling.drill_key(timeline.started)
    write_report(repo_url, settings, report["report_key"], report)
    publish_markdown("dr-drill", drilling.drill_markdown(report),
                     f"DR drill ({scenario}) of {report['database']}")
    record_failure(repo_url, settings, audit_record(
        "drill", type=scenario, source=report["backup_id"] or "-", destination="scratch database",
        status="success" if report["ok"] else "failed", duration_seconds=timeline.elapsed(),
        rto_seconds=report["rto_seconds"], rpo_seconds=report["rpo_seconds"], report=report["report_key"]))
    if not report["ok"]:
        needs_attention(report)
    return report
