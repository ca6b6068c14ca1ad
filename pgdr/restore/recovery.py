"""Selective table recovery: bring rows of a table back from a restored copy.

The backup is restored into a temporary database beside the target. Rows travel from
it to the target by COPY (streamed, never held in memory) into a temporary staging
table on the target, and are merged from there in one transaction per table. The
operator's row filter is SQL by design: it only ever runs in a read-only SELECT on the
temporary database, never in a statement on the target.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgdr.ops.errors import ConfigError, PgdrError, first_line
from pgdr.ops.settings import load_settings
from pgdr.postgres import postgres

MODES = ("missing-rows", "replace", "side-table")
STAGE = "pgdr_recovery_stage"
COPY_CHUNK_BYTES = 1 << 20


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def check_row_filter(text: str | None) -> str | None:
    """The filter must be one boolean expression: no statement separator, no comment, and
    parentheses balanced outside literals, so that it cannot leave the WHERE (...) it is
    placed in. The server then parses it with the extended protocol, which refuses a
    second statement anyway."""
    if text is None:
        return None
    if not text.strip():
        raise ConfigError("the row filter (--where) is empty")
    depth, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c == "'":
            # E'...' strings let a backslash escape a quote; standard ones do not.
            escapes = i > 0 and text[i - 1] in "eE"
            i = _closing_quote(text, i, "'", escapes)
        elif c == '"':
            i = _closing_quote(text, i, '"', False)
        elif c == "$" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            i = _closing_dollar(text, i)
        elif c == ";":
            raise ConfigError("the row filter (--where) may not contain ';' outside a string: "
                              "it is one condition, not statements")
        elif text.startswith(("--", "/*"), i):
            raise ConfigError("the row filter (--where) may not contain comments")
        elif c in "()":
            depth += 1 if c == "(" else -1
            if depth < 0:
                raise ConfigError("the row filter (--where) has an unbalanced ')'")
        i += 1
    if depth:
        raise ConfigError("the row filter (--where) has an unbalanced '('")
    return text


def _closing_quote(text: str, start: int, quote: str, escapes: bool) -> int:
    i = start + 1
    while i < len(text):
        if escapes and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if text.startswith(quote * 2, i):
                i += 2
                continue
            return i
        i += 1
    raise ConfigError("the row filter (--where) has an unterminated quote")


def _closing_dollar(text: str, start: int) -> int:
    end = start + 1
    while end < len(text) and (text[end].isalnum() or text[end] == "_"):
        end += 1
    if end >= len(text) or text[end] != "$":
        return start  # a positional parameter such as $1: the server will refuse it
    tag = text[start:end + 1]
    close = text.find(tag, end + 1)
    if close < 0:
        raise ConfigError("the row filter (--where) has an unterminated $-quoted string")
    return close + len(tag) - 1


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


# --- what a table looks like -------------------------------------------------------------


@dataclass
class TableShape:
    """The columns of a table (in order) and its primary key, read from the catalog."""

    schema: str
    table: str
    name: str  # as SQL writes it, quoted where needed
    columns: list[str]
    types: dict[str, str]
    primary_key: list[str]
    # Columns the server computes or fills (GENERATED ALWAYS AS (...) STORED): never written.
    generated: set[str] = field(default_factory=set)
    partitioned: bool = False

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def own_rows(self) -> sql.Composable:
        """The table as a source of its own rows: ONLY the table (never an inheritance
        child's rows), but all of a partitioned table, whose rows live in its partitions."""
        return self.ident if self.partitioned else sql.SQL("ONLY {}").format(self.ident)



_COLUMNS_SQL = """
SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attgenerated <> ''
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_PRIMARY_KEY_SQL = """
SELECT a.attname
FROM pg_catalog.pg_constraint c
CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, position)
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
WHERE c.conrelid = %(oid)s AND c.contype = 'p'
ORDER BY k.position
"""

_TABLE_OID_SQL = """
SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind = 'p'
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
"""


def table_shape(conn: psycopg.Connection, schema: str, table: str) -> TableShape | None:
    """The table's shape, or None when the database has no such table. Type names are
    written schema-qualified (search_path is only pg_catalog while they are read), so
    that they mean the same in another database."""
    with conn.transaction():
        conn.execute("SET LOCAL search_path = pg_catalog")
        row = conn.execute(_TABLE_OID_SQL, (schema, table)).fetchone()
        if row is None:
            return None
        columns = conn.execute(_COLUMNS_SQL, {"oid": row[0]}).fetchall()
        key = [r[0] for r in conn.execute(_PRIMARY_KEY_SQL, {"oid": row[0]})]
    return TableShape(schema, table, row[1], [c[0] for c in columns], {c[0]: c[1] for c in columns}, key,
                      {c[0] for c in columns if c[2]}, bool(row[2]))


# --- reading the backup's rows (temporary database) ------------------------------------------


def _source_query(shape: TableShape, select: sql.Composable, row_filter: str | None) -> sql.Composed:
    query = sql.SQL("SELECT {} FROM {}").format(select, shape.own_rows)
    if row_filter is not None:
        # Checked by check_row_filter: one expression that cannot leave its parentheses.
        query = sql.SQL("{} WHERE ({})").format(query, sql.SQL(row_filter))  # type: ignore[arg-type]
    return query


def count_source_rows(conn: psycopg.Connection, shape: TableShape, row_filter: str | None) -> int:
    """Rows of the backup's table that pass the filter. prepare=True sends the query by
    the extended protocol, which refuses more than one statement; the connection is
    read-only, so the filter cannot write even through a function."""
    query = _source_query(shape, sql.SQL("count(*)"), row_filter)
    try:
        return int(conn.execute(query, prepare=True).fetchone()[0])  # type: ignore[index]
    except psycopg.Error as exc:
        conn.rollback()
        raise ConfigError(f"the row filter does not work on {shape.name}: {first_line(exc)}") from None


# --- the operator's row filter, with least privilege ------------------------------------------

FILTER_ROLE_PREFIX = "pgdr_filter_"
# Built-in functions that are only STABLE but that filters on time and text need; every
# other function a filter calls must be built in and IMMUTABLE.
_STABLE_ALLOWED = frozenset({
    "now", "statement_timestamp", "transaction_timestamp", "age", "date", "date_part", "date_trunc",
    "extract", "make_timestamptz", "timestamp", "timestamptz", "timestamptz_pl_interval",
    "timestamptz_mi_interval", "interval_pl_timestamptz", "to_char", "to_date", "to_timestamp",
    "to_number", "concat", "concat_ws", "format", "overlaps", "array_to_string", "anytextcat",
    "textanycat", "quote_literal", "quote_nullable",
})
_CROSS_TYPE_COMPARISON = re.compile(
    r"(date|timestamp|timestamptz)_(eq|ne|lt|le|gt|ge)_(date|timestamp|timestamptz)")
_FIRST_NORMAL_OID = 16384  # below it: objects built into PostgreSQL, never user-defined
# Function and operator references in a parse tree as the server prints it (debug_print_parse).
_FUNCTION_REFS = re.compile(r":\w*(?:funcid|fnoid) (\d+)")
_OPERATOR_REFS = re.compile(r":opno (\d+)|:opnos \(o ([\d ]+)\)")

_CALLED_SQL = """
SELECT p.oid, p.oid::regprocedure::text, p.proname, p.provolatile
FROM pg_catalog.pg_proc p
WHERE p.oid = ANY(%(functions)s)
   OR p.oid IN (SELECT o.oprcode FROM pg_catalog.pg_operator o WHERE o.oid = ANY(%(operators)s))
