"""The Prefect tasks of flows/recover_table.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import get_run_logger, task

from pgdr.restore import recovery


@task(name="check target tables")
def check_target(target_url: str, wanted: list[tuple[str, str, str]], mode: str,
                 row_filter: str | None) -> None:
    """Refuse, before the restore starts, what the target's tables make impossible."""
    recovery.check_target_tables(target_url, wanted, mode, row_filter)


@task(name="recover table", task_run_name="recover {key}")
def recover_one(target_url: str, temp_url: str, key: str, schema: str, table: str, mode: str,
                row_filter: str | None, dry_run: bool, backup_id: str, moment: datetime) -> dict[str, Any]:
    """One table, one transaction on the target (rolled back in a dry run)."""
    entry = recovery.recover_table_rows(target_url, temp_url, key, schema, table, mode, row_filter, dry_run,
                                        backup_id, moment)
    get_run_logger().info("%s: %s", key, {k: v for k, v in entry.items() if v not in (None, [])})
    return entry
