"""Audit records in the runbook's JSON shape, stored in the repository.

`<prefix>/audit/<YYYY>/<MM>/<DD>/<timestamp>-<operation>.json`, one per operation.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import socket
from datetime import UTC, datetime
from typing import Any

from tasks.repository import Repository


def current_user() -> str:
    """Who ran it: the GitHub actor in Actions, else the OS user."""
    for var in ("PGDR_USER", "GITHUB_ACTOR"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def audit_record(operation: str, *, type: str, source: str, destination: str, status: str,
                 size_bytes: int = 0, duration_seconds: float = 0.0,
                 timestamp: datetime | None = None, **details: Any) -> dict[str, Any]:
    """The runbook's record: timestamp, operation, type, source, destination, size_bytes,
    duration_seconds, status, user, host (plus operation-specific details)."""
    moment = (timestamp or datetime.now(UTC)).astimezone(UTC)
    record = {
        "timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "operation": operation,
        "type": type,
        "source": source,
        "destination": destination,
        "size_bytes": int(size_bytes),
        "duration_seconds": round(float(duration_seconds), 3),
        "status": status,
        "user": current_user(),
        "host": socket.gethostname(),
    }
    if details:
        record["details"] = details
    return record


def audit_key(record: dict[str, Any]) -> str:
    moment = datetime.strptime(record["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return (f"audit/{moment:%Y}/{moment:%m}/{moment:%d}/"
            f"{moment:%Y%m%dT%H%M%S%fZ}-{record['operation']}-{secrets.token_hex(2)}.json")


def write_audit(repo: Repository, record: dict[str, Any]) -> str:
    key = audit_key(record)
    repo.put_bytes(key, json.dumps(record, indent=2, sort_keys=True).encode())
    return key
