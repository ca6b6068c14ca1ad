"""Files backups: configuration, encrypted environment files, Terraform state, manifests.

files:          collect paths -> refuse secrets unless encrypted -> tar | zstd | gpg ->
                repository -> manifest (last) -> audit record -> retention of the tier.
restore_files:  find backup -> verify + decode -> validate every member -> write into a
                directory, each file's sha256 checked -> audit record.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from prefect import flow

from flows.prune import prune_after_backup
from pgdr.catalog import catalog, prune_report
from pgdr.catalog.locks import database_lock
from pgdr.files.manifest import FilesSummary, check_name
from pgdr.ops.settings import check_tier, load_settings
from pgdr.pipeline import crypto
from tasks.files import archive_files, find_files_backup, restore_files_into
from tasks.prune import replicate_backup
from tasks.records import audited, open_repo, write_manifest
from tasks.runs import FLOW_HOOKS, run_name


class FilesBackupResult(FilesSummary):
    """`pgdr files --json`."""

    sha256: str
    archive_bytes: int
    sources: dict[str, str]
    skipped: list[str]
    location: str
    duration_seconds: float
    pruned: dict[str, int] | None


class FilesRestoreResult(TypedDict):
    """`pgdr restore-files --json`."""

    backup_id: str
    name: str
    dest: str
    files: int
    dirs: int
    symlinks: int
    bytes: int
    verified: bool
    duration_seconds: float


@flow(name="files", flow_run_name=run_name("files-{name}-{tier}"), log_prints=True, **FLOW_HOOKS)
def files(paths: list[str], name: str, repo: str | None = None, tier: str = "manual",
          encrypt_to: str | None = None) -> FilesBackupResult:
    """Back up named paths (directories or files) as one archive; returns its summary."""
    settings = load_settings()
    check_name(name)
    check_tier(tier)
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)  # a bad URL fails here, before anything runs
    recipient = encrypt_to or settings.encrypt_to
    fingerprint = crypto.recipient_fingerprint(recipient, settings.gpg_homedir) if recipient else None
    backup_id = catalog.new_backup_id(catalog.utcnow(), tier)
    with audited(repository, settings, "files-backup", type=tier, source=name, destination=repo_url,
                 backup_id=backup_id) as step:
        # A prune of this name waits meanwhile, and so does another backup of it.
        with database_lock(repository, name, "files-backup", area=prune_report.FILES):
            manifest = archive_files(list(paths), name, repository, settings, backup_id, tier, fingerprint)
            write_manifest(repository, manifest)
        if settings.replica_repo_url:
            replicate_backup(repository, open_repo(settings.replica_repo_url, settings), settings, manifest)
        step.succeeded(destination=f"{repo_url}/{manifest.prefix}", size_bytes=manifest.size_bytes)
    pruned = prune_after_backup(repository, name, tier, area=prune_report.FILES)
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


@flow(name="restore-files", flow_run_name=run_name("restore-files-{name}-into-{dest}"),
      log_prints=True, **FLOW_HOOKS)
def restore_files(backup_id: str, name: str, dest: str, repo: str | None = None,
                  overwrite: bool = False) -> FilesRestoreResult:
    """Restore a files backup (an id, or latest) into the directory dest."""
    settings = load_settings()
    check_name(name)
    if not Path(dest).is_absolute():
        dest = str(Path(dest).resolve())
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)
    with audited(repository, settings, "files-restore", type="unknown", source=name, destination=dest,
                 backup_id=backup_id) as step:
        manifest = find_files_backup(repository, backup_id, name)
        step.type, step.details["backup_id"] = manifest.tier, manifest.backup_id
        done = restore_files_into(repository, settings, manifest, dest, overwrite)
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
