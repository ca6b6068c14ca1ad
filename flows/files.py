"""Files backups: configuration, encrypted environment files, Terraform state, manifests.

files:          collect paths -> refuse secrets unless encrypted -> tar | zstd | gpg ->
                repository -> manifest (last) -> audit record -> retention of the tier.
restore_files:  find backup -> verify + decode -> validate every member -> write into a
                directory, each file's sha256 checked -> audit record.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.backup import TOOL_VERSION
from flows.prune import prune_after_backup, replicate_backup
from flows.steps import (
    FLOW_HOOKS,
    Progress,
    audited,
    open_repo,
    retrying,
    run_name,
    write_manifest,
)
from pgdr.catalog import catalog, retention
from pgdr.catalog.locks import database_lock
from pgdr.files import files as filing
from pgdr.ops.errors import ConfigError
from pgdr.ops.settings import Settings, check_tier, load_settings
from pgdr.pipeline import crypto
from pgdr.restore.restore import work_directory


@task(name="archive files", **retrying(2, 15),
      timeout_seconds=12 * 3600)
def archive_files(paths: list[str], name: str, repo_url: str, settings: Settings, backup_id: str,
                  tier: str, encrypt_fingerprint: str | None) -> filing.FilesManifest:
    started = catalog.utcnow()
    found = filing.collect(paths)
    if not encrypt_fingerprint:
        secret = filing.first_secret([entry for entry, _ in found.entries],
                                     filing.secret_patterns(settings.files_secret_patterns))
        if secret:
            raise ConfigError(f"{secret} looks like a secret: refusing to store it unencrypted "
                              "(pass --encrypt-to or set PGDR_ENCRYPT_TO)")
    if found.skipped:
        get_run_logger().warning("skipped %d special files (sockets, fifos, devices): %s",
                                 len(found.skipped), ", ".join(found.skipped[:5]))
    data_key = filing.ARCHIVE + (".gpg" if encrypt_fingerprint else "")
    prefix = filing.backup_prefix(name, backup_id)
    with Progress(f"files backup {name}", sum(entry.size for entry, _ in found.entries)) as progress:
        stored, tar_bytes = filing.store_archive(
            found.entries, open_repo(repo_url, settings), f"{prefix}/{data_key}",
            encrypt_to=encrypt_fingerprint, gpg_homedir=settings.gpg_homedir,
            storage_class=settings.storage_classes.get(tier), zstd_level=settings.zstd_level,
            zstd_threads=settings.zstd_threads, secrets=settings.secrets(),
            progress=lambda read, _written: progress.update(read),
        )
    return filing.FilesManifest(
        backup_id=backup_id, name=name, tier=tier,
        started_at=catalog.iso(started), finished_at=catalog.iso(catalog.utcnow()),
        tool_version=TOOL_VERSION, format=filing.FORMAT, compression=f"zstd-{settings.zstd_level}",
        encryption={"type": "gpg", "recipient_fingerprint": encrypt_fingerprint}
        if encrypt_fingerprint else None,
        size_bytes=stored.size, archive_bytes=tar_bytes, sha256=stored.sha256, data_key=data_key,
        sources=found.sources, entries=[entry.to_dict() for entry, _ in found.entries],
        skipped=found.skipped,
    )


@flow(name="files", flow_run_name=run_name("files-{name}-{tier}"), log_prints=True, **FLOW_HOOKS)
def files(paths: list[str], name: str, repo: str | None = None, tier: str = "manual",
          encrypt_to: str | None = None) -> dict[str, Any]:
    """Back up named paths (directories or files) as one archive; returns its summary."""
    settings = load_settings()
    filing.check_name(name)
    check_tier(tier)
    repo_url = repo or settings.repo_url
    open_repo(repo_url, settings)
    recipient = encrypt_to or settings.encrypt_to
    fingerprint = crypto.recipient_fingerprint(recipient, settings.gpg_homedir) if recipient else None
    backup_id = catalog.new_backup_id(catalog.utcnow(), tier)
    with audited(repo_url, settings, "files-backup", type=tier, source=name, destination=repo_url,
                 backup_id=backup_id) as step:
        # A prune of this name waits meanwhile, and so does another backup of it.
        with database_lock(open_repo(repo_url, settings), name, "files-backup", area=retention.FILES):
            manifest = archive_files(list(paths), name, repo_url, settings, backup_id, tier, fingerprint)
            write_manifest(repo_url, settings, manifest)
        if settings.replica_repo_url:
            replicate_backup(repo_url, settings.replica_repo_url, settings, manifest)
        step.succeeded(destination=f"{repo_url}/{manifest.prefix}", size_bytes=manifest.size_bytes)
    pruned = prune_after_backup(repo_url, name, tier, area=retention.FILES)
    return {
        **manifest.summary(),
        "sha256": manifest.sha256,
        "archive_bytes": manifest.archive_bytes,
        "sources": manifest.sources,
        "skipped": manifest.skipped,
        "location": f"{repo_url.rstrip('/')}/{manifest.prefix}/",
        "duration_seconds": round(step.seconds, 3),
        "pruned": pruned["counts"] if pruned else None,
    }


@task(name="find files backup", **retrying(2, 5))
def find_files_backup(repo_url: str, settings: Settings, selector: str, name: str) -> filing.FilesManifest:
    return filing.find_file_backup(open_repo(repo_url, settings), selector, name)


@task(name="restore files", **retrying(2, 10))
def restore_files_into(repo_url: str, settings: Settings, manifest: filing.FilesManifest, dest: str,
                       overwrite: bool) -> filing.Restored:
    work = work_directory(settings.work_dir)
    try:
        return filing.restore_archive(
            open_repo(repo_url, settings), manifest, Path(dest), work, overwrite=overwrite,
            gpg_homedir=settings.gpg_homedir,
            passphrase=crypto.resolve_passphrase(settings.gpg_passphrase, settings.gpg_passphrase_block),
            secrets=settings.secrets(),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


@flow(name="restore-files", flow_run_name=run_name("restore-files-{name}-into-{dest}"),
      log_prints=True, **FLOW_HOOKS)
def restore_files(backup_id: str, name: str, dest: str, repo: str | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Restore a files backup (an id, or latest) into the directory dest."""
    settings = load_settings()
    filing.check_name(name)
    if not Path(dest).is_absolute():
        dest = str(Path(dest).resolve())
    repo_url = repo or settings.repo_url
    with audited(repo_url, settings, "files-restore", type="unknown", source=name, destination=dest,
                 backup_id=backup_id) as step:
        manifest = find_files_backup(repo_url, settings, backup_id, name)
        step.type, step.details["backup_id"] = manifest.tier, manifest.backup_id
        done = restore_files_into(repo_url, settings, manifest, dest, overwrite)
        step.source = f"{repo_url}/{manifest.prefix}"
        step.succeeded(size_bytes=done.bytes)
    return {
        "backup_id": manifest.backup_id,
        "name": name,
        "dest": dest,
        "files": done.files,
        "dirs": done.dirs,
        "symlinks": done.symlinks,
        "bytes": done.bytes,
        "verified": True,
        "duration_seconds": round(step.seconds, 3),
    }
