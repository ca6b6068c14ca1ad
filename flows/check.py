"""Check: does WAL archiving work end to end, as a recovery would need it now?

The daily deployment of `pgdr check`: a WAL switch must reach the repository, and no
segment may be missing since the newest base backup. A failed check fails the run (and
notifies, as every flow does), with the reason.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from pgdr.ops.errors import ConfigError, FailedWithReport
from pgdr.ops.settings import load_settings
from pgdr.pitr.pitr import check_archiving
from pgdr.postgres import dsn
from tasks.records import open_repo
from tasks.runs import FLOW_HOOKS, run_name


@flow(name="check", flow_run_name=run_name("check-{name|db|$db}"), log_prints=True, **FLOW_HOOKS)
def check(db: str | None = None, repo: str | None = None, name: str | None = None,
          timeout_seconds: float = 60.0, max_base_age_hours: float = 26.0) -> dict[str, Any]:
    """Check the WAL archiving of the server behind `db` into the area `name` (default:
    PGDR_WAL_DB, else the database of the URL)."""
    settings = load_settings()
    db_url = db or settings.db_url
    if not db_url:
        raise ConfigError("no database given: pass --db URL or set DATABASE_URL / DB_HOST")
    repo_url = repo or settings.repo_url
    database = name or settings.wal_db or dsn.database_name(db_url)
    result = check_archiving(db_url, open_repo(repo_url, settings), database, timeout_seconds,
                             max_base_age_hours=max_base_age_hours)
    if not result["ok"]:
        raise FailedWithReport("; ".join(result["problems"]), result)
    get_run_logger().info("WAL archiving of %s works: %s archived in %s s, no gap since %s",
                          database, result["switched_segment"], result["archived_within_seconds"],
                          result["base_backup"])
    return result
