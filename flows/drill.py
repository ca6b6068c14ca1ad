"""The monthly DR drill: the runbook's drill checklist as a flow, with RTO and RPO measured.

choose the backup exactly as a failover would (the same function) -> restore it into a
scratch database and verify it -> health checks -> [failover dry-run] -> drop the scratch
databases -> report (JSON in the repository under drills/, a markdown artifact, an audit
record, CloudWatch DrillRTOSeconds/DrillRPOSeconds/DrillFailed) -> a drill that missed a
target or failed a step ends Failed, which notifies.

With `pitr`, it rehearses point-in-time recovery instead: the newest base backup and the
WAL archive, replayed to its end into a scratch server.

RTO = from the drill's start (pgdr's own start-up included when it runs as a command or a
deployment) to a verified, healthy database. RPO = the rehearsed disaster (the moment the
drill flow began) minus the point it actually restored: the dump's snapshot, or with
`pitr` the last transaction replayed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.failover import failover as failover_flow
from flows.failover import run_health_checks
from flows.pitr import pitr as pitr_flow
from flows.restore import VerificationFailed, restore_and_validate
from pgdr.catalog import catalog
from pgdr.dr import drill as drilling
from pgdr.dr import failover as choosing
from pgdr.ops.audit import audit_record
from pgdr.ops.errors import ConfigError, FailedWithReport, IntegrityError, PgdrError
from pgdr.ops.settings import Settings, load_settings
from pgdr.pitr.basebackup import choose_base_backup, list_base_backups
from pgdr.postgres import dsn, postgres
from pgdr.postgres.cluster import LocalCluster
from pgdr.restore import restore as restoring
from pgdr.storage.repository import Repository
from tasks.artifacts import publish_markdown
from tasks.drill import write_report
from tasks.failover import choose_backup
from tasks.records import open_repo, publish_metrics, record_failure
from tasks.runs import FLOW_HOOKS, run_name


class DrillFailed(FailedWithReport):
    """A drill that missed a target or failed a step; `details` is its report."""


def needs_attention(report: dict[str, Any]) -> None:
    """Log why the drill needs attention; the run then ends Failed, and the flow's
    failure hook sends the notification (Slack, e-mail, PagerDuty)."""
    get_run_logger().error("DR drill %s needs attention: %s", report["started_at"],
                           "; ".join(report["missed"] + report["problems"]))


def _dropped(server_url: str, dbname: str) -> bool:
    restoring.drop_quietly(server_url, dbname)
    with postgres.connect(server_url, dbname=restoring.admin_database(dbname)) as conn:
        return not postgres.database_exists(conn, dbname)


def process_started_at() -> datetime | None:
    """When this process started (Linux), so that RTO includes pgdr's own start-up."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), UTC)


def _drill_start(started_at: datetime | None, flow_start: datetime) -> datetime:
    """The moment RTO is measured from: the given start (the command line passes its
    process's), a deployment run's process start, else the flow's."""
    from prefect.runtime import deployment

    if started_at is None and deployment.id:
        started_at = process_started_at()
    return min(started_at, flow_start) if started_at else flow_start


