"""Rows merged on the target in a selective table recovery: staged, compared with the
table's, inserted, updated or deleted (missing-rows, replace) or written to a side table;
and the table's sequences moved past the recovered rows."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pgdr.restore.table_rows import TableShape, column_list

STAGE = "pgdr_recovery_stage"


def _key_match(key: list[str], left: str, right: str) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(left, col), sql.Identifier(right, col)) for col in key)


def _definitions(backup: TableShape, columns: list[str]) -> sql.Composable:
    # Type names come from format_type() on the backup's catalog: already quoted SQL.
    return sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(backup.types[c]))  # type: ignore[arg-type]
                              for c in columns)


def create_stage(conn: psycopg.Connection, backup: TableShape, columns: list[str]) -> sql.Identifier:
    """A temporary table on the target with the backup's column types, dropped at commit."""
    stage = sql.Identifier(STAGE)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(stage))
    conn.execute(sql.SQL("CREATE TEMPORARY TABLE {} ({}) ON COMMIT DROP").format(
        stage, _definitions(backup, columns)))
    return stage


def count_present(conn: psycopg.Connection, target: TableShape, stage: sql.Identifier) -> int:
    """Staged rows whose primary key the target already holds."""
    query = sql.SQL("SELECT count(*) FROM {} s WHERE EXISTS (SELECT 1 FROM {} t WHERE {})").format(
        stage, target.own_rows, _key_match(target.primary_key, "t", "s"))
    return int(conn.execute(query).fetchone()[0])  # type: ignore[index]


def insert_missing(conn: psycopg.Connection, target: TableShape, stage: sql.Identifier,
                   columns: list[str]) -> int:
    """INSERT the staged rows whose key is absent. ON CONFLICT on the key covers rows a
    client inserts meanwhile; any other unique conflict fails the table loudly."""
    query = sql.SQL(
        "INSERT INTO {t} AS t ({cols}) OVERRIDING SYSTEM VALUE SELECT {scols} FROM {stage} s"
        " WHERE NOT EXISTS (SELECT 1 FROM {own} t WHERE {match}) ON CONFLICT ({key}) DO NOTHING"
    ).format(t=target.ident, own=target.own_rows, cols=column_list(columns), scols=column_list(columns, "s"),
             stage=stage, match=_key_match(target.primary_key, "t", "s"), key=column_list(target.primary_key))
    return conn.execute(query).rowcount


def update_changed(conn: psycopg.Connection, target: TableShape, stage: sql.Identifier,
                   columns: list[str]) -> int:
    """Give rows present in both the backup's values; the rows given."""
    return _changed(conn, target, stage, columns, count_only=False)


def count_changed(conn: psycopg.Connection, target: TableShape, stage: sql.Identifier,
                  columns: list[str]) -> int:
    """The rows update_changed would give the backup's values (a dry run)."""
    return _changed(conn, target, stage, columns, count_only=True)


def _changed(conn: psycopg.Connection, target: TableShape, stage: sql.Identifier, columns: list[str],
             count_only: bool) -> int:
    """Rows present in both whose values differ (compared as text, which works for every
    type, json included): counted, or given the backup's values."""
    values = [c for c in columns if c not in target.primary_key]
    if not values:
        return 0
    differs = sql.SQL("{match} AND ROW({tcols})::text IS DISTINCT FROM ROW({scols})::text").format(
        match=_key_match(target.primary_key, "t", "s"), tcols=column_list(values, "t"),
        scols=column_list(values, "s"))
    if count_only:
        query = sql.SQL("SELECT count(*) FROM {t} AS t, {stage} s WHERE {differs}").format(
            t=target.own_rows, stage=stage, differs=differs)
        return int(conn.execute(query).fetchone()[0])  # type: ignore[index]
    query = sql.SQL("UPDATE {t} AS t SET ({cols}) = ROW({scols}) FROM {stage} s WHERE {differs}").format(
        t=target.own_rows, cols=column_list(values), scols=column_list(values, "s"), stage=stage,
        differs=differs)
    return conn.execute(query).rowcount


def _absent_from_stage(target: TableShape, stage: sql.Identifier) -> sql.Composable:
    return sql.SQL("NOT EXISTS (SELECT 1 FROM {stage} s WHERE {match})").format(
        stage=stage, match=_key_match(target.primary_key, "t", "s"))


