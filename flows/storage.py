"""Storage snapshots: the S3 bucket of user uploads, exports and reports.

storage_snapshot: list source -> server-side copy of what changed since the previous
                  snapshot -> manifest (last) -> audit record -> retention of the tier.
storage_restore:  find snapshot -> copy every object back into a bucket or prefix ->
                  audit record.
"""

from __future__ import annotations

from typing import TypedDict

from prefect import flow

from flows.prune import prune_after_backup
from pgdr.catalog import catalog, prune_report
from pgdr.catalog.locks import database_lock
from pgdr.ops.settings import check_tier, load_settings
from pgdr.storage import storage as snapshots
from tasks.prune import replicate_backup
from tasks.records import audited, open_repo, write_manifest
from tasks.runs import FLOW_HOOKS, run_name
from tasks.storage import copy_changed_objects, copy_objects_back, find_storage_snapshot


class SnapshotResult(snapshots.SnapshotSummary):
    """`pgdr storage-snapshot --json`."""

    previous_snapshot: str | None
    location: str
    duration_seconds: float
    pruned: dict[str, int] | None


class StorageRestoreResult(TypedDict):
    """`pgdr storage-restore --json`."""

    snapshot_id: str
    bucket: str
    dest: str
    object_count: int
    bytes: int
    duration_seconds: float


@flow(name="storage-snapshot", flow_run_name=run_name("storage-snapshot-{source}"),
      log_prints=True, **FLOW_HOOKS)
def storage_snapshot(source: str, repo: str | None = None, tier: str = "manual") -> SnapshotResult:
    """Snapshot s3://bucket[/prefix] into the (S3) repository; returns its summary."""
    settings = load_settings()
    location = snapshots.parse_s3_url(source)
    check_tier(tier)
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)
    snapshots.s3_repository(repository)
    snapshot_id = catalog.new_backup_id(catalog.utcnow(), tier)
    with audited(repository, settings, "storage-snapshot", type=tier, source=location.url,
                 destination=repo_url, backup_id=snapshot_id) as step:
        # The snapshot refers to the previous one's copies: no prune of the bucket may delete
        # them meanwhile (it waits), nor may another snapshot of the bucket run.
        with database_lock(repository, location.bucket, "storage-snapshot",
                           area=prune_report.STORAGE):
            manifest = copy_changed_objects(location.url, repository, settings, snapshot_id, tier)
            write_manifest(repository, manifest)
        if settings.replica_repo_url:
            replicate_backup(repository, open_repo(settings.replica_repo_url, settings), settings, manifest)
        step.succeeded(destination=f"{repo_url}/{manifest.prefix}", size_bytes=manifest.copied_bytes,
                       objects=manifest.object_count, copied=manifest.copied_count)
    pruned = prune_after_backup(repository, location.bucket, tier, area=prune_report.STORAGE)
    return {
        **manifest.summary(),
        "previous_snapshot": manifest.previous_snapshot,
        "location": f"{repo_url.rstrip('/')}/{manifest.prefix}/",
        "duration_seconds": round(step.seconds, 3),
        "pruned": pruned["counts"] if pruned else None,
    }


@flow(name="storage-restore", flow_run_name=run_name("storage-restore-{snapshot}-into-{bucket|dest}"),
      log_prints=True, **FLOW_HOOKS)
def storage_restore(snapshot: str, dest: str, bucket: str | None = None, repo: str | None = None,
                    overwrite: bool = False) -> StorageRestoreResult:
    """Copy every object of a snapshot (an id, or latest) into s3://bucket[/prefix]."""
    settings = load_settings()
    location = snapshots.parse_s3_url(dest)
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)
    with audited(repository, settings, "storage-restore", type="unknown", source=repo_url,
                 destination=location.url, backup_id=snapshot) as step:
        manifest = find_storage_snapshot(repository, snapshot, bucket)
        step.type, step.source = manifest.tier, f"{repo_url}/{manifest.prefix}"
        step.details["backup_id"] = manifest.snapshot_id
        copied = copy_objects_back(repository, manifest, location.url, overwrite)
        step.succeeded(size_bytes=copied, objects=manifest.object_count)
    return {
        "snapshot_id": manifest.snapshot_id,
        "bucket": manifest.bucket,
        "dest": location.url,
        "object_count": manifest.object_count,
        "bytes": copied,
        "duration_seconds": round(step.seconds, 3),
    }
