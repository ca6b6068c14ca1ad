"""The DR-region copy: a finished backup copied to a second repository.

Data first, checked against the manifest's size and sha256, the manifest LAST: the copy
exists for `pgdr list` and restore only once it is whole. Two S3 repositories copy
server-side when one client reaches both (the bytes stay in AWS); otherwise the bytes
stream through this machine and the checksum is computed on the way.
"""

from __future__ import annotations

from tasks.catalog import MANIFEST, Manifest
from tasks.errors import IntegrityError, PgdrError
from tasks.repository import Repository, S3Repository


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


def copy_backup(source: Repository, target: Repository, manifest: Manifest,
                storage_class: str | None = None) -> dict[str, object]:
    """Copy a backup's objects to target, verify the data against the manifest, then
    write the manifest; returns what was copied."""
    prefix = manifest.prefix
    keys = sorted(info.key for info in source.list(prefix + "/") if not info.key.endswith("/" + MANIFEST))
    data_key = f"{prefix}/{manifest.data_key}"
    if data_key not in keys:
        raise IntegrityError(f"{data_key} is missing from {source.url}")
    method = "server-side"
    for key in keys:
        streamed = _copy(source, target, key, storage_class)
        if streamed is not None:
            method = "streamed"
        if key != data_key:
            continue
        if streamed is None:
            target.verify(key, manifest.size_bytes, manifest.sha256)
        elif streamed != manifest.sha256:
            raise IntegrityError(f"the copy of {key} in {target.url} does not match the manifest's sha256")
    target.put_bytes(manifest.manifest_key, manifest.to_json())
    return {"replica": target.url, "backup_id": manifest.backup_id, "objects": len(keys) + 1,
            "method": method, "sha256": manifest.sha256}
