"""The operator's row filter in a selective table recovery (`--where`): checked to be one
expression, refused before it runs if it calls a function outside the allow-list, and run
only on the temporary database, read-only, as a role that may read the one table."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from pgdr.ops.errors import ConfigError, PgdrError, first_line
from pgdr.ops.settings import load_settings
from pgdr.postgres import postgres
from pgdr.restore.table_rows import TableShape, source_query, table_shape


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
        tree = _parse_tree(conn, source_query(shape, sql.SQL("1"), row_filter))
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

