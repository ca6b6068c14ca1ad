"""Verify: the runbook's verify-backups.sh as a flow.

For each database in the repository (or the one named): the latest backup exists, is
younger than max_age_hours, its checksum holds, and a test restore into a temporary
database passes the great-expectations validation; the temporary database is dropped.
"""

from __future__ import annotations

from typing import Any, TypedDict

from prefect import flow, get_run_logger

from flows.restore import VerificationFailed, restore_and_validate
from pgdr.catalog import catalog
from pgdr.catalog.scan import list_databases, scan_backups
from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.ops.settings import load_settings
from pgdr.restore import restore as restoring
from tasks.artifacts import markdown_table, publish_markdown
from tasks.records import audited, open_repo, publish_metrics
from tasks.runs import FLOW_HOOKS, run_name, server_slot


def backup_age_hours(manifest: catalog.Manifest, now: Any) -> float:
    return float((now - catalog.backup_time(manifest)).total_seconds()) / 3600


class VerifyResult(TypedDict):
    """`pgdr verify --json`: per database, its newest backup, its age and whether a restore
    of it validated (with the reason when not)."""

    ok: bool
    repository: str
    databases: list[dict[str, Any]]


@flow(name="verify", flow_run_name=run_name("verify-{db|all}"), log_prints=True, **FLOW_HOOKS)
def verify(repo: str | None = None, db: str | None = None, max_age_hours: float = 26.0,
           server: str | None = None) -> VerifyResult:
    """Check the latest backup of every database (and that every manifest can be read);
    fail, with the reasons, if any check fails."""
    settings = load_settings()
    server_url = server or settings.db_url
    if not server_url:
        raise ConfigError("verify restores into a temporary database: pass --server URL or set DATABASE_URL")
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)
    databases = [db] if db else list_databases(repository)
    if not databases:
        raise VerificationFailed(f"no backups in {repo_url}", {"ok": False, "databases": []})
    logger = get_run_logger()
    now = catalog.utcnow()
    report = []
    for database in databases:
        entry: dict[str, Any] = {"database": database, "ok": False, "backup_id": None, "age_hours": None}
        report.append(entry)
        try:
            with audited(repository, settings, "verify", type="restore-test", source=database,
                         destination="temporary database") as step:
                found = scan_backups(repository, database)
                entry["damaged"] = [d.key for d in found.damaged]
                manifest = catalog.newest_regular_backup(found.backups)
                if manifest is None:
                    raise PgdrError(f"no backup of {database}"
                                    + (f" (damaged: {found.damaged[0].reason})" if found.damaged else ""))
                entry["backup_id"] = step.source = manifest.backup_id
                age = backup_age_hours(manifest, now)
                entry["age_hours"] = round(age, 2)
                if age > max_age_hours:
                    raise PgdrError(f"latest backup of {database} is {age:.1f} h old "
                                    f"(more than {max_age_hours:g} h)")
                temp_db = restoring.derived_name(database, "verify", catalog.utcnow())
                try:
                    with server_slot(server_url):
                        result = restore_and_validate(repository, settings, manifest, server_url, temp_db,
                                                      None, True, by="verify")
                finally:
                    restoring.drop_quietly(server_url, temp_db)
                entry["tables"] = result["statistics"]["evaluated"]
                if found.damaged:  # the latest is good, but part of the history cannot be read
                    raise PgdrError("; ".join(d.reason for d in found.damaged))
                entry["ok"] = True
                step.succeeded(reason=None)  # what a success record has always said
        except PgdrError as exc:  # recorded (audited): the other databases are still verified
            entry["reason"] = str(exc)
            logger.error("verification of %s failed: %s", database, exc)
        staleness = {"HoursSinceLastBackup": entry["age_hours"]} if entry["age_hours"] is not None else {}
        publish_metrics(settings, database, VerifyFailureCount=int(not entry["ok"]), **staleness)
    publish_markdown(
        "verify-backups",
        "## Backup verification\n\n" + markdown_table(
            ["database", "backup", "age (h)", "result"],
            [[e["database"], e["backup_id"] or "-", e["age_hours"] if e["age_hours"] is not None else "-",
              "ok" if e["ok"] else f"FAILED: {e.get('reason')}"] for e in report]),
        f"Verification of {len(report)} database(s) in {repo_url}",
    )
    summary: VerifyResult = {"ok": all(e["ok"] for e in report), "repository": repo_url, "databases": report}
    failed = [e for e in report if not e["ok"]]
    if failed:
        raise VerificationFailed("; ".join(e["reason"] for e in failed), summary)
    return summary