"""


def allowed_function(oid: int, name: str, volatility: str) -> bool:
    """A filter may call built-in functions that only compute (IMMUTABLE), and a few
    built-in STABLE ones for time and text; nothing that signals, reads files or settings,
    changes state, or was defined by a user."""
    if oid >= _FIRST_NORMAL_OID:
        return False
    return volatility == "i" or (volatility == "s" and (
        name in _STABLE_ALLOWED or _CROSS_TYPE_COMPARISON.fullmatch(name) is not None))


def _parse_tree(conn: psycopg.Connection, query: sql.Composed) -> str:
    """The server's own parse of query (names resolved, nothing planned or run), as the
    text debug_print_parse sends: the Parse message alone never executes anything."""
    trees: list[str] = []

    def collect(diag: psycopg.errors.Diagnostic) -> None:
        if (diag.message_primary or "").startswith("parse tree"):
            trees.append(diag.message_detail or "")

    conn.add_notice_handler(collect)
    try:
        with conn.transaction():
            conn.execute("SET LOCAL debug_print_parse = on")
            conn.execute("SET LOCAL client_min_messages = log")
            result = conn.pgconn.prepare(b"", query.as_bytes(conn))
            error = result.error_message.decode("utf-8", "replace").strip()
            if error:
                raise ConfigError(first_line(error).removeprefix("ERROR:").strip())
    finally:
        conn.remove_notice_handler(collect)
    return "\n".join(trees)


def refuse_unsafe_filter(conn: psycopg.Connection, shape: TableShape, row_filter: str) -> None:
    """Refuse, before it runs, a filter that calls a function outside the allow-list."""
    try:
        tree = _parse_tree(conn, _source_query(shape, sql.SQL("1"), row_filter))
    except ConfigError as exc:
        raise ConfigError(f"the row filter does not work on {shape.name}: {exc}") from None
    if not tree:
        raise PgdrError("the server did not show how it parses the row filter: refusing to run it")
    functions = sorted({int(oid) for oid in _FUNCTION_REFS.findall(tree) if oid != "0"})
    operators = sorted({int(oid) for one, many in _OPERATOR_REFS.findall(tree)
                        for oid in (one + " " + many).split()})
    called = conn.execute(_CALLED_SQL, {"functions": functions, "operators": operators}).fetchall()
    conn.rollback()
    refused = sorted(signature for oid, signature, name, volatility in called
                     if not allowed_function(oid, name, volatility))
    if refused:
        raise ConfigError(f"the row filter does not work on {shape.name}: it calls {', '.join(refused)}; "
                          "a filter may call only built-in immutable functions (and now(), date_trunc() "
                          "and the like)")


def _create_filter_role(conn: psycopg.Connection, role: str, shape: TableShape) -> None:
    try:
        with conn.transaction():
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(sql.Identifier(role)))
            conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role)))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(shape.schema),
                                                                          sql.Identifier(role)))
            conn.execute(sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(shape.ident, sql.Identifier(role)))
    except psycopg.Error as exc:
        raise ConfigError(f"a row filter runs as a role made for it, which the connecting user cannot create "
                          f"(it needs CREATEROLE): {first_line(exc)}") from None


def drop_filter_role(url: str, role: str) -> None:
    """Drop the filter's role and what it was granted (in the temporary copy)."""
    with postgres.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@contextmanager
