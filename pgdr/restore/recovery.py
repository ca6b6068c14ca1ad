"""Selective table recovery: bring rows of a table back from a restored copy.

The backup is restored into a temporary database beside the target. Rows travel from
it to the target by COPY (streamed, never held in memory) into a temporary staging
table on the target, and are merged from there in one transaction per table. The
operator's row filter is SQL by design: it only ever runs in a read-only SELECT on the
temporary database, never in a statement on the target.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from pgdr.ops.errors import ConfigError, PgdrError, first_line
from pgdr.postgres import dsn, postgres
from pgdr.restore import restore as restoring
from pgdr.restore import table_merge
from pgdr.restore.row_filter import filter_reader
from pgdr.restore.table_rows import TableShape, count_source_rows, stream_rows, table_shape

MODES = ("missing-rows", "replace", "side-table")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def requested_tables(names: list[str], row_counts: dict[str, int],
                     partitioned: dict[str, list[str]] | None = None) -> list[tuple[str, str, str]]:
    """(key, schema, table) of each named table, parsed as SQL would and looked up in the
    backup's manifest (key is the manifest's spelling); a partitioned table is one table
    here (its partitions come with it). A name that is not a table of the backup is
    refused before anything runs."""
    if not names:
        raise ConfigError("name at least one table to recover (--table schema.table)")
    in_backup = {postgres.parse_table_name(key): key for key in [*row_counts, *(partitioned or {})]}
    wanted: list[tuple[str, str, str]] = []
    for name in names:
        schema, table = postgres.parse_table_name(name)
        if (schema, table) not in in_backup:
            raise ConfigError(f"{name} is not a table in this backup")
        entry = (in_backup[(schema, table)], schema, table)
        if entry not in wanted:
            wanted.append(entry)
    return wanted


def check_target_tables(target_url: str, wanted: list[tuple[str, str, str]], mode: str,
                        row_filter: str | None) -> None:
    """Refuse, before the restore starts, what the target's tables make impossible."""
    with postgres.connect(target_url) as conn:
        for key, schema, table in wanted:
            shape = table_shape(conn, schema, table)
            if shape is None and mode != "side-table":
                raise ConfigError(f"{key} does not exist in {dsn.display_dsn(target_url)}: "
                                  "recover it with --mode side-table, or restore the backup elsewhere")
            if shape is not None and not shape.primary_key and mode == "missing-rows":
                raise ConfigError(f"{key} has no primary key, so missing rows cannot be told apart: "
                                  "use --mode side-table (or replace)")
            if shape is not None and not shape.primary_key and mode == "replace" and row_filter:
                raise ConfigError(f"{key} has no primary key: replace with --where needs one to match rows")


def recover_table_rows(target_url: str, temp_url: str, key: str, schema: str, table: str, mode: str,
                       row_filter: str | None, dry_run: bool, backup_id: str,
                       moment: datetime) -> dict[str, Any]:
    """One table from the temporary database into the target, in one transaction on the
    target (rolled back in a dry run); returns what was done, row counts per action."""
    # The operator's filter runs only on the temporary copy, read-only, with least privilege.
    with filter_reader(temp_url, schema, table, row_filter) as source, \
            postgres.connect(target_url) as target:
        backup = table_shape(source, schema, table)
        current = table_shape(target, schema, table)
        if backup is None:
            raise PgdrError(f"{key} is missing from the restored backup")
        entry: dict[str, Any] = {
            "table": key, "rows_in_backup": count_source_rows(source, backup, row_filter),
            "rows_present": None, "rows_inserted": None, "rows_replaced": None, "rows_updated": None,
            "rows_deleted": None, "side_table": None, "sequences": [],
        }
        columns = _carried_columns(backup, current, mode, key)
        try:
            with target.transaction():
                if mode == "side-table":
                    _to_side_table(source, target, backup, current, columns, row_filter, dry_run, backup_id,
                                   moment, entry)
                else:
                    assert current is not None  # check_target_tables refused a missing table
                    _merge(source, target, backup, current, columns, mode, row_filter, dry_run, entry)
                if dry_run:
                    raise psycopg.Rollback()
        except psycopg.Error as exc:
            raise explain(exc, key) from None
    return entry


