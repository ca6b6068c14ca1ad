"""Audit records in the runbook's JSON shape, stored in the repository.

`<prefix>/audit/<YYYY>/<MM>/<DD>/<timestamp>-<operation>.json`, one per operation.
"""

from __future__ import annotations

import getpass
import ipaddress
import json
import os
import secrets
import socket
from datetime import UTC, datetime
from typing import Any

from pgdr.storage.repository import Repository


def current_user() -> str:
    """Who ran it: the GitHub actor in Actions, else the OS user."""
    for var in ("PGDR_USER", "GITHUB_ACTOR"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def ip_address() -> str:
    """This host's address as others know it: the first address of its name that is not
    loopback (no packet is sent), else loopback."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
        found = [str(info[4][0]) for info in infos]
    except OSError:
        found = []
    outside = [address for address in found if not ipaddress.ip_address(address).is_loopback]
    return (outside or found or ["127.0.0.1"])[0]


def started_by(created_by_type: str | None, created_by_name: str | None, deployment: str | None,
               auto_scheduled: bool, os_user: str) -> tuple[str, str]:
    """(how, who) started a run, from what the Prefect API says of it: an automation or a
    user when it names one, a deployment's schedule, a deployment run by hand (UI, API,
    `prefect deployment run`); otherwise the command line or Python, by the OS user."""
    kind = (created_by_type or "").lower()
    if kind in ("automation", "user") and created_by_name:
        return kind, f"{kind} {created_by_name}"
    if deployment and auto_scheduled:
        return "schedule", f"schedule of deployment {deployment}"
    if deployment:
        return "deployment", f"deployment {deployment}"
    return "cli", os_user


def audit_record(operation: str, *, type: str, source: str, destination: str, status: str,
                 size_bytes: int = 0, duration_seconds: float = 0.0,
                 timestamp: datetime | None = None, **details: Any) -> dict[str, Any]:
    """The runbook's record: timestamp, operation, type, source, destination, size_bytes,
    duration_seconds, status, user, host, ip_address (plus operation-specific details).
    `user` is the OS user here; a flow run's record names who started it (flows.steps)."""
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
        "started_by": "cli",
        "host": socket.gethostname(),
        "ip_address": ip_address(),
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
