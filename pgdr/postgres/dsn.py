"""Database URLs: parsing them, the passwords kept out of them, and what they name.

connect and libpq_env (pgdr.postgres.postgres) give a URL back the password it lacks
(params_with_password).
"""

from __future__ import annotations

import os
from contextlib import suppress

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgdr.ops.errors import ConfigError


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


def params_with_password(url: str) -> dict[str, str]:
    """url's parameters, with the password it lacks filled in: one given earlier in this
    process, else the configured one (libpq's own ~/.pgpass still applies after that)."""
    params = parse_dsn(url)
    if "password" in params:
        return params
    password = _PASSWORDS.get(_server_key(params)) or _configured_password(params)
    return {**params, "password": password} if password else params


def password_of(url: str) -> str | None:
    try:
        return params_with_password(url).get("password")
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
