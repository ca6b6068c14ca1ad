"""Many databases, many servers: which databases a fleet run covers, in what order, and
how its outcome reads.

Members come from configuration (database URLs) or from discovery on a server (every
database that is not a template and accepts connections, filtered by include and exclude
patterns). A server is named `host:port`; the Prefect global concurrency limit named after
it bounds how many pgdr runs work on that server at once, wherever they run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from itertools import zip_longest
from typing import Any

from pgdr.ops.errors import ConfigError
from pgdr.postgres import dsn, postgres

HOST_LIMIT_PREFIX = "pgdr-host:"

_DISCOVERABLE = """
SELECT datname FROM pg_database
WHERE NOT datistemplate AND datallowconn
ORDER BY datname
"""


@dataclass(frozen=True)
class Member:
    """One database of the fleet: its URL (never with a password: it becomes a flow run
    parameter, which Prefect stores) and the server it lives on."""

    url: str
    database: str
    host: str

    @classmethod
    def of(cls, url: str) -> Member:
        bare = dsn.strip_password(url)
        return cls(bare, dsn.database_name(bare), dsn.host_key(bare))


def host_limit_name(url: str) -> str:
    """The global concurrency limit that guards the server of url: `pgdr-host:<host>:<port>`."""
    return HOST_LIMIT_PREFIX + dsn.host_key(url)


def matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Shell-style patterns, case-sensitive like PostgreSQL's names: included by one of
    include (all when empty) and by none of exclude."""
    return (not include or any(fnmatchcase(name, p) for p in include)) and not any(
        fnmatchcase(name, p) for p in exclude)


def discover(server_url: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Member]:
    """The databases on a server worth backing up: not templates, accepting connections,
    chosen by the patterns."""
    with postgres.connect(server_url, autocommit=True) as conn:
        names = [row[0] for row in conn.execute(_DISCOVERABLE)]
    return [Member.of(dsn.with_database(server_url, name)) for name in names
            if matches(name, include, exclude)]


def members_of(urls: Iterable[str], servers: Iterable[str], include: Sequence[str] = (),
               exclude: Sequence[str] = ()) -> list[Member]:
    """The listed databases and those discovered on the servers, each once. The patterns
    apply to discovered databases only: a database listed by URL was asked for by name."""
    found: dict[tuple[str, str], Member] = {}
    discovered = [member for server in servers for member in discover(server, include, exclude)]
    for member in [Member.of(url) for url in urls] + discovered:
        found.setdefault((member.host, member.database), member)
    if not found:
        raise ConfigError("the fleet is empty: list databases (--db, PGDR_FLEET_DATABASES) or servers to "
                          "discover them on (--server, PGDR_FLEET_SERVERS), and check --include/--exclude")
    return list(found.values())


def interleave(members: Sequence[Member]) -> list[Member]:
    """Round-robin over servers, so that the first runs dispatched do not all wait on one
    server's limit while the other servers sit idle."""
    by_host: dict[str, list[Member]] = {}
    for member in members:
        by_host.setdefault(member.host, []).append(member)
    rounds = zip_longest(*by_host.values())
    return [member for batch in rounds for member in batch if member is not None]


def outcome_row(member: Member, *, ok: bool, seconds: float, result: dict[str, Any] | None,
                reason: str | None, run: str | None) -> dict[str, Any]:
    """One line of the fleet's report."""
    result = result or {}
    return {
        "database": member.database,
        "server": member.host,
        "status": "ok" if ok else "failed",
        "backup_id": result.get("backup_id"),
        "size_bytes": result.get("size_bytes"),
        "duration_seconds": round(seconds, 1),
        "reason": reason,
        "flow_run": run,
    }