def filter_reader(temp_url: str, schema: str, table: str, row_filter: str | None,
                  timeout_seconds: int | None = None) -> Iterator[psycopg.Connection]:
    """A read-only connection to the temporary copy, to read the backup's rows from.

    With a row filter, the filter is first refused if it calls a function outside the
    allow-list; then the connection switches to a role made for this table only (SELECT on
    it, nothing else: no superuser, no pg_signal_backend, no pg_read_server_files) with a
    statement timeout, and the role is dropped afterwards."""
    with postgres.connect(temp_url) as source:
        shape = table_shape(source, schema, table) if row_filter is not None else None
        if shape is None:
            source.read_only = True
            yield source
            return
        assert row_filter is not None
        refuse_unsafe_filter(source, shape, row_filter)
        role = FILTER_ROLE_PREFIX + secrets.token_hex(6)
        _create_filter_role(source, role, shape)
        try:
            timeout = timeout_seconds or load_settings().filter_timeout_seconds
            source.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            source.execute("SELECT pg_catalog.set_config('statement_timeout', %s, false)", (f"{timeout}s",))
            source.commit()
            source.read_only = True
            yield source
        finally:
            source.close()
            drop_filter_role(temp_url, role)


def stream_rows(source: psycopg.Connection, target: psycopg.Connection, shape: TableShape,
                columns: list[str], destination: sql.Composable, row_filter: str | None) -> int:
    """COPY the backup's rows out of the temporary database and into `destination` on
    the target, chunk by chunk. Returns the rows copied."""
    out_query = sql.SQL("COPY ({}) TO STDOUT").format(_source_query(shape, _columns(columns), row_filter))
    in_query = sql.SQL("COPY {} ({}) FROM STDIN").format(destination, _columns(columns))
    with source.cursor() as out_cur, target.cursor() as in_cur:
        with out_cur.copy(out_query) as reader, in_cur.copy(in_query) as writer:
            for chunk in reader:
                writer.write(chunk)
        return in_cur.rowcount


# --- merging on the target -----------------------------------------------------------------


def _columns(names: list[str], alias: str | None = None) -> sql.Composable:
    if alias is None:
        return sql.SQL(", ").join(map(sql.Identifier, names))
    return sql.SQL(", ").join(sql.Identifier(alias, name) for name in names)


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
    ).format(t=target.ident, own=target.own_rows, cols=_columns(columns), scols=_columns(columns, "s"),
             stage=stage, match=_key_match(target.primary_key, "t", "s"), key=_columns(target.primary_key))
    return conn.execute(query).rowcount


def update_changed(conn: psycopg.Connection, target: TableShape, stage: sql.Identifier,
                   columns: list[str]) -> int:
    """Give rows present in both the backup's values (compared as text, which works for
    every type, json included)."""
    values = [c for c in columns if c not in target.primary_key]
    if not values:
        return 0
    query = sql.SQL(
        "UPDATE {t} AS t SET ({cols}) = ROW({scols}) FROM {stage} s"
        " WHERE {match} AND ROW({tcols})::text IS DISTINCT FROM ROW({scols})::text"
    ).format(t=target.own_rows, cols=_columns(values), scols=_columns(values, "s"),
             tcols=_columns(values, "t"), stage=stage, match=_key_match(target.primary_key, "t", "s"))
    return conn.execute(query).rowcount


def count_changed(conn: psycopg.Connection, target: TableShape, stage: sql.Identifier,
                  columns: list[str]) -> int:
    values = [c for c in columns if c not in target.primary_key]
    if not values:
        return 0
    query = sql.SQL(
        "SELECT count(*) FROM {t} AS t JOIN {stage} s ON {match}"
        " WHERE ROW({tcols})::text IS DISTINCT FROM ROW({scols})::text"
    ).format(t=target.own_rows, stage=stage, match=_key_match(target.primary_key, "t", "s"),
             tcols=_columns(values, "t"), scols=_columns(values, "s"))
    return int(conn.execute(query).fetchone()[0])  # type: ignore[index]


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
        destination, _columns(columns), _columns(columns), stage)
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


def explain(exc: psycopg.Error, table: str) -> PgdrError:
    """A database refusal (constraint, missing column...) as one line naming the table."""
    diag = getattr(exc, "diag", None)
    detail = f" ({diag.message_detail})" if diag is not None and diag.message_detail else ""
    return PgdrError(f"recovering {table} failed: {first_line(exc)}{detail}")
