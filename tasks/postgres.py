"""The one way pgdr talks to PostgreSQL: connections, child-process environments, names.

Passwords reach pg_dump and friends through a 0600 passfile named in the child's
environment, never through argv. Identifiers are always composed with psycopg.sql.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tasks.errors import ConfigError, PgdrError, TransientError, is_transient
from tasks.process import redact

# Tables whose rows pg_dump writes: ordinary tables (partitions included) outside the
# system schemas and extensions. quote_ident() on the server decides which names need
# quotes, exactly as PostgreSQL itself would.
_TABLES_SQL = """
SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY n.nspname, c.relname
"""


def parse_dsn(url: str) -> dict[str, str]:
    """A libpq URL or key=value string as a dict; ConfigError without echoing it."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise ConfigError("the database URL is not a valid PostgreSQL connection string") from None
    return {k: str(v) for k, v in params.items() if v is not None}


# Passwords given on a command line, kept in this process only, so that flow parameters
# (which Prefect stores and shows) carry URLs without them.
_PASSWORDS: dict[tuple[str, str, str], str] = {}


def _server_key(params: dict[str, str]) -> tuple[str, str, str]:
    return (params.get("host", ""), params.get("port", "5432"), params.get("user", ""))


def strip_password(url: str) -> str:
    """Remember url's password for this process; return url without it."""
    params = parse_dsn(url)
    password = params.pop("password", None)
    if password is None:
        return url
    _PASSWORDS[_server_key(params)] = password
    return make_conninfo("", **params)


def _with_password(params: dict[str, str]) -> dict[str, str]:
    """Fill in a password the URL lacks: one given earlier in this process, else the
    runbook's DB_PASSWORD (libpq's own ~/.pgpass still applies after that)."""
    if "password" in params:
        return params
    password = _PASSWORDS.get(_server_key(params)) or os.environ.get("DB_PASSWORD")
    return {**params, "password": password} if password else params


def password_of(url: str) -> str | None:
    try:
        return _with_password(parse_dsn(url)).get("password")
    except ConfigError:
        return None


def database_name(url: str) -> str:
    params = parse_dsn(url)
    name = params.get("dbname") or params.get("user") or os.environ.get("PGDATABASE")
    if not name:
        raise ConfigError("the database URL names no database")
    return name


def with_database(url: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    params = parse_dsn(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def display_dsn(url: str) -> str:
    """Where a URL points, for people: user@host:port/db, never the password."""
    params = parse_dsn(url)
    host = params.get("host", "localhost")
    user = params.get("user", "")
    where = f"{host}:{params['port']}" if params.get("port") else host
    return f"{user + '@' if user else ''}{where}/{params.get('dbname', '')}"


def host_key(url: str) -> str:
    """host:port, naming a server (concurrency limits, audit)."""
    params = parse_dsn(url)
    return f"{params.get('host', 'localhost')}:{params.get('port', '5432')}"


def connect(url: str, *, dbname: str | None = None, autocommit: bool = False,
            connect_timeout: int = 10) -> psycopg.Connection:
    """Connect, or raise a one-line PgdrError that carries no password."""
    target = with_database(url, dbname) if dbname else url
    try:
        return psycopg.connect(
            make_conninfo("", **_with_password(parse_dsn(target))),
            autocommit=autocommit,
            connect_timeout=connect_timeout,
            application_name="pgdr",
        )
    except psycopg.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = redact(first_line, [password_of(target) or ""])
        error = TransientError if is_transient(exc) else PgdrError
        raise error(f"cannot connect to {display_dsn(target)}: {message}") from None


@contextmanager
def libpq_env(url: str, *, dbname: str | None = None) -> Iterator[dict[str, str]]:
    """Environment variables that point a libpq program at url; the password, if any,
    lives in a 0600 passfile that is removed afterwards."""
    params = _with_password(parse_dsn(url))
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
    with tempfile.TemporaryDirectory(prefix="pgdr-pass-") as tmp:
        passfile = Path(tmp) / "pgpass"

        def escape(value: str) -> str:
            return value.replace("\\", "\\\\").replace(":", "\\:")

        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"*:*:*:*:{escape(password)}\n")
        env["PGPASSFILE"] = str(passfile)
        yield env


def pg_bin(program: str) -> str:
    """A PostgreSQL client program: PGDR_PG_BIN if set, else the newest installed."""
    configured = os.environ.get("PGDR_PG_BIN")
    if configured:
        return str(Path(configured) / program)
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / program).exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return str(versions[-1] / program) if versions else program


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


def count_rows(conn: psycopg.Connection) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key, schema, table in user_tables(conn):
        query = sql.SQL("SELECT count(*) FROM ONLY {}").format(table_identifier(schema, table))
        counts[key] = int(conn.execute(query).fetchone()[0])  # type: ignore[index]
    return counts


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
