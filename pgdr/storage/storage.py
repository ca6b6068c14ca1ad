"""Snapshots of S3 storage (user uploads, exports, reports) into the S3 repository.

Objects are copied server-side (S3Repository.copy_object: CopyObject, above 5 GiB a
multipart copy), so no byte passes through this host. Layout in the repository:

    storage/<bucket>/<snapshot_id>/objects/<key>        the copies made by this snapshot
    storage/<bucket>/<snapshot_id>/manifest.json        written LAST

A snapshot is incremental: an object whose ETag and size equal those recorded by the
previous snapshot of the same bucket and prefix is not copied again; the manifest
refers to the copy an earlier snapshot made. So an earlier snapshot's objects may only
be deleted once no kept manifest refers to them (see referenced_keys).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, TypedDict
from urllib.parse import urlparse

from pgdr.catalog import catalog
from pgdr.ops.errors import ConfigError, NotFoundError, PgdrError, first_line
from pgdr.storage.repository import Repository
from pgdr.storage.s3repo import COPY_LIMIT, COPY_PART_SIZE, S3Repository

AREA = "storage"
OBJECTS = "objects"
_MAX_KEY_BYTES = 1024
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str  # "" or ending in "/"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_url(url: str) -> Location:
    """s3://bucket[/prefix]; a prefix names a folder (a trailing / is implied)."""
    parsed = urlparse(url or "")
    if parsed.scheme != "s3" or not _BUCKET.match(parsed.netloc or "") or parsed.query or parsed.fragment:
        raise ConfigError(f"expected s3://bucket[/prefix], not {url!r}")
    prefix = parsed.path.strip("/")
    return Location(parsed.netloc, prefix + "/" if prefix else "")


class SnapshotSummary(TypedDict):
    """A storage snapshot in `--json` results."""

    snapshot_id: str
    bucket: str
    source_prefix: str
    tier: str
    finished_at: str
    object_count: int
    total_bytes: int
    copied_count: int
    copied_bytes: int


@dataclass
class StorageManifest(catalog.StoredManifest):
    KIND: ClassVar[str] = "storage manifest"

    snapshot_id: str
    bucket: str
    source_prefix: str
    tier: str
    started_at: str
    finished_at: str
    object_count: int
    total_bytes: int
    copied_count: int
    copied_bytes: int
    previous_snapshot: str | None
    # source key -> {"stored": key in the repository, "etag": source ETag, "size": bytes}
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def backup_id(self) -> str:  # type: ignore[override]  # the other kinds' field, read-only here
        """The snapshot id under the name the retention of backups knows."""
        return self.snapshot_id

    @property
    def prefix(self) -> str:
        return snapshot_area(self.bucket, self.snapshot_id)

    @property
    def size_bytes(self) -> int:
        return self.copied_bytes

    def summary(self) -> SnapshotSummary:
        return {
            "snapshot_id": self.snapshot_id,
            "bucket": self.bucket,
            "source_prefix": self.source_prefix,
            "tier": self.tier,
            "finished_at": self.finished_at,
            "object_count": self.object_count,
            "total_bytes": self.total_bytes,
            "copied_count": self.copied_count,
            "copied_bytes": self.copied_bytes,
        }


def bucket_area(bucket: str) -> str:
    """`storage/<bucket>`: where every snapshot of the bucket lives."""
    if not _BUCKET.match(bucket):
        raise ConfigError(f"invalid bucket name {bucket!r}")
    return f"{AREA}/{bucket}"


def snapshot_area(bucket: str, snapshot_id: str) -> str:
    catalog.parse_backup_id(snapshot_id)
    return f"{bucket_area(bucket)}/{snapshot_id}"


def s3_repository(repo: Repository) -> S3Repository:
    if not isinstance(repo, S3Repository):
        raise ConfigError(f"storage snapshots are copied inside S3: the repository must be s3://, "
                          f"not {repo.url}")
    return repo


def stored_key(bucket: str, snapshot_id: str, key: str, repo_prefix: str) -> str:
    """Where this snapshot keeps its copy of key (repository-relative). Keys too long to
    nest under the repository prefix are stored under their sha256."""
    rel = f"{snapshot_area(bucket, snapshot_id)}/{OBJECTS}/{key}"
    if len(f"{repo_prefix}/{rel}".encode()) > _MAX_KEY_BYTES:
        digest = hashlib.sha256(key.encode()).hexdigest()
        rel = f"{snapshot_area(bucket, snapshot_id)}/{OBJECTS}-by-hash/{digest}"
    return rel


def _full(repo: S3Repository, rel: str) -> str:
    return f"{repo.prefix}/{rel}" if repo.prefix else rel


# --- the catalog of snapshots ----------------------------------------------------------------


def list_buckets(repo: Repository) -> list[str]:
    """The buckets the repository holds snapshots of (other names there are none of pgdr's)."""
    return [name for name in repo.list_dirs(f"{AREA}/") if _BUCKET.match(name)]


def list_snapshots(repo: Repository, bucket: str | None = None) -> list[StorageManifest]:
    """Every complete snapshot (it has a manifest), oldest first; like catalog.Manifest,
    each has `backup_id`, `tier`, `finished`, `prefix` and `size_bytes`."""
    found = []
    for each in [bucket] if bucket else list_buckets(repo):
        for snapshot_id in repo.list_dirs(f"{bucket_area(each)}/"):
            key = f"{snapshot_area(each, snapshot_id)}/{catalog.MANIFEST}"
            if repo.head(key):
                found.append(StorageManifest.read(repo, key))
    return sorted(found, key=lambda m: (m.finished_at, m.snapshot_id))


