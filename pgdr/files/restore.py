"""Restoring a files backup: the stored archive's checksum verified, every member
validated against the manifest and the destination, then each file written and its
sha256 checked as it is written."""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pgdr.files.manifest import Entry, FilesManifest
from pgdr.files.safety import UnsafeArchive, check_archive, check_destination, check_members, entry_of
from pgdr.ops.errors import IntegrityError
from pgdr.pipeline.dump import fetch_dump
from pgdr.storage.repository import READ_CHUNK, Repository

# Restored modes never carry set-uid/set-gid: a backup must not be a way to plant them.
_RESTORE_MODE_MASK = 0o1777


@dataclass
class Restored:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0


def restore_archive(
    repo: Repository,
    manifest: FilesManifest,
    dest: Path,
    work: Path,
    *,
    overwrite: bool = False,
    gpg_homedir: str | None = None,
    passphrase: str | None = None,
    secrets: list[str] | None = None,
) -> Restored:
    """Decode the stored archive into work (its checksum verified), validate every member,
    then write them into dest, checking each file's sha256."""
    expected = manifest.members()
    check_members(expected)
    tar_path = work / f"{manifest.backup_id}.tar"
    fetch_dump(repo, f"{manifest.prefix}/{manifest.data_key}", tar_path, size=manifest.size_bytes,
               sha256=manifest.sha256, encrypted=manifest.encryption is not None,
               gpg_homedir=gpg_homedir, passphrase=passphrase, secrets=secrets)
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            members = tar.getmembers()
            check_archive(members, expected)
            dest.mkdir(parents=True, exist_ok=True)
            dest = dest.resolve()
            check_destination(dest, expected, overwrite)
            return _extract(tar, members, {e.path: e for e in expected}, dest)
    except tarfile.TarError as exc:
        raise IntegrityError(f"the archive of {manifest.backup_id} is unreadable: {exc}") from None
    finally:
        tar_path.unlink(missing_ok=True)


def _extract(tar: tarfile.TarFile, members: Sequence[tarfile.TarInfo], expected: dict[str, Entry],
             dest: Path) -> Restored:
    done = Restored()
    dirs: list[Entry] = []
    # Directories first (writable while filling them), files, then symlinks: nothing is
    # ever written through a link.
    order = {"dir": 0, "file": 1, "symlink": 2}
    for member in sorted(members, key=lambda m: order[entry_of(m).type]):
        entry = expected[member.name]
        path = dest.joinpath(*entry.path.split("/"))
        _check_parents(dest, path)
        if entry.type == "dir":
            path.mkdir(mode=0o700, exist_ok=True)
            dirs.append(entry)
            done.dirs += 1
            continue
        if os.path.lexists(path):
            path.unlink()  # check_destination allowed it: --overwrite
        if entry.type == "symlink":
            os.symlink(entry.target or "", path)
            os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
            done.symlinks += 1
            continue
        source = tar.extractfile(member)
        if source is None:
            raise IntegrityError(f"member {entry.path!r} has no data")
        done.bytes += _write_file(source, path, entry)
        done.files += 1
    # Deepest first: filling a directory changes its mtime, a read-only one blocks writes.
    for entry in sorted(dirs, key=lambda e: e.path.count("/"), reverse=True):
        path = dest.joinpath(*entry.path.split("/"))
        os.chmod(path, entry.mode_bits & _RESTORE_MODE_MASK)
        os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))
    return done


def _check_parents(dest: Path, path: Path) -> None:
    """Nothing may have put a symlink on the way since the destination was checked."""
    parent = path.parent
    while parent != dest:
        if parent.is_symlink():
            raise UnsafeArchive(f"{parent} became a symlink during the restore")
        parent = parent.parent


def _write_file(source: IO[bytes], path: Path, entry: Entry) -> int:
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in _chunks(source):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
            if size != entry.size or digest.hexdigest() != entry.sha256:
                raise IntegrityError(f"{entry.path}: restored bytes do not match the manifest's sha256")
            os.fchmod(out.fileno(), entry.mode_bits & _RESTORE_MODE_MASK)
        os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size


def _chunks(source: IO[bytes]) -> Iterator[bytes]:
    while chunk := source.read(READ_CHUNK):
        yield chunk
