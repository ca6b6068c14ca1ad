"""The Prefect tasks of flows/replicate.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

from prefect import task

from pgdr.ops.settings import Settings
from pgdr.storage import replica
from pgdr.storage.repository import Repository
from tasks.policy import retrying


@task(name="copy what the replica lacks", **retrying(2, 30))
def copy_missing(repo: Repository, replica_repo: Repository, settings: Settings) -> dict[str, int]:
    return replica.copy_everything(repo, replica_repo, settings.storage_classes)
