"""The Prefect tasks of flows/storage.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

from prefect import get_run_logger, task

from pgdr.ops.settings import Settings
from pgdr.storage import storage as snapshots
from pgdr.storage.repository import Repository
from tasks.policy import retrying


@task(name="copy changed objects", **retrying(2, 15),
      timeout_seconds=24 * 3600)
def copy_changed_objects(source_url: str, repo: Repository, settings: Settings, snapshot_id: str,
                         tier: str) -> snapshots.StorageManifest:
    manifest = snapshots.take_snapshot(repo, snapshots.parse_s3_url(source_url),
                                       snapshot_id, tier, storage_class=settings.storage_classes.get(tier))
    get_run_logger().info("%d objects, %d copied (%d bytes), %d unchanged since %s",
                          manifest.object_count, manifest.copied_count, manifest.copied_bytes,
                          manifest.object_count - manifest.copied_count, manifest.previous_snapshot)
    return manifest


@task(name="find storage snapshot", **retrying(2, 5))
def find_storage_snapshot(repo: Repository, selector: str,
                          bucket: str | None) -> snapshots.StorageManifest:
    return snapshots.find_snapshot(repo, selector, bucket)


@task(name="copy objects back", **retrying(2, 15),
      timeout_seconds=24 * 3600)
def copy_objects_back(repo: Repository, manifest: snapshots.StorageManifest, dest_url: str,
                      overwrite: bool) -> int:
    return snapshots.restore_snapshot(repo, manifest,
                                      snapshots.parse_s3_url(dest_url), overwrite=overwrite)