def _carried_columns(backup: TableShape, current: TableShape | None, mode: str, key: str) -> list[str]:
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


def _to_side_table(source: psycopg.Connection, target: psycopg.Connection, backup: TableShape,
                   current: TableShape | None, columns: list[str], row_filter: str | None,
                   dry_run: bool, backup_id: str, moment: datetime, entry: dict[str, Any]) -> None:
    if dry_run:
        destination = table_merge.create_stage(target, backup, columns)
    else:
        name = restoring.derived_name(backup.table, "recovered", moment)
        destination, entry["side_table"] = table_merge.create_side_table(
            target, backup, name, columns, f"pgdr: rows of {entry['table']} from backup {backup_id}"
            + (f" where {row_filter}" if row_filter else ""))
    entry["rows_inserted"] = stream_rows(source, target, backup, columns, destination, row_filter)
    if current is not None and current.primary_key and set(current.primary_key) <= set(columns):
        entry["rows_present"] = table_merge.count_present(target, current, destination)


def _merge(source: psycopg.Connection, target: psycopg.Connection, backup: TableShape,
           current: TableShape, columns: list[str], mode: str, row_filter: str | None,
           dry_run: bool, entry: dict[str, Any]) -> None:
    stage = table_merge.create_stage(target, backup, columns)
    staged = stream_rows(source, target, backup, columns, stage, row_filter)
    if not current.primary_key:  # replace of a whole table without a key: all rows out, all in
        table_merge.lock_for_replace(target, current)
        _refuse_cascades(target, current, table_merge.count_extra(target, current, stage), entry["table"])
        entry["rows_deleted"] = table_merge.delete_extra(target, current, stage)
        entry["rows_inserted"] = table_merge.insert_all(target, current.ident, stage, columns)
        entry["rows_replaced"] = staged
        return
    present = table_merge.count_present(target, current, stage)
    entry["rows_present"] = present
    if mode == "replace":
        if not dry_run:
            table_merge.lock_for_replace(target, current)
        # With a filter, only the filtered rows take the backup's content: which target
        # rows the filter covers is unknown, as it never runs on the target.
        extra = 0 if row_filter else table_merge.count_extra(target, current, stage)
        _refuse_cascades(target, current, extra, entry["table"])
        if dry_run:
            entry["rows_updated"] = table_merge.count_changed(target, current, stage, columns)
            entry["rows_deleted"] = extra
        else:
            entry["rows_updated"] = table_merge.update_changed(target, current, stage, columns)
            entry["rows_deleted"] = table_merge.delete_extra(target, current, stage) if extra else 0
        entry["rows_replaced"] = staged
    entry["rows_inserted"] = (staged - present if dry_run
                              else table_merge.insert_missing(target, current, stage, columns))
    if not dry_run and (entry["rows_inserted"] or entry["rows_updated"]):
        entry["sequences"] = table_merge.advance_sequences(target, current)


def _refuse_cascades(conn: psycopg.Connection, current: TableShape, deleting: int, key: str) -> None:
    cascades = table_merge.cascading_references(conn, current) if deleting else []
    if cascades:
        raise ConfigError(f"replacing {key} would delete {deleting} row(s) and cascade into "
                          f"{', '.join(cascades)}: use --mode missing-rows or side-table")


def explain(exc: psycopg.Error, table: str) -> PgdrError:
    """A database refusal (constraint, missing column...) as one line naming the table."""
    diag = getattr(exc, "diag", None)
    detail = f" ({diag.message_detail})" if diag is not None and diag.message_detail else ""
    return PgdrError(f"recovering {table} failed: {first_line(exc)}{detail}")
