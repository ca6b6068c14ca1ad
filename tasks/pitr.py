"""The Prefect tasks of flows/pitr.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from pgdr.ops.settings import Settings
from pgdr.pitr import pitr as pitr_steps
from pgdr.pitr.basebackup import BaseManifest
from pgdr.pitr.baserestore import restore_backup_chain
from pgdr.postgres.cluster import LocalCluster, grant_to_server
from pgdr.postgres.programs import same_major_bin_dir
from pgdr.storage.repository import Repository
from tasks.policy import retrying


@task(name="restore base backup", **retrying(2, 10))
def unpack_base_backup(repo: Repository, settings: Settings, chain: list[BaseManifest], datadir: str) -> str:
    restore_backup_chain(repo, chain, Path(datadir),
                         bin_dir=same_major_bin_dir(chain[-1].server_version),
                         gpg_homedir=settings.gpg_homedir, passphrase=settings.gpg_passphrase,
                         secrets=settings.secrets())
    return datadir


@task(name="recover to target")
def recover_to_target(datadir: str, port: int, target: pitr_steps.Target, recovery: dict[str, str],
                      timeout: float, server_version: str) -> dict[str, Any]:
    path = Path(datadir)
    pitr_steps.configure_recovery(path, recovery)
    grant_to_server(path)
    # The backed-up server's own major version starts its data directory.
    cluster = LocalCluster(path, port, bin_dir=same_major_bin_dir(server_version))
    return pitr_steps.recover(cluster, target, timeout)
