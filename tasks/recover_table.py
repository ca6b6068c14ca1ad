"""The Prefect tasks of flows/recover_table.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from prefect import get_run_logger, task

from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.postgres import dsn, postgres
from pgdr.restore import recovery
from pgdr.restore import restore as restoring


@task(name="check target tables")
def check_target(target_url: str, wanted: list[tuple[str, str, str]], mode: str,
                 row_filter: str | None) -> None:
    """Refuse, before the restore starts, what the target's tables make impossible."""
    with postgres.connect(target_url) as conn:
        for key, schema, table in wanted:
            shape = recovery.table_shape(conn, schema, table)
            if shape is None and mode != "side-table":
                raise ConfigError(f"{key} does not exist in {dsn.display_dsn(target_url)}: "
                                  "recover it with --mode side-table, or restore the backup elsewhere")
            if shape is not None and not shape.primary_key and mode == "missing-rows":
                raise ConfigError(f"{key} has no primary key, so missing rows cannot be told apart: "
                                  "use --mode side-table (or replace)")
            if shape is not None and not shape.primary_key and mode == "replace" and row_filter:
                raise ConfigError(f"{key} has no primary key: replace with --where needs one to match rows")


@task(name="recover table", task_run_name="recover {key}")
def recover_one(target_url: str, temp_url: str, key: str, schema: str, table: str, mode: str,
                row_filter: str | None, dry_run: bool, backup_id: str, moment: datetime) -> dict[str, Any]:
    """One table, one transaction on the target (rolled back in a dry run)."""
    # The operator's filter runs only on the temporary copy, read-only, with least privilege.
    with recovery.filter_reader(temp_url, schema, table, row_filter) as source, \
            postgres.connect(target_url) as target:
        backup = recovery.table_shape(source, schema, table)
        current = recovery.table_shape(target, schema, table)
        if backup is None:
            raise PgdrError(f"{key} is missing from the restored backup")
        entry: dict[str, Any] = {
            "table": key, "rows_in_backup": recovery.count_source_rows(source, backup, row_filter),
            "rows_present": None, "rows_inserted": None, "rows_replaced": None, "rows_updated": None,
            "rows_deleted": None, "side_table": None, "sequences": [],
        }
        columns = _columns(backup, current, mode, key)
        try:
            with target.transaction():
                if mode == "side-table":
                    _to_side_table(source, target, backup, current, columns, row_filter, dry_run, backup_id,
                                   moment, entry)
                else:
                    assert current is not None  # check_target refused a missing table
                    _merge(source, target, backup, current, columns, mode, row_filter, dry_run, entry)
                if dry_run:
                    raise psycopg.Rollback()
        except psycopg.Error as exc:
            raise recovery.explain(exc, key) from None
    get_run_logger().info("%s: %s", key, {k: v for k, v in entry.items() if v not in (None, [])})
    return entry


def _columns(backup: recovery.TableShape, current: recovery.TableShape | None, mode: str,
             key: str) -> list[str]:
    """The columns to carry over: every one for a side table; for the original, the
    backup's columns that the server does not compute, all of which it must still have."""
    if mode == "side-table":
        return backup.columns
    assert current is not None
    wanted = [c for c in backup.columns if c not in backup.generated]
    lost = [c for c in wanted if c not in current.columns]
    if lost:
        raise ConfigError(f"{key} in the target no longer has the backup's column(s) {', '.join(lost)}: "
                          "use --mode side-table")
    absent_key = [c for c in current.primary_key if c not in wanted]
    if absent_key:
        raise ConfigError(f"the backup's {key} lacks the target's key column(s) {', '.join(absent_key)}")
    return [c for c in wanted if c not in current.generated]


def _to_side_table(source: psycopg.Connection, target: psycopg.Connection, backup: recovery.TableShape,
                   current: recovery.TableShape | None, columns: list[str], row_filter: str | None,
                   dry_run: bool, backup_id: str, moment: datetime, entry: dict[str, Any]) -> None:
    if dry_run:
        destination = recovery.create_stage(target, backup, columns)
    else:
        name = restoring.derived_name(backup.table, "recovered", moment)
        destination, entry["side_table"] = recovery.create_side_table(
            target, backup, name, columns, f"pgdr: rows of {entry['table']} from backup {backup_id}"
            + (f" where {row_filter}" if row_filter else ""))
    entry["rows_inserted"] = recovery.stream_rows(source, target, backup, columns, destination, row_filter)
    if current is not None and current.primary_key and set(current.primary_key) <= set(columns):
        entry["rows_present"] = recovery.count_present(target, current, destination)


def _merge(source: psycopg.Connection, target: psycopg.Connection, backup: recovery.TableShape,
           current: recovery.TableShape, columns: list[str], mode: str, row_filter: str | None,
           dry_run: bool, entry: dict[str, Any]) -> None:
    stage = recovery.create_stage(target, backup, columns)
    staged = recovery.stream_rows(source, target, backup, columns, stage, row_filter)
    if not current.primary_key:  # replace of a whole table without a key: all rows out, all in
        recovery.lock_for_replace(target, current)
        _refuse_cascades(target, current, recovery.count_extra(target, current, stage), entry["table"])
        entry["rows_deleted"] = recovery.delete_extra(target, current, stage)
        entry["rows_inserted"] = recovery.insert_all(target, current.ident, stage, columns)
        entry["rows_replaced"] = staged
        return
    present = recovery.count_present(target, current, stage)
    entry["rows_present"] = present
    if mode == "replace":
        if not dry_run:
            recovery.lock_for_replace(target, current)
        # With a filter, only the filtered rows take the backup's content: which target
        # rows the filter covers is unknown, as it never runs on the target.
        extra = 0 if row_filter else recovery.count_extra(target, current, stage)
        _refuse_cascades(target, current, extra, entry["table"])
        if dry_run:
            entry["rows_updated"] = recovery.count_changed(target, current, stage, columns)
            entry["rows_deleted"] = extra
        else:
            entry["rows_updated"] = recovery.update_changed(target, current, stage, columns)
            entry["rows_deleted"] = recovery.delete_extra(target, current, stage) if extra else 0
        entry["rows_replaced"] = staged
    entry["rows_inserted"] = (staged - present if dry_run
                              else recovery.insert_missing(target, current, stage, columns))
    if not dry_run and (entry["rows_inserted"] or entry["rows_updated"]):
        entry["sequences"] = recovery.advance_sequences(target, current)


def _refuse_cascades(conn: psycopg.Connection, current: recovery.TableShape, deleting: int, key: str) -> None:
    cascades = recovery.cascading_references(conn, current) if deleting else []
    if cascades:
        raise ConfigError(f"replacing {key} would delete {deleting} row(s) and cascade into "
                          f"{', '.join(cascades)}: use --mode missing-rows or side-table")
