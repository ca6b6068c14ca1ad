"""Files and object storage: configuration files and S3 bucket contents."""

from __future__ import annotations

from flows.cli import render
from flows.cli.common import Result, command
from flows.cli.options import FlowOutput


@command(render.show_files)
def files(*, path: list[str], name: str, repo: str | None = None, tier: str = "manual",
          encrypt_to: str | None = None, output: FlowOutput = FlowOutput()) -> Result:
    """Back up files and directories into the repository.

    Args:
        path: file or directory to back up (repeatable)
        name: name of this set of files, e.g. app-config
        repo: repository URL
        tier: backup tier
        encrypt_to: gpg recipient to encrypt to (KEYID)
    """
    from flows.files import files

    return files(paths=path, name=name, repo=repo, tier=tier, encrypt_to=encrypt_to)


@command(render.show_restore_files)
def restore_files(backup: str, /, *, name: str, dest: str, overwrite: bool = False,
                  repo: str | None = None, output: FlowOutput = FlowOutput()) -> Result:
    """Restore a files backup into a directory.

    Args:
        backup: backup id, or latest
        name: name the files were backed up under
        dest: directory to restore into (DIR)
        overwrite: replace files that already exist
        repo: repository URL
    """
    from flows.files import restore_files

    return restore_files(backup_id=backup, name=name, dest=dest, repo=repo, overwrite=overwrite)


@command(render.show_storage_snapshot)
def storage_snapshot(*, source: str, repo: str | None = None, tier: str = "manual",
                     output: FlowOutput = FlowOutput()) -> Result:
    """Snapshot an S3 bucket or prefix into the (S3) repository.

    Args:
        source: s3://bucket[/prefix] to snapshot
        repo: repository URL (s3://...)
        tier: snapshot tier
    """
    from flows.storage import storage_snapshot

    return storage_snapshot(source=source, repo=repo, tier=tier)


@command(render.show_storage_restore)
def storage_restore(snapshot: str, /, *, dest: str, bucket: str | None = None, overwrite: bool = False,
                    repo: str | None = None, output: FlowOutput = FlowOutput()) -> Result:
    """Copy every object of a storage snapshot into a bucket or prefix.

    Args:
        snapshot: snapshot id, or latest
        dest: s3://bucket[/prefix] to restore into
        bucket: bucket the snapshot was taken of (for latest, with several)
        overwrite: restore into a non-empty bucket or prefix
        repo: repository URL (s3://...)
    """
    from flows.storage import storage_restore

    return storage_restore(snapshot=snapshot, dest=dest, bucket=bucket, repo=repo, overwrite=overwrite)