def count_extra(conn: psycopg.Connection, target: TableShape, stage: sql.Identifier) -> int:
    """Target rows the backup does not hold (replace deletes them)."""
    if not target.primary_key:
        return int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target.own_rows))
                   .fetchone()[0])  # type: ignore[index]
    query = sql.SQL("SELECT count(*) FROM {} t WHERE {}").format(
        target.own_rows, _absent_from_stage(target, stage))
    return int(conn.execute(query).fetchone()[0])  # type: ignore[index]


def delete_extra(conn: psycopg.Connection, target: TableShape, stage: sql.Identifier) -> int:
    if not target.primary_key:
        return conn.execute(sql.SQL("DELETE FROM {}").format(target.own_rows)).rowcount
    query = sql.SQL("DELETE FROM {} t WHERE {}").format(target.own_rows, _absent_from_stage(target, stage))
    return conn.execute(query).rowcount


def insert_all(conn: psycopg.Connection, destination: sql.Composable, stage: sql.Identifier,
               columns: list[str]) -> int:
    query = sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {}").format(
        destination, column_list(columns), column_list(columns), stage)
    return conn.execute(query).rowcount


_CASCADING_REFERENCES_SQL = """
SELECT c.conname, c.conrelid::regclass::text
FROM pg_catalog.pg_constraint c
WHERE c.contype = 'f' AND c.confrelid = %s::regclass AND c.conrelid <> c.confrelid
  AND c.confdeltype IN ('c', 'n', 'd')
"""


def cascading_references(conn: psycopg.Connection, target: TableShape) -> list[str]:
    """Foreign keys of other tables that a DELETE here would cascade into (CASCADE, SET
    NULL, SET DEFAULT): replace refuses to change other tables behind the operator's back."""
    rows = conn.execute(_CASCADING_REFERENCES_SQL, (target.ident.as_string(conn),)).fetchall()
    return [f"{table} ({name})" for name, table in rows]


def lock_for_replace(conn: psycopg.Connection, target: TableShape) -> None:
    """Readers go on; writers wait until the table holds the backup's content (all of its
    partitions, for a partitioned table)."""
    conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(target.own_rows))


def create_side_table(conn: psycopg.Connection, backup: TableShape, name: str, columns: list[str],
                      comment: str) -> tuple[sql.Identifier, str]:
    """A new table `name` beside the original (same schema) with the backup's columns;
    returns it and its name as SQL writes it."""
    ident = sql.Identifier(backup.schema, name)
    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(
        ident, _definitions(backup, columns)))
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(ident, sql.Literal(comment)))
    shown = conn.execute("SELECT quote_ident(%s) || '.' || quote_ident(%s)", (backup.schema, name)).fetchone()
    return ident, str(shown[0])  # type: ignore[index]


# --- sequences ---------------------------------------------------------------------------

_SEQUENCES_SQL = """
SELECT a.attname, pg_catalog.pg_get_serial_sequence(%(table)s, a.attname)
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = %(table)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
  AND pg_catalog.pg_get_serial_sequence(%(table)s, a.attname) IS NOT NULL
"""

# Where the sequence stands: the last value handed out, or (never used) one step before its start.
_SEQUENCE_STATE_SQL = """
SELECT coalesce(pg_catalog.pg_sequence_last_value(q.seqrelid), q.seqstart - q.seqincrement), q.seqincrement
FROM pg_catalog.pg_sequence q WHERE q.seqrelid = %s::regclass
"""


def advance_sequences(conn: psycopg.Connection, target: TableShape) -> list[dict[str, Any]]:
    """Move each sequence that feeds a column of the table (serial or identity) past the
    column's highest value, so new rows do not collide with recovered ones. A sequence
    already further on, or counting downwards, is left alone."""
    moved = []
    table = target.ident.as_string(conn)
    for column, sequence in conn.execute(_SEQUENCES_SQL, {"table": table}).fetchall():
        highest = conn.execute(sql.SQL("SELECT max({})::bigint FROM {}").format(
            sql.Identifier(column), target.own_rows)).fetchone()[0]  # type: ignore[index]
        current, increment = conn.execute(_SEQUENCE_STATE_SQL, (sequence,)).fetchone()  # type: ignore[misc]
        if highest is not None and increment > 0 and highest > current:
            conn.execute("SELECT pg_catalog.setval(%s, %s, true)", (sequence, highest))
            moved.append({"sequence": sequence, "column": column, "from": current, "to": highest})
    return moved
