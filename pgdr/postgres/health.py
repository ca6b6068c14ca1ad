"""Health checks before clients are sent to a restored database.

SQL: `SELECT true` (the database answers), then each operator check, in a read-only
transaction that is rolled back. Checks fail closed: one passes only when it returns at
least one row whose first value is boolean true; an error, no rows, false, NULL or any
other value is a failure (so `SELECT count(*) > 0 FROM vehicles` is the idiom for "has
data"). HTTP: GET, a 2xx answer within the timeout.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import psycopg

from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.postgres import postgres

# The built-in first check: the restored database accepts connections and answers.
REACHES_DATABASE = "SELECT true"


def passes(row: tuple[Any, ...] | None) -> bool:
    """A SQL check's first row passes only when it exists and its first value is true."""
    return bool(row) and row[0] is True  # type: ignore[index]


def reached_database(results: list[dict[str, Any]]) -> bool:
    """Whether a SQL check passed on the restored database itself."""
    return any(r["kind"] == "sql" and r["ok"] for r in results)


def sql_checks(url: str, checks: list[str], timeout_seconds: float = 30) -> list[dict[str, Any]]:
    results = []
    try:
        conn = postgres.connect(url, autocommit=True, connect_timeout=max(1, int(timeout_seconds)))
    except PgdrError as exc:
        return [{"check": REACHES_DATABASE, "kind": "sql", "ok": False, "detail": str(exc)}]
    with conn:
        conn.execute("SELECT set_config('statement_timeout', %s, false)", [f"{int(timeout_seconds * 1000)}"])
        for statement in [REACHES_DATABASE, *checks]:
            entry: dict[str, Any] = {"check": statement, "kind": "sql", "ok": False, "detail": ""}
            try:
                with conn.transaction(force_rollback=True):
                    conn.execute("SET TRANSACTION READ ONLY")
                    row = conn.execute(statement).fetchone()  # type: ignore[arg-type]
                entry["ok"] = passes(row)
                entry["detail"] = f"returned {row[0]!r}" if row else "no rows"
            except psycopg.Error as exc:
                entry["detail"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            results.append(entry)
    return results


def http_check(url: str, timeout_seconds: float = 10) -> dict[str, Any]:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"health URLs are http:// or https://, not {url!r}")
    entry: dict[str, Any] = {"check": url, "kind": "http", "ok": False, "detail": ""}
    try:
        with urllib.request.urlopen(url, timeout=timeout_seconds) as answer:  # noqa: S310 - scheme checked
            entry["ok"] = 200 <= answer.status < 300
            entry["detail"] = f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        entry["detail"] = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        entry["detail"] = str(getattr(exc, "reason", exc))
    return entry


def summary(results: list[dict[str, Any]]) -> str:
    failed = [r for r in results if not r["ok"]]
    if not failed:
        return f"{len(results)} check(s) passed"
    return "; ".join(f"{r['check']}: {r['detail']}" for r in failed)
