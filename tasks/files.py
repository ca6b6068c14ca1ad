"""The Prefect tasks of flows/files.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import get_run_logger, task

from pgdr.catalog import catalog
from pgdr.files.backup import collect, first_secret, secret_patterns, store_archive
from pgdr.files.manifest import ARCHIVE, FORMAT, FilesManifest, backup_prefix, find_file_backup
from pgdr.files.restore import Restored, restore_archive
from pgdr.ops.errors import ConfigError
from pgdr.ops.settings import Settings
from pgdr.pipeline import crypto
from pgdr.restore.staging import work_directory
from pgdr.storage.repository import Repository
from tasks.artifacts import Progress
from tasks.policy import retrying


@task(name="archive files", **retrying(2, 15),
      timeout_seconds=12 * 3600)
def archive_files(paths: list[str], name: str, repo: Repository, settings: Settings, backup_id: str,
                  tier: str, encrypt_fingerprint: str | None) -> FilesManifest:
    started = catalog.utcnow()
    found = collect(paths)
    if not encrypt_fingerprint:
        secret = first_secret([entry for entry, _ in found.entries],
                              secret_patterns(settings.files_secret_patterns))
        if secret:
            raise ConfigError(f"{secret} looks like a secret: refusing to store it unencrypted "
                              "(pass --encrypt-to or set PGDR_ENCRYPT_TO)")
    if found.skipped:
        get_run_logger().warning("skipped %d special files (sockets, fifos, devices): %s",
                                 len(found.skipped), ", ".join(found.skipped[:5]))
    data_key = ARCHIVE + (".gpg" if encrypt_fingerprint else "")
    prefix = backup_prefix(name, backup_id)
    with Progress(f"files backup {name}", sum(entry.size for entry, _ in found.entries)) as progress:
        stored, tar_bytes = store_archive(
            found.entries, repo, f"{prefix}/{data_key}",
            encrypt_to=encrypt_fingerprint, gpg_homedir=settings.gpg_homedir,
            storage_class=settings.storage_classes.get(tier), zstd_level=settings.zstd_level,
            zstd_threads=settings.zstd_threads, secrets=settings.secrets(),
            progress=lambda read, _written: progress.update(read),
        )
    return FilesManifest(
        backup_id=backup_id, name=name, tier=tier,
        started_at=catalog.iso(started), finished_at=catalog.iso(catalog.utcnow()),
        tool_version=catalog.TOOL_VERSION, format=FORMAT, compression=f"zstd-{settings.zstd_level}",
        encryption={"type": "gpg", "recipient_fingerprint": encrypt_fingerprint}
        if encrypt_fingerprint else None,
        size_bytes=stored.size, archive_bytes=tar_bytes, sha256=stored.sha256, data_key=data_key,
        sources=found.sources, entries=[entry.to_dict() for entry, _ in found.entries],
        skipped=found.skipped,
    )


@task(name="find files backup", **retrying(2, 5))
def find_files_backup(repo: Repository, selector: str, name: str) -> FilesManifest:
    return find_file_backup(repo, selector, name)


@task(name="restore files", **retrying(2, 10))
def restore_files_into(repo: Repository, settings: Settings, manifest: FilesManifest, dest: str,
                       overwrite: bool) -> Restored:
    work = work_directory(settings.work_dir)
    try:
        return restore_archive(
            repo, manifest, Path(dest), work, overwrite=overwrite,
            gpg_homedir=settings.gpg_homedir,
            passphrase=crypto.resolve_passphrase(settings.gpg_passphrase, settings.gpg_passphrase_block),
            secrets=settings.secrets(),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
