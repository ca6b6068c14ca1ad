"""Point-in-time recovery: the runbook's hot tier, recovery to any moment.

Self-managed: choose the newest base backup that finished before the target, unpack it
(an incremental one: its chain back to a full, combined by pg_combinebackup) into a new
data directory, recover with `pgdr wal-fetch` up to the target, promote, and
report the point reached. The source server is never touched. RDS: the service's own
`restore_db_instance_to_point_in_time` into a new instance.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pgdr.ops.errors import ConfigError
from pgdr.ops.settings import load_settings
from pgdr.pitr import pitr as pitr_steps
from pgdr.pitr.basebackup import choose_base_backup, find_base_backup, list_base_backups
from pgdr.pitr.incremental import backup_chain
from pgdr.postgres.cluster import LocalCluster, free_port
from pgdr.postgres.programs import same_major_bin_dir
from tasks.pitr import recover_to_target, unpack_base_backup
from tasks.records import audited, open_repo
from tasks.runs import FLOW_HOOKS, run_name


@flow(name="pitr", flow_run_name=run_name("pitr-{db|$db}-into-{datadir}"), log_prints=True, **FLOW_HOOKS)
def pitr(
    datadir: str,
    repo: str | None = None,
    db: str | None = None,
    target_time: datetime | None = None,
    target_lsn: str | None = None,
    target_name: str | None = None,
    target_timeline: str | None = None,
    backup_id: str | None = None,
    port: int | None = None,
    keep_running: bool = True,
    timeout_seconds: float = 3600,
    pgdr_path: str | None = None,
) -> dict[str, Any]:
    """Recover the database area `db` of the repository into a new data directory,
    up to target_time / target_lsn / target_name (or the end of the WAL archive), and
    start it on `port` (kept running unless keep_running is false)."""
    logger = get_run_logger()
    settings = load_settings()
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)
    database = db or settings.wal_db
    if not database:
        raise ConfigError("name the database area with --db NAME (or PGDR_WAL_DB)")
    target = pitr_steps.Target(target_time, target_lsn, target_name)
    backups = list_base_backups(repository, database)
    if backup_id:
        manifest = find_base_backup(repository, database, backup_id)
    else:
        manifest = choose_base_backup(backups, target_time=target_time, target_lsn=target_lsn)
    # A missing link of an incremental's chain fails here, before anything is written.
    chain = backup_chain(backups, manifest)
    port = port or free_port()
    pgdr = pgdr_path or str(Path(sys.executable).with_name("pgdr"))
    recovery = pitr_steps.recovery_settings(pitr_steps.restore_command(pgdr, repo_url, database), target,
                                      target_timeline)
    logger.info("recovering %s to %s from base backup %s into %s", database, target.describe(),
                " + ".join(b.backup_id for b in chain), datadir)
    with audited(repository, settings, "pitr", type="hot", source=database, destination=datadir,
                 backup_id=manifest.backup_id, target=target.describe()) as step:
        try:
            unpack_base_backup(repository, settings, chain, datadir)
            reached = recover_to_target(datadir, port, target, recovery, timeout_seconds,
                                        manifest.server_version)
        finally:
            if not keep_running:
                LocalCluster(Path(datadir), port, bin_dir=same_major_bin_dir(manifest.server_version)).stop()
        step.succeeded()
    return {
        "database": database,
        "backup_id": manifest.backup_id,
        "backup_chain": [b.backup_id for b in chain],
        "target": target.describe(),
        "datadir": datadir,
        "port": port,
        "running": keep_running,
        **reached,
        "duration_seconds": round(step.seconds, 3),
    }


@flow(name="pitr-rds", flow_run_name=run_name("pitr-rds-{source_instance}-into-{target_instance}"),
      log_prints=True, **FLOW_HOOKS)
def rds_point_in_time_recovery(source_instance: str, target_instance: str,
                               target_time: datetime | None = None,
                               instance_class: str | None = None) -> dict[str, Any]:
    """Restore an RDS instance to a moment (default: the latest restorable time) as a new
    instance; the source keeps running untouched."""
    from pgdr.storage import aws

    settings = load_settings()
    return pitr_steps.rds_restore_to_point_in_time(aws.client("rds", settings.aws_region), source_instance,
                                             target_instance,
                                             restore_time=target_time, instance_class=instance_class)
