"""The DR-region copy: everything a restore in the DR region needs, copied to a second
repository (PGDR_REPLICA_REPO): database backups, base backups, WAL, files backups and
storage snapshots.

Data first, checked against the manifest's size and sha256 (WAL: its checksum record;
storage: each object's size), the manifest or marker LAST: the copy exists for `pgdr
list`, restore and recovery only once it is whole. Two S3 repositories copy server-side
when one client reaches both (the bytes stay in AWS); otherwise the bytes stream through
this machine and the checksum is computed on the way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from pgdr.catalog.catalog import MANIFEST
from pgdr.catalog.scan import list_backups, list_databases
from pgdr.files.manifest import list_file_backups
from pgdr.ops.errors import IntegrityError, NotFoundError, PgdrError
from pgdr.pitr import wal, walarchive
from pgdr.pitr.basebackup import list_base_backups
from pgdr.storage.repository import Repository
from pgdr.storage.s3repo import S3Repository
from pgdr.storage.storage import StorageManifest, list_snapshots


class StoredBackup(Protocol):
    """What database, base and files backups have in common: one data object beside
    their manifest."""

    @property
    def backup_id(self) -> str: ...
    @property
    def prefix(self) -> str: ...
    @property
    def manifest_key(self) -> str: ...
    @property
    def data_key(self) -> str: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def sha256(self) -> str: ...

    def write(self, repo: Repository) -> str: ...


def _copy(source: Repository, target: Repository, key: str, storage_class: str | None) -> str | None:
    """Copy one object; returns the sha256 of the bytes streamed, or None after a
    server-side copy (which the caller then reads back to check)."""
    if isinstance(source, S3Repository) and isinstance(target, S3Repository):
        try:
            target.copy_from(source, key, storage_class=storage_class)
            return None
        except PgdrError:
            pass  # e.g. the target's credentials cannot read the source: stream instead
    info = source.head(key)
    return target.put_stream(key, source.get_stream(key), storage_class=storage_class,
                             size_hint=info.size if info else None).sha256


def _copy_checked(source: Repository, target: Repository, key: str, size: int, sha256: str,
                  storage_class: str | None = None) -> str:
    """Copy one object and prove the copy has the recorded checksum; how it was copied."""
    streamed = _copy(source, target, key, storage_class)
    if streamed is None:
        target.verify(key, size, sha256)
        return "server-side"
    if streamed != sha256:
        raise IntegrityError(f"the copy of {key} in {target.url} does not match its recorded sha256")
    return "streamed"


def copy_backup(source: Repository, target: Repository, manifest: StoredBackup,
                storage_class: str | None = None) -> dict[str, object]:
    """Copy a backup's objects to target, verify the data against the manifest, then
    write the manifest; returns what was copied."""
    prefix = manifest.prefix
    keys = sorted(info.key for info in source.list(prefix + "/") if not info.key.endswith("/" + MANIFEST))
    data_key = f"{prefix}/{manifest.data_key}"
    if data_key not in keys:
        raise IntegrityError(f"{data_key} is missing from {source.url}")
    method = _copy_checked(source, target, data_key, manifest.size_bytes, manifest.sha256, storage_class)
    for key in keys:
        if key != data_key and _copy(source, target, key, storage_class) is not None:
            method = "streamed"
    manifest.write(target)
    return {"replica": target.url, "backup_id": manifest.backup_id, "objects": len(keys) + 1,
            "method": method, "sha256": manifest.sha256}


def copy_snapshot(source: Repository, target: Repository, manifest: StorageManifest) -> dict[str, object]:
    """Copy the objects a storage snapshot refers to (its own, and those it shares with
    earlier snapshots, unless the replica has them already), then its manifest."""
    copied = 0
    for stored, size in sorted({(o["stored"], int(o["size"])) for o in manifest.objects.values()}):
        there = target.head(stored)
        if there is not None and there.size == size:
            continue
        _copy(source, target, stored, None)
        found = target.head(stored)
        if found is None or found.size != size:
            raise IntegrityError(f"the copy of {stored} in {target.url} is not {size} bytes")
        copied += 1
    manifest.write(target)
    return {"replica": target.url, "backup_id": manifest.snapshot_id, "objects": copied + 1}


def copy_wal(source: Repository, target: Repository, database: str, name: str) -> bool:
    """Copy one archived WAL file and then its checksum record; False when the replica
    has it already."""
    if target.head(wal.sidecar_key(database, name)):
        return False
    record = wal.archived_record(source, database, name)
    if record is None:
        raise NotFoundError(f"{name} of {database} is not archived in {source.url}")
    _copy_checked(source, target, record["key"], record["size"], record["sha256"])
    target.put_bytes(wal.sidecar_key(database, name), source.get_bytes(wal.sidecar_key(database, name)))
    return True


# --- everything, and how far the replica lags -----------------------------------------------


def _missing(target: Repository, manifests: list[Any]) -> list[Any]:
    return [m for m in manifests if not target.head(m.manifest_key)]


def copy_everything(source: Repository, target: Repository,
                    storage_classes: dict[str, str] | None = None) -> dict[str, int]:
    """Copy whatever the replica lacks, oldest first (WAL last: its base backups first);
    returns how many of each kind were copied."""
    classes = storage_classes or {}
    counts = {"backups": 0, "base_backups": 0, "wal_files": 0, "files_backups": 0, "storage_snapshots": 0}
    for manifest in _missing(target, list_backups(source)):
        copy_backup(source, target, manifest, classes.get(manifest.tier))
        counts["backups"] += 1
    for manifest in _missing(target, list_file_backups(source)):
        copy_backup(source, target, manifest, classes.get(manifest.tier))
        counts["files_backups"] += 1
    for manifest in _missing(target, list_snapshots(source)):
        copy_snapshot(source, target, manifest)
        counts["storage_snapshots"] += 1
    for database in list_databases(source):
        for manifest in _missing(target, list_base_backups(source, database)):
            copy_backup(source, target, manifest)
            counts["base_backups"] += 1
        there = {f.name for f in walarchive.archived_files(target, database)}
        for archived in walarchive.archived_files(source, database):
            if archived.name not in there:
                counts["wal_files"] += copy_wal(source, target, database, archived.name)
    return counts


def _newest(manifests: list[Any]) -> Any:
    return max(manifests, key=lambda m: (m.finished_at, m.backup_id)) if manifests else None


def replica_lag(source: Repository, target: Repository, now: datetime) -> dict[str, Any]:
    """Per database: the newest backup and WAL file here and in the replica, how many are
    missing there, and the lag (how much older the replica's newest is, or the age of the
    oldest missing one: what a region loss would cost beyond the primary's own RPO)."""
    databases: list[dict[str, Any]] = []
    for database in list_databases(source):
        ours, theirs = list_backups(source, database), list_backups(target, database)
        copied = {m.backup_id for m in theirs}
        missing = [m for m in ours if m.backup_id not in copied]
        wal_ours = walarchive.archived_files(source, database)
        wal_there = {f.name for f in walarchive.archived_files(target, database)}
        wal_missing = [f for f in wal_ours if f.name not in wal_there]
        oldest_gap = min([m.finished for m in missing] + [f.archived for f in wal_missing], default=None)
        databases.append({
            "database": database,
            "newest_backup": _newest(ours).backup_id if ours else None,
            "newest_replica_backup": _newest(theirs).backup_id if theirs else None,
            "missing_backups": len(missing),
            "missing_wal_files": len(wal_missing),
            "lag_seconds": round((now - oldest_gap).total_seconds(), 3) if oldest_gap else 0.0,
        })
    files_missing = len(_missing(target, list_file_backups(source)))
    snapshots_missing = len(_missing(target, list_snapshots(source)))
    return {"replica": target.url, "databases": databases, "missing_files_backups": files_missing,
            "missing_storage_snapshots": snapshots_missing,
            "lag_seconds": max((d["lag_seconds"] for d in databases), default=0.0)}
