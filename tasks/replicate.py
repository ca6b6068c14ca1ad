"""The Prefect tasks of flows/replicate.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

from prefect import task

from pgdr.ops.settings import Settings
from pgdr.storage import replica
from tasks.policy import retrying
from tasks.records import open_repo


@task(name="copy what the replica lacks", **retrying(2, 30))
def copy_missing(repo_url: str, replica_url: str, settings: Settings) -> dict[str, int]:
    return replica.copy_everything(open_repo(repo_url, settings), open_repo(replica_url, settings),
                                   settings.storage_classes)