@flow(name="drill", flow_run_name=run_name("drill-{db|$db}"), log_prints=True, **FLOW_HOOKS)
def drill(repo: str | None = None, db: str | None = None, server: str | None = None,
          scenario: str = drilling.DEFAULT_SCENARIO, rto_target_minutes: float | None = None,
          rpo_target_minutes: float | None = None, health_sql: list[str] | None = None,
          failover: dict[str, Any] | None = None, backup_id: str | None = None,
          max_backup_age_hours: float = choosing.DEFAULT_MAX_BACKUP_AGE_HOURS, pitr: bool = False,
          started_at: datetime | None = None, no_acl: bool = False,
          create_roles: bool = False) -> dict[str, Any]:
    """Rehearse a recovery and measure it against the scenario's targets.

    The backup is the one a failover would choose from `repo` (the same function, the same
    `max_backup_age_hours`; `backup_id` pins one). With `pitr`, the newest base backup of
    the database area `db` and its WAL are replayed into a scratch server instead.
    `failover`, when given, holds the failover flow's DNS parameters (zone_id,
    record_name, record_value, record_type, ttl, repo, target, health_urls): it runs as a
    dry run, which changes nothing. A drill that misses a target or fails a step raises
    DrillFailed after its report is stored, so the run ends Failed."""
    settings = load_settings()
    server_url = server or settings.db_url
    if not server_url and not pitr:
        raise ConfigError("a drill restores into a scratch database: pass --server URL or set DATABASE_URL")
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)  # a bad URL fails here, before anything runs
    targets = drilling.targets_for(scenario, rto_target_minutes, rpo_target_minutes)
    timeline = drilling.Timeline(catalog.utcnow)
    items: dict[str, bool | None] = {key: None for key, _ in drilling.CHECKLIST}
    problems: list[str] = []
    rehearsal = _Rehearsal(timeline, items, repository, settings, health_sql or [])
    try:
        if pitr:
            rehearsal.point_in_time(db or settings.wal_db)
        else:
            assert server_url is not None  # checked above
            rehearsal.restore(server_url, db, backup_id, max_backup_age_hours, no_acl=no_acl,
                              create_roles=create_roles)
    except PgdrError as exc:
        if items["backup_found"] is None:
            items["backup_found"] = False
        problems.append(str(exc))
    if failover is not None and rehearsal.recovered is not None and not pitr:
        assert server_url is not None and rehearsal.database is not None
        with timeline.phase("failover dry-run") as phase:
            try:
                dr_target = dsn.strip_password(dsn.with_database(server_url, rehearsal.database))
                outcome = failover_flow(**{"repo": repo_url, "max_backup_age_hours": max_backup_age_hours,
                                           **failover, "dry_run": True, "target": dr_target})
                items["failover_dry_run_ok"] = True
                phase.detail = next(p["detail"] for p in outcome["phases"] if p["name"].startswith("dns"))
            except PgdrError as exc:
                items["failover_dry_run_ok"] = False
                phase.ok, phase.detail = False, str(exc)
                problems.append(f"failover dry-run: {exc}")
    problems += rehearsal.clean_up(server_url)
    report = drilling.drill_report(
        scenario=scenario, targets=targets, started=_drill_start(started_at, timeline.started),
        disaster_at=timeline.started, finished=catalog.utcnow(),
        recovered=rehearsal.recovered, restored=rehearsal.restored, items=items, phases=timeline.to_list(),
        repository=repo_url, database=rehearsal.database or db, backup_id=rehearsal.backup_id,
        problems=problems)
    report["pitr"] = pitr
    report["report_key"] = drilling.drill_key(timeline.started)
    write_report(repository, report["report_key"], report)
    publish_markdown("dr-drill", drilling.drill_markdown(report),
                     f"DR drill ({scenario}) of {report['database']}")
    record_failure(repository, audit_record(
        "drill", type=scenario, source=report["backup_id"] or "-", destination="scratch database",
        status="success" if report["ok"] else "failed", duration_seconds=timeline.elapsed(),
        rto_seconds=report["rto_seconds"], rpo_seconds=report["rpo_seconds"], report=report["report_key"]))
    publish_metrics(settings, report["database"] or "-", **drilling.drill_metrics(report))
    if not report["ok"]:
        needs_attention(report)
        raise DrillFailed("DR drill needs attention: " + "; ".join(report["missed"] + report["problems"]),
                          report)
    return report


