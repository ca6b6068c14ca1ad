"""The Prefect tasks of flows/drill.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

import json
from typing import Any

from prefect import task

from pgdr.ops.settings import Settings
from tasks.policy import retrying
from tasks.records import open_repo


@task(name="write drill report", **retrying(3, 2))
def write_report(repo_url: str, settings: Settings, key: str, report: dict[str, Any]) -> str:
    open_repo(repo_url, settings).put_bytes(key, json.dumps(report, indent=2, sort_keys=True).encode())
    return key
