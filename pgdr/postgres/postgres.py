"""The one way pgdr talks to PostgreSQL: connections, child-process environments, table names, server facts.

Passwords reach pg_dump and friends through a 0600 passfile named in the child's
environment, never through argv. Identifiers are always composed with psycopg.sql.
URLs are parsed in pgdr.postgres.dsn, programs chosen in pgdr.postgres.programs.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgdr.ops.errors import ConfigError, PgdrError, TransientError, first_line, is_transient
from pgdr.pipeline.runs import private_directory, sweep_dead_runs
from pgdr.postgres.dsn import display_dsn, params_with_password, password_of, with_database

PASSFILE_PREFIX = "pgdr-pass-"

def _users_relation(relation: str, namespace: str) -> str:
    """The SQL condition that the relation (alias) in the schema (alias) is the users': not
    in a system schema, and not an extension's."""
    return f"""{namespace}.nspname NOT IN ('pg_catalog', 'information_schema')
  AND {namespace}.nspname NOT LIKE 'pg\\_toast%' AND {namespace}.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = {relation}.oid AND d.deptype = 'e')"""


# Tables whose rows pg_dump writes: ordinary tables (partitions included) outside the
# system schemas and extensions. quote_ident() on the server decides which names need
# quotes, exactly as PostgreSQL itself would.
_TABLES_SQL = f"""
SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND {_users_relation("c", "n")}
ORDER BY n.nspname, c.relname
"""


# Partitioned tables (a partition may itself be partitioned) and the partitions that store
# their rows; the same schemas and extension rule as _TABLES_SQL.
_PARTITIONED_SQL = f"""
SELECT quote_ident(n.nspname) || '.' || quote_ident(p.relname),
       array_agg(quote_ident(ln.nspname) || '.' || quote_ident(l.relname) ORDER BY ln.nspname, l.relname)
         FILTER (WHERE l.oid IS NOT NULL)
FROM pg_class p JOIN pg_namespace n ON n.oid = p.relnamespace
LEFT JOIN LATERAL pg_partition_tree(p.oid) t ON t.isleaf
LEFT JOIN pg_class l ON l.oid = t.relid AND l.relkind = 'r'
LEFT JOIN pg_namespace ln ON ln.oid = l.relnamespace
WHERE p.relkind = 'p' AND {_users_relation("p", "n")}
GROUP BY n.nspname, p.relname
ORDER BY n.nspname, p.relname
"""


def connect(url: str, *, dbname: str | None = None, autocommit: bool = False,
            connect_timeout: int = 10) -> psycopg.Connection:
    """Connect, or raise a one-line PgdrError that carries no password."""
    target = with_database(url, dbname) if dbname else url
    try:
        return psycopg.connect(
            make_conninfo("", **params_with_password(target)),
            autocommit=autocommit,
            connect_timeout=connect_timeout,
            application_name="pgdr",
        )
    except psycopg.Error as exc:
        message = first_line(exc, [password_of(target) or ""])
        error = TransientError if is_transient(exc) else PgdrError
        raise error(f"cannot connect to {display_dsn(target)}: {message}") from None


@contextmanager
def libpq_env(url: str, *, dbname: str | None = None) -> Iterator[dict[str, str]]:
    """Environment variables that point a libpq program at url; the password, if any,
    lives in a 0600 passfile that is removed afterwards."""
    params = params_with_password(url)
    if dbname:
        params["dbname"] = dbname
    mapping = {
        "host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
        "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT",
        "sslkey": "PGSSLKEY", "connect_timeout": "PGCONNECT_TIMEOUT",
    }
    env = {var: params[key] for key, var in mapping.items() if key in params}
    env["PGAPPNAME"] = "pgdr"
    password = params.get("password")
    if not password:
        yield env
        return
    # Named after this run: if it is killed, the next run (and prune) removes the file.
    sweep_dead_runs(None, PASSFILE_PREFIX)
    tmp = private_directory(PASSFILE_PREFIX)
    try:
        passfile = Path(tmp) / "pgpass"

        def escape(value: str) -> str:
            return value.replace("\\", "\\\\").replace(":", "\\:")

        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"*:*:*:*:{escape(password)}\n")
        env["PGPASSFILE"] = str(passfile)
        yield env
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def server_major(conn: psycopg.Connection) -> int:
    return int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000  # type: ignore[index]


# --- names -----------------------------------------------------------------------------

_IDENT = r'(?:"(?:[^"]|"")+"|[^\s."]+)'
_QUALIFIED = re.compile(rf"^\s*({_IDENT})(?:\s*\.\s*({_IDENT}))?\s*$")


def _unquote(part: str) -> str:
    if part.startswith('"'):
        return part[1:-1].replace('""', '"')
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", part):
        raise ConfigError(f"{part!r} is not a valid identifier (quote it with double quotes)")
    return part.lower()  # SQL folds unquoted names to lower case