class _Rehearsal:
    """The recovery a drill rehearses, and what it leaves to clean up."""

    def __init__(self, timeline: drilling.Timeline, items: dict[str, bool | None], repo: Repository,
                 settings: Settings, health_sql: list[str]) -> None:
        self.timeline, self.items, self.repo, self.settings = timeline, items, repo, settings
        self.health_sql = health_sql
        self.database: str | None = None
        self.backup_id: str | None = None
        self.recovered: datetime | None = None  # verified and healthy
        self.restored: tuple[datetime, str] | None = None  # (point, what it comes from)
        self.scratch: str | None = None  # database
        self.scratch_dir: Path | None = None  # pitr's scratch server: its directory
        self.server: LocalCluster | None = None  # and the server, once it runs

    def restore(self, server_url: str, db: str | None, backup_id: str | None, max_age_hours: float, *,
                no_acl: bool = False, create_roles: bool = False) -> None:
        timeline, items = self.timeline, self.items
        with timeline.phase("choose backup") as phase:
            try:
                choice = choose_backup(self.repo, db, backup_id, max_age_hours, False)
            except IntegrityError:
                items["checksum_verified"] = False
                raise
            items.update(backup_found=True, checksum_verified=True)
            manifest = choice.manifest
            self.database, self.backup_id = manifest.database, manifest.backup_id
            phase.detail = f"{manifest.backup_id} ({choice.evidence}), snapshot at {manifest.snapshot_at}"
        self.scratch = restoring.derived_name(manifest.database, "drill", timeline.started)
        with timeline.phase("restore and verify") as phase:
            try:
                result = restore_and_validate(self.repo, self.settings, manifest, server_url,
                                              self.scratch, None, True, by="drill", no_acl=no_acl,
                                              create_roles=create_roles)
            except IntegrityError:
                items["checksum_verified"] = False
                raise
            except VerificationFailed:
                items.update(restored=True, row_counts_validated=False)
                raise
            except PgdrError:
                items["restored"] = False
                raise
            items.update(restored=True, row_counts_validated=True)
            phase.detail = f"{result['statistics']['evaluated']} tables match the manifest"
        self._check_health(dsn.with_database(server_url, self.scratch))
        self.restored = drilling.restored_point(manifest.snapshot)

    def point_in_time(self, database: str | None) -> None:
        if not database:
            raise ConfigError("a point-in-time drill needs the database area: pass --db NAME "
                              "(or set PGDR_WAL_DB)")
        timeline, items = self.timeline, self.items
        self.database = database
        with timeline.phase("choose base backup") as phase:
            base = choose_base_backup(list_base_backups(self.repo, database))
            items["backup_found"] = True
            self.backup_id = base.backup_id
            phase.detail = f"{base.backup_id}, consistent at {base.finished_at}"
        self.scratch_dir = Path(tempfile.mkdtemp(prefix="pgdr-drill-", dir=self.settings.work_dir))
        datadir = self.scratch_dir / "data"
        with timeline.phase("restore base backup and replay WAL") as phase:
            try:
                reached = pitr_flow(datadir=str(datadir), repo=self.repo.url, db=database,
                                    backup_id=base.backup_id, keep_running=True)
            except PgdrError:
                items["restored"] = False
                raise
            self.server = LocalCluster(datadir, reached["port"])
            items.update(checksum_verified=True, restored=True)
            replayed = reached["last_replayed_transaction_at"]
            phase.detail = f"replayed to {replayed or 'the base backup'} ({reached['stopped']})"
        self._check_health(self.server.url(database))
        self.restored = drilling.restored_point(
            base.finished, catalog.parse_iso(replayed) if replayed else None, pitr=True)

    def _check_health(self, url: str) -> None:
        with self.timeline.phase("health checks") as phase:
            self.items["health_checks_passed"] = False
            run_health_checks(phase, url, self.health_sql, [], 30)
            self.items["health_checks_passed"] = True
        self.recovered = catalog.utcnow()

    def clean_up(self, server_url: str | None) -> list[str]:
        """Drop the scratch database or stop and remove the scratch server; the problems."""
        if self.scratch is None and self.scratch_dir is None:
            return []
        with self.timeline.phase("drop scratch") as phase:
            if self.scratch_dir is not None:
                if self.server is not None:
                    self.server.stop("immediate")
                shutil.rmtree(self.scratch_dir, ignore_errors=True)
                self.items["scratch_dropped"] = not self.scratch_dir.exists()
                phase.detail = str(self.scratch_dir)
            else:
                assert server_url is not None and self.scratch is not None
                self.items["scratch_dropped"] = _dropped(server_url, self.scratch)
                phase.detail = self.scratch
        return [] if self.items["scratch_dropped"] else [f"could not drop the scratch {phase.detail}"]
