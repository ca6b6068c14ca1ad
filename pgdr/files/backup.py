"""Taking a files backup: collecting the named paths, spotting unencrypted secrets, and
streaming the archive into the repository."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pgdr.files.manifest import Entry
from pgdr.files.safety import UnsafeArchive, check_members
from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.pipeline.pipeline import Progress, encode_commands, stream_encoded
from pgdr.storage.repository import PutResult, Repository

# Files that hold credentials: never stored unless the archive is encrypted.
SECRET_PATTERNS = (".env", "*.env", ".env.*", "*.tfstate", "*.tfstate.backup", "*.tfvars", "*.tfvars.json",
                   "*.pem", "*.key", "id_rsa*", "id_ed25519*", "id_ecdsa*", "credentials", "*.p12", "*.pfx",
                   "*.jks", "kubeconfig", "*secret*", ".pgpass", ".netrc")
# Names that look like a secret's but are encrypted already, or a template of one.
NOT_SECRET_SUFFIXES = (".gpg", ".asc", ".age", ".example", ".sample", ".template", ".dist")


@dataclass
class Collected:
    entries: list[tuple[Entry, Path]]
    sources: dict[str, str]
    skipped: list[str]


def collect(paths: Sequence[str]) -> Collected:
    """Every file, directory and symlink under the named paths, in archive order. Each path
    becomes a top-level member named after its last component (a named symlink is
    followed: the backup holds what it points to)."""
    if not paths:
        raise ConfigError("no paths to back up: pass --path")
    found = Collected([], {}, [])
    for given in paths:
        local = Path(given).expanduser()
        try:
            local = local.resolve(strict=True)
        except (FileNotFoundError, RuntimeError):
            raise ConfigError(f"{given} does not exist") from None
        top = local.name
        if not top:
            raise ConfigError(f"cannot back up {given}: name a directory below /")
        if top in found.sources:
            raise ConfigError(f"{given} and {found.sources[top]} would both be stored as {top}/: "
                              "back them up under different names")
        found.sources[top] = str(local)
        _scan(local, top, found)
    try:
        check_members([entry for entry, _ in found.entries])
    except UnsafeArchive as exc:  # a backup that no restore would accept is no backup
        raise ConfigError(f"cannot back up: {exc}") from None
    return found


def _scan(local: Path, name: str, found: Collected) -> None:
    try:
        info = os.lstat(local)
        mode = f"{stat.S_IMODE(info.st_mode):04o}"
        if stat.S_ISLNK(info.st_mode):
            found.entries.append((Entry(name, "symlink", mode, info.st_mtime_ns,
                                        target=os.readlink(local)), local))
        elif stat.S_ISDIR(info.st_mode):
            found.entries.append((Entry(name, "dir", mode, info.st_mtime_ns), local))
            for child in sorted(os.listdir(local)):
                _scan(local / child, f"{name}/{child}", found)
        elif stat.S_ISREG(info.st_mode):
            found.entries.append((Entry(name, "file", mode, info.st_mtime_ns, size=info.st_size), local))
        else:
            found.skipped.append(name)  # sockets, fifos, devices: not configuration
    except OSError as exc:
        raise PgdrError(f"cannot read {local}: {exc.strerror}") from None


def secret_patterns(extra: Sequence[str] = ()) -> list[str]:
    return [*SECRET_PATTERNS, *(p for p in extra if p)]


def first_secret(entries: Sequence[Entry], patterns: Sequence[str]) -> str | None:
    """The first file whose name matches a secret pattern (matched on the file's name,
    ignoring case: `Credentials`, `PROD.ENV`), unless it is encrypted or a template."""
    for entry in entries:
        base = entry.path.rsplit("/", 1)[-1].lower()
        if entry.type != "file" or base.endswith(NOT_SECRET_SUFFIXES):
            continue
        if any(fnmatch.fnmatchcase(base, p.lower()) for p in patterns):
            return entry.path
    return None


class _HashingReader:
    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def _write_tar(items: Sequence[tuple[Entry, Path]], sink: Any) -> None:
    """Write the members into sink as a PAX tar, filling in each file's sha256 (of exactly
    the bytes the archive holds: a file that grows while it is read is cut at its size)."""
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for entry, local in items:
            info = tarfile.TarInfo(entry.path)
            info.mode = entry.mode_bits
            info.mtime = entry.mtime_ns / 1e9
            if entry.type == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.type == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target or ""
                tar.addfile(info)
            else:
                info.size = entry.size
                try:
                    with open(local, "rb") as handle:
                        reader = _HashingReader(handle)
                        tar.addfile(info, reader)  # type: ignore[arg-type]
                except OSError as exc:
                    raise PgdrError(f"cannot read {local}: {exc.strerror or exc}") from None
                entry.sha256 = reader.digest.hexdigest()


def store_archive(
    items: Sequence[tuple[Entry, Path]],
    repo: Repository,
    key: str,
    *,
    encrypt_to: str | None,
    gpg_homedir: str | None,
    storage_class: str | None,
    zstd_level: int = 3,
    zstd_threads: int = 2,
    secrets: list[str] | None = None,
    progress: Progress | None = None,
) -> tuple[PutResult, int]:
    """Stream the members as tar | zstd | [gpg] into repo/key: (stored, tar bytes)."""
    return stream_encoded(
        lambda sink: _write_tar(items, sink), repo, key,
        encode=encode_commands(encrypt_to, gpg_homedir, zstd_level, zstd_threads),
        what="archive", storage_class=storage_class,
        size_hint=sum(entry.size for entry, _ in items), secrets=secrets, progress=progress,
    )
