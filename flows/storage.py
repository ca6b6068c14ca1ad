"""Storage snapshots: the S3 bucket of user uploads, exports and reports.

storage_snapshot: list source -> server-side copy of what changed since the previous
                  snapshot -> manifest (last) -> audit record -> retention of the tier.
storage_restore:  find snapshot -> copy every object back into a bucket or prefix ->
                  audit record.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.prune import prune_after_backup, replicate_backup
from flows.steps import (
    FLOW_HOOKS,
    audited,
    open_repo,
    retrying,
    run_name,
    write_manifest,
)
from pgdr.catalog import catalog, retention
from pgdr.catalog.locks import database_lock
from pgdr.ops.settings import Settings, check_tier, load_settings
from pgdr.storage import storage as snapshots


@task(name="copy changed objects", **retrying(2, 15),
      timeout_seconds=24 * 3600)
def copy_changed_objects(source_url: str, repo_url: str, settings: Settings, snapshot_id: str,
                         tier: str) -> snapshots.StorageManifest:
    manifest = snapshots.take_snapshot(open_repo(repo_url, settings), snapshots.parse_s3_url(source_url),
                                       snapshot_id, tier, storage_class=settings.storage_classes.get(tier))
    get_run_logger().info("%d objects, %d copied (%d bytes), %d unchanged since %s",
                          manifest.object_count, manifest.copied_count, manifest.copied_bytes,
                          manifest.object_count - manifest.copied_count, manifest.previous_snapshot)
    return manifest


@flow(name="storage-snapshot", flow_run_name=run_name("storage-snapshot-{source}"),
      log_prints=True, **FLOW_HOOKS)
def storage_snapshot(source: str, repo: str | None = None, tier: str = "manual") -> dict[str, Any]:
    """Snapshot s3://bucket[/prefix] into the (S3) repository; returns its summary."""
    settings = load_settings()
    location = snapshots.parse_s3_url(source)
    check_tier(tier)
    repo_url = repo or settings.repo_url
    snapshots.s3_repository(open_repo(repo_url, settings))
    snapshot_id = catalog.new_backup_id(catalog.utcnow(), tier)
    with audited(repo_url, settings, "storage-snapshot", type=tier, source=location.url, destination=repo_url,
                 backup_id=snapshot_id) as step:
        # The snapshot refers to the previous one's copies: no prune of the bucket may delete
        # them meanwhile (it waits), nor may another snapshot of the bucket run.
        with database_lock(open_repo(repo_url, settings), location.bucket, "storage-snapshot",
                           area=retention.STORAGE):
            manifest = copy_changed_objects(location.url, repo_url, settings, snapshot_id, tier)
            write_manifest(repo_url, settings, manifest)
        if settings.replica_repo_url:
            replicate_backup(repo_url, settings.replica_repo_url, settings, manifest)
        step.succeeded(destination=f"{repo_url}/{manifest.prefix}", size_bytes=manifest.copied_bytes,
                       objects=manifest.object_count, copied=manifest.copied_count)
    pruned = prune_after_backup(repo_url, location.bucket, tier, area=retention.STORAGE)
    return {
        **manifest.summary(),
        "previous_snapshot": manifest.previous_snapshot,
        "location": f"{repo_url.rstrip('/')}/{manifest.prefix}/",
        "duration_seconds": round(step.seconds, 3),
        "pruned": pruned["counts"] if pruned else None,
    }


@task(name="find storage snapshot", **retrying(2, 5))
def find_storage_snapshot(repo_url: str, settings: Settings, selector: str,
                          bucket: str | None) -> snapshots.StorageManifest:
    return snapshots.find_snapshot(open_repo(repo_url, settings), selector, bucket)


@task(name="copy objects back", **retrying(2, 15),
      timeout_seconds=24 * 3600)
def copy_objects_back(repo_url: str, settings: Settings, manifest: snapshots.StorageManifest, dest_url: str,
                      overwrite: bool) -> int:
    return snapshots.restore_snapshot(open_repo(repo_url, settings), manifest,
                                      snapshots.parse_s3_url(dest_url), overwrite=overwrite)


@flow(name="storage-restore", flow_run_name=run_name("storage-restore-{snapshot}-into-{bucket|dest}"),
      log_prints=True, **FLOW_HOOKS)
def storage_restore(snapshot: str, dest: str, bucket: str | None = None, repo: str | None = None,
                    overwrite: bool = False) -> dict[str, Any]:
    """Copy every object of a snapshot (an id, or latest) into s3://bucket[/prefix]."""
    settings = load_settings()
    location = snapshots.parse_s3_url(dest)
    repo_url = repo or settings.repo_url
    with audited(repo_url, settings, "storage-restore", type="unknown", source=repo_url,
                 destination=location.url, backup_id=snapshot) as step:
        manifest = find_storage_snapshot(repo_url, settings, snapshot, bucket)
        step.type, step.source = manifest.tier, f"{repo_url}/{manifest.prefix}"
        step.details["backup_id"] = manifest.snapshot_id
        copied = copy_objects_back(repo_url, settings, manifest, location.url, overwrite)
        step.succeeded(size_bytes=copied, objects=manifest.object_count)
    return {
        "snapshot_id": manifest.snapshot_id,
        "bucket": manifest.bucket,
        "dest": location.url,
        "object_count": manifest.object_count,
        "bytes": copied,
        "duration_seconds": round(step.seconds, 3),
    }
