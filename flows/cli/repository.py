"""The repository and the Prefect server: retention, the DR copy, the bucket's setup and
the server-side alerts."""

from __future__ import annotations

from typing import Literal

from flows.cli import render
from flows.cli.common import Result, command, settings, url
from flows.cli.options import FlowOutput, Output


@command(render.show_prune)
def prune(*, repo: str | None = None, area: Literal["database", "files", "storage", "pitr"] | None = None,
          db: str | None = None, name: str | None = None, bucket: str | None = None,
          tier: str | None = None, dry_run: bool = False, server: str | None = None,
          output: FlowOutput = FlowOutput()) -> Result:
    """Delete backups, files backups and storage snapshots past their tier's retention.

    Args:
        repo: repository URL
        area: only database backups, files backups, storage snapshots or base backups and WAL (pitr)
            (default: all)
        db: only this database (NAME)
        name: only the files backups of this name
        bucket: only the storage snapshots of this bucket
        tier: only this tier (the floors still count every tier)
        dry_run: show what would be deleted, delete nothing
        server: server whose safety databases (<db>_pre_restore_*, <db>_rolled_back_*) to prune too
            (URL; default: DATABASE_URL)
    """
    from flows.prune import prune

    return prune(repo=repo, db=db, tier=tier, dry_run=dry_run, area=area, name=name, bucket=bucket,
                 server=url(server))


@command(render.show_replicate)
def replicate(*, all: bool = False, repo: str | None = None, replica: str | None = None,
              output: FlowOutput = FlowOutput()) -> Result:
    """Copy to the DR repository (PGDR_REPLICA_REPO) whatever it lacks.

    Args:
        all: every database backup, base backup, WAL file, files backup and storage snapshot
        repo: repository to copy from (default: PGDR_REPO)
        replica: DR repository (URL; default: PGDR_REPLICA_REPO)
    """
    from flows.replicate import replicate

    if not all:
        from pgdr.ops.errors import ConfigError

        raise ConfigError("pass --all to copy every backup, base backup, WAL file, files backup and storage "
                          "snapshot the replica lacks")
    return replicate(repo=repo, replica_repo=replica)


@command(render.show_init_repo, runs_flow=False)
def init_repo(*, repo: str | None = None, sse: Literal["AES256", "aws:kms"] | None = None,
              kms_key_id: str | None = None,
              object_lock_mode: Literal["GOVERNANCE", "COMPLIANCE"] | None = None,
              object_lock_days: int | None = None, archive_after_days: int | None = None,
              output: Output = Output()) -> Result:
    """Create and harden the S3 bucket of a repository.

    Args:
        repo: repository URL (s3://bucket/prefix)
        sse: default encryption (AES256)
        kms_key_id: KMS key for aws:kms
        object_lock_mode: default Object Lock retention mode (creates the bucket with Object Lock)
        object_lock_days: default Object Lock retention days
        archive_after_days: move objects to GLACIER after N days (restoring them then waits hours;
            default: never, only STANDARD_IA after 30 days)
    """
    from pgdr.storage.bucket import init_s3_repository

    config = settings()
    return init_s3_repository(repo or config.repo_url, sse=sse or config.s3_sse,
                              kms_key_id=kms_key_id or config.s3_kms_key_id, lock_mode=object_lock_mode,
                              lock_days=object_lock_days, region=config.aws_region,
                              archive_after_days=archive_after_days, retention_days=config.retention_days)


@command(render.show_automations, runs_flow=False)
def automations(action: Literal["apply"], /, *, zombie_after: float | None = None,
                output: Output = Output()) -> Result:
    """Apply the server-side alerts (failed or crashed runs, dead workers, no backup for 26
    hours) to the Prefect server.

    Args:
        action: apply: create or replace every pgdr automation
        zombie_after: mark a run Crashed after this many SECONDS without a heartbeat (default: 3 x
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY)
    """
    from datetime import timedelta

    from deployments import automations

    after = timedelta(seconds=zombie_after) if zombie_after else None
    return automations.apply(settings(), zombie_after=after)
