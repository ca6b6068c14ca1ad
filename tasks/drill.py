"""The Prefect tasks of flows/drill.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

import json
from typing import Any

from prefect import task

from pgdr.storage.repository import Repository
from tasks.policy import retrying


@task(name="write drill report", **retrying(3, 2))
def write_report(repo: Repository, key: str, report: dict[str, Any]) -> str:
    repo.put_bytes(key, json.dumps(report, indent=2, sort_keys=True).encode())
    return key
