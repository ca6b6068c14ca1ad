"""Health checks before clients are sent to a restored database.

SQL: `SELECT 1`, then each operator check, in a read-only transaction that is rolled
back. A check fails when it errors or when its first value is false or NULL (so
`SELECT count(*) > 0 FROM vehicles` is the idiom for "has data"). HTTP: GET, a 2xx
answer within the timeout.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import psycopg

from tasks import postgres
from tasks.errors import ConfigError, PgdrError


def sql_checks(url: str, checks: list[str], timeout_seconds: float = 30) -> list[dict[str, Any]]:
    results = []
    try:
        conn = postgres.connect(url, autocommit=True, connect_timeout=max(1, int(timeout_seconds)))
    except PgdrError as exc:
        return [{"check": "SELECT 1", "kind": "sql", "ok": False, "detail": str(exc)}]
    with conn:
        conn.execute("SELECT set_config('statement_timeout', %s, false)", [f"{int(timeout_seconds * 1000)}"])
        for statement in ["SELECT 1", *checks]:
            entry: dict[str, Any] = {"check": statement, "kind": "sql", "ok": False, "detail": ""}
            try:
                with conn.transaction(force_rollback=True):
                    conn.execute("SET TRANSACTION READ ONLY")
                    row = conn.execute(statement).fetchone()  # type: ignore[arg-type]
                value = row[0] if row else None
                entry["ok"] = row is None or (value is not None and value is not False)
                entry["detail"] = f"returned {value!r}" if row else "no rows"
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