def find_snapshot(repo: Repository, selector: str, bucket: str | None = None) -> StorageManifest:
    """A snapshot id, or `latest` (of --bucket, or of the only bucket snapshotted)."""
    if selector != "latest":
        catalog.parse_backup_id(selector)
    snapshots = [s for s in list_snapshots(repo, bucket)
                 if selector in ("latest", s.snapshot_id)]
    if selector == "latest" and len({s.bucket for s in snapshots}) > 1:
        raise ConfigError(f"snapshots of several buckets in {repo.url} "
                          f"({', '.join(sorted({s.bucket for s in snapshots}))}): name one with --bucket")
    if not snapshots:
        raise NotFoundError(f"storage snapshot {selector} not found in {repo.url}")
    return snapshots[-1]


def previous_snapshot(repo: Repository, source: Location) -> StorageManifest | None:
    """The newest complete snapshot of the same bucket and prefix."""
    same = [s for s in list_snapshots(repo, source.bucket) if s.source_prefix == source.prefix]
    return same[-1] if same else None


def referenced_keys(manifests: Iterable[StorageManifest]) -> set[str]:
    """Every stored object the given manifests refer to: what retention must keep."""
    return {entry["stored"] for manifest in manifests for entry in manifest.objects.values()}


# --- listing and copying ---------------------------------------------------------------------


def list_objects(client: Any, location: Location) -> dict[str, tuple[str, int]]:
    """key -> (ETag, size) of every object under the location, all pages."""
    found = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket,
                                                                    Prefix=location.prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = (item["ETag"], int(item["Size"]))
    except Exception as exc:
        raise PgdrError(f"cannot list {location.url}: {first_line(exc)}") from None
    return found


def run_parallel(jobs: list[Callable[[], None]], workers: int) -> None:
    """Run every job on a small thread pool (boto3 clients are thread-safe); the first
    failure cancels what has not started and is raised."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(job) for job in jobs]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            if future.exception():
                raise future.exception()  # type: ignore[misc]


# --- snapshot and restore --------------------------------------------------------------------


def take_snapshot(repo: Repository, source: Location, snapshot_id: str, tier: str, *,
                  storage_class: str | None = None, workers: int = 8, limit: int = COPY_LIMIT,
                  part_size: int = COPY_PART_SIZE) -> StorageManifest:
    """Copy every object under source that changed since the previous snapshot; return the
    manifest (not yet written: the caller writes it last)."""
    s3 = s3_repository(repo)
    if source.bucket == s3.bucket:
        inside = f"{s3.prefix}/" if s3.prefix else ""
        if inside.startswith(source.prefix) or source.prefix.startswith(inside):
            raise ConfigError(f"{source.url} overlaps the repository {s3.url}: a snapshot would copy itself")
    started = catalog.utcnow()
    previous = previous_snapshot(s3, source)
    before = previous.objects if previous else {}
    current = list_objects(s3.client, source)
    objects: dict[str, dict[str, Any]] = {}
    jobs: list[Callable[[], None]] = []
    copied_bytes = 0
    for key, (etag, size) in sorted(current.items()):
        earlier = before.get(key)
        if earlier and earlier["etag"] == etag and earlier["size"] == size:
            objects[key] = earlier
            continue
        rel = stored_key(source.bucket, snapshot_id, key, s3.prefix)
        objects[key] = {"stored": rel, "etag": etag, "size": size}
        copied_bytes += size
        jobs.append(partial(s3.copy_object, (source.bucket, key), (s3.bucket, _full(s3, rel)), etag=etag,
                            storage_class=storage_class, limit=limit, part_size=part_size))
    run_parallel(jobs, workers)
    return StorageManifest(
        snapshot_id=snapshot_id, bucket=source.bucket, source_prefix=source.prefix, tier=tier,
        started_at=catalog.iso(started), finished_at=catalog.iso(catalog.utcnow()),
        object_count=len(objects), total_bytes=sum(o["size"] for o in objects.values()),
        copied_count=len(jobs), copied_bytes=copied_bytes,
        previous_snapshot=previous.snapshot_id if previous else None, objects=objects,
    )


def restore_snapshot(repo: Repository, manifest: StorageManifest, dest: Location, *,
                     overwrite: bool = False, workers: int = 8, limit: int = COPY_LIMIT,
                     part_size: int = COPY_PART_SIZE) -> int:
    """Copy every object of the snapshot to dest (its key below the snapshot's prefix kept
    below dest's prefix). Refuses a non-empty dest unless overwrite. Returns bytes copied."""
    s3 = s3_repository(repo)
    try:
        occupied = s3.client.list_objects_v2(Bucket=dest.bucket, Prefix=dest.prefix, MaxKeys=1)
    except Exception as exc:
        raise PgdrError(f"cannot list {dest.url}: {first_line(exc)}") from None
    if occupied.get("KeyCount", 0) and not overwrite:
        raise PgdrError(f"{dest.url} is not empty: pass --overwrite to replace objects there")
    jobs: list[Callable[[], None]] = []
    for key, entry in manifest.objects.items():
        target = dest.prefix + key[len(manifest.source_prefix):]
        # Stored copies never change: no ETag to match (a multipart copy has its own anyway).
        jobs.append(partial(s3.copy_object, (s3.bucket, _full(s3, entry["stored"])), (dest.bucket, target),
                            limit=limit, part_size=part_size))
    run_parallel(jobs, workers)
    return sum(entry["size"] for entry in manifest.objects.values())