def parse_table_name(text: str, default_schema: str = "public") -> tuple[str, str]:
    """`schema.table` as written in SQL (quotes for mixed case or spaces) -> (schema, table)."""
    match = _QUALIFIED.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a table name (write schema.table, quoting as in SQL)")
    first, second = match.group(1), match.group(2)
    if second is None:
        return default_schema, _unquote(first)
    return _unquote(first), _unquote(second)


def table_identifier(schema: str, table: str) -> sql.Identifier:
    return sql.Identifier(schema, table)


# --- server facts ------------------------------------------------------------------------


def server_version(conn: psycopg.Connection) -> str:
    return str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]


def user_tables(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """(key, schema, table) for every table whose rows pg_dump writes."""
    return [(key, schema, table) for _oid, key, schema, table in conn.execute(_TABLES_SQL)]


def table_rows(schema: str, table: str, select: str | sql.Composable = "count(*)") -> sql.Composed:
    """`SELECT <select> FROM ONLY <table> AS t`: the one rule for a table's rows, shared by
    the backup's counts and the restore's validation. Each table counts the rows stored in
    it alone: an inheritance parent without its children, a partition on its own (its
    partitioned parent stores nothing and is not a table here), so every row counts once."""
    chosen = sql.SQL(select) if isinstance(select, str) else select  # type: ignore[arg-type]
    return sql.SQL("SELECT {} FROM ONLY {} AS t").format(chosen, table_identifier(schema, table))


# A row's text depends on these session settings: the backup and the validation (on any
# server, whatever the database's or the role's own settings) fix them to print rows alike.
DIGEST_SETTINGS = {"DateStyle": "ISO,MDY", "IntervalStyle": "postgres", "TimeZone": "UTC",
                   "extra_float_digits": "1", "bytea_output": "hex", "lc_monetary": "C",
                   "search_path": "pg_catalog"}


def digest_select(columns: list[str]) -> sql.Composable:
    """`rows, digest` of a table's rows: the count, and the sum of a 64-bit hash of each
    row's text (order-independent, computed by the server). Columns go by name, so that
    a column order pg_dump does not keep (inherited columns) changes nothing."""
    row = sql.SQL("ROW({})").format(sql.SQL(", ").join(sql.Identifier("t", c) for c in sorted(columns)))
    return sql.SQL("count(*) AS rows, coalesce(sum(hashtextextended({}::text, 0)), 0)::text AS digest"
                   ).format(row)


_COLUMNS_SQL = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), array_agg(a.attname::text)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%'
GROUP BY 1
"""


def table_columns(conn: psycopg.Connection) -> dict[str, list[str]]:
    """The columns of every table, keyed as user_tables keys them."""
    return {key: list(columns) for key, columns in conn.execute(_COLUMNS_SQL)}


def count_rows(conn: psycopg.Connection, digests: dict[str, str] | None = None) -> dict[str, int]:
    """Rows per table; given `digests`, fills it with each table's content digest (one scan
    for both, with DIGEST_SETTINGS for the rest of the transaction)."""
    counts: dict[str, int] = {}
    columns = table_columns(conn) if digests is not None else {}
    if digests is not None:
        use_digest_settings(conn)
    for key, schema, table in user_tables(conn):
        if digests is None:
            counts[key] = int(conn.execute(table_rows(schema, table)).fetchone()[0])  # type: ignore[index]
            continue
        counts[key], digests[key] = table_digest(conn, schema, table, columns[key])
    return counts


def use_digest_settings(conn: psycopg.Connection) -> None:
    """DIGEST_SETTINGS for the rest of conn's transaction: rows print as they did in the
    backup's snapshot."""
    for name, value in DIGEST_SETTINGS.items():
        conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", (name, value))


def table_digest(conn: psycopg.Connection, schema: str, table: str, columns: list[str]) -> tuple[int, str]:
    """(rows, content digest) of one table: one scan (DIGEST_SETTINGS must be in effect)."""
    rows, digest = conn.execute(table_rows(schema, table, digest_select(columns))).fetchone()  # type: ignore[misc]
    return int(rows), digest


def partitioned_tables(conn: psycopg.Connection) -> dict[str, list[str]]:
    """Each partitioned table (keyed as user_tables keys tables) with the partitions that
    store its rows, at every level below it."""
    return {key: list(leaves or []) for key, leaves in conn.execute(_PARTITIONED_SQL)}


def current_wal_lsn(conn: psycopg.Connection) -> str | None:
    """The WAL position now (a standby reports its replay position); None when the role
    may not ask."""
    try:
        row = conn.execute(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " ELSE pg_current_wal_lsn() END::text"
        ).fetchone()
    except psycopg.Error:
        conn.rollback()
        return None
    return row[0] if row else None


def database_size(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])  # type: ignore[index]


# --- databases -----------------------------------------------------------------------------


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def create_database(conn: psycopg.Connection, name: str, *, template: str = "template0") -> None:
    conn.execute(
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
    )


def drop_database(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def block_and_terminate(conn: psycopg.Connection, name: str) -> None:
    """Refuse new connections to a database and end the current ones."""
    conn.execute(
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name))
    )
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    )


def allow_connections(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(name)))


def rename_database(conn: psycopg.Connection, old: str, new: str) -> None:
    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))
