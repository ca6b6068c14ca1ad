"""Restoring a base backup into a data directory, or rebuilding one from an incremental
chain with pg_combinebackup: every link verified against its sha256 before it is unpacked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from pgdr.ops.errors import ConfigError, IntegrityError
from pgdr.pipeline.dump import fetch_dump
from pgdr.pipeline.process import Pipeline
from pgdr.pitr.basebackup import BaseManifest
from pgdr.postgres.programs import pg_bin
from pgdr.storage.repository import READ_CHUNK, Repository

# Parallel streams downloading a base backup from S3: the fast way back is network-bound.
DOWNLOAD_STREAMS = 4


def restore_base_backup(repo: Repository, manifest: BaseManifest, datadir: Path, *,
                        gpg_homedir: str | None = None, passphrase: str | None = None,
                        secrets: list[str] | None = None) -> None:
    """Verify and decode the stored backup, then unpack it into datadir (new or empty).

    The tar is checked against the manifest's sha256 before it is unpacked.
    """
    if datadir.exists() and any(datadir.iterdir()):
        raise ConfigError(f"{datadir} is not empty: restore a base backup into a new directory")
    datadir.mkdir(parents=True, exist_ok=True)
    datadir.chmod(0o700)
    archive = datadir.with_name(f".{datadir.name}.base.tar")
    try:
        fetch_dump(repo, f"{manifest.prefix}/{manifest.data_key}", archive, size=manifest.size_bytes,
                   sha256=manifest.sha256, encrypted=manifest.encryption is not None,
                   gpg_homedir=gpg_homedir, passphrase=passphrase, secrets=secrets,
                   streams=DOWNLOAD_STREAMS)
        with tarfile.open(archive, "r:") as tar:
            extract_safely(tar, datadir)
    except BaseException:
        shutil.rmtree(datadir, ignore_errors=True)
        raise
    finally:
        archive.unlink(missing_ok=True)


def restore_backup_chain(repo: Repository, chain: list[BaseManifest], datadir: Path, *,
                         bin_dir: Path | None = None, gpg_homedir: str | None = None,
                         passphrase: str | None = None, secrets: list[str] | None = None) -> None:
    """Restore a full backup (a chain of one) or rebuild one from a chain (full first, then
    each incremental): every link is verified and unpacked beside datadir, then
    pg_combinebackup writes datadir. A damaged link fails before datadir is written."""
    if len(chain) == 1:
        restore_base_backup(repo, chain[0], datadir, gpg_homedir=gpg_homedir, passphrase=passphrase,
                            secrets=secrets)
        return
    if datadir.exists() and any(datadir.iterdir()):
        raise ConfigError(f"{datadir} is not empty: restore a base backup into a new directory")
    staging = datadir.with_name(f".{datadir.name}.chain")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700, parents=True)
    try:
        links = []
        for index, link in enumerate(chain):
            links.append(staging / f"{index:03d}-{link.backup_id}")
            restore_base_backup(repo, link, links[-1], gpg_homedir=gpg_homedir, passphrase=passphrase,
                                secrets=secrets)
        if datadir.exists():
            datadir.rmdir()  # empty (checked): pg_combinebackup creates it
        program = str(bin_dir / "pg_combinebackup") if bin_dir else pg_bin("pg_combinebackup")
        with Pipeline([[program, *map(str, links), "-o", str(datadir)]], stdout=subprocess.DEVNULL,
                      secrets=secrets or []) as combine:
            combine.wait()
    except BaseException:
        shutil.rmtree(datadir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def extract_safely(tar: tarfile.TarFile, datadir: Path) -> None:
    """Unpack only plain files and directories, each strictly inside datadir, owned by
    us and private (0600/0700), whatever the archive says. A single-tablespace base
    backup holds nothing else; anything else (links, devices, `..`) is refused.
    (tarfile's `data` filter would do this, but only from Python 3.11.4.)"""
    root = datadir.resolve()
    for member in tar:
        path = (root / member.name).resolve()
        if member.name.startswith("/") or not path.is_relative_to(root):
            raise IntegrityError(f"base backup entry {member.name!r} points outside the data directory")
        if member.isdir():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif member.isfile():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            source = tar.extractfile(member)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with source, os.fdopen(fd, "wb") as out:  # type: ignore[union-attr]
                shutil.copyfileobj(source, out, READ_CHUNK)  # type: ignore[arg-type]
        else:
            raise IntegrityError(f"base backup entry {member.name!r} is not a file or directory")
