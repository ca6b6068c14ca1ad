"""Backups of files: application configuration, encrypted environment files, Terraform
state, Kubernetes manifests.

Named paths are streamed as tar (PAX) | zstd | [gpg] into the repository; nothing is
staged. Layout:

    files/<name>/<tier>/<YYYY>/<MM>/<DD>/<backup_id>/archive.tar.zst[.gpg]
    files/<name>/<tier>/<YYYY>/<MM>/<DD>/<backup_id>/manifest.json    written LAST

The manifest lists every member (path, type, mode, mtime_ns, size, sha256; symlinks:
target). A restore checks the stored archive's checksum, then validates every member of
the archive against the manifest and against the destination before it writes a byte,
and checks each restored file's sha256 as it is written. Python 3.11.2's tarfile has no
extraction filters, and pgdr does not use extractall at all: it writes each member itself.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, TypedDict

from pgdr.catalog import catalog
from pgdr.ops.errors import ConfigError, IntegrityError, NotFoundError, PgdrError
from pgdr.pipeline.dump import fetch_dump
from pgdr.pipeline.pipeline import Progress, encode_commands, stream_encoded
from pgdr.storage.repository import READ_CHUNK, PutResult, Repository

AREA = "files"
ARCHIVE = "archive.tar.zst"
FORMAT = "tar-pax"
# Files that hold credentials: never stored unless the archive is encrypted.
SECRET_PATTERNS = (".env", "*.env", ".env.*", "*.tfstate", "*.tfstate.backup", "*.tfvars", "*.tfvars.json",
                   "*.pem", "*.key", "id_rsa*", "id_ed25519*", "id_ecdsa*", "credentials", "*.p12", "*.pfx",
                   "*.jks", "kubeconfig", "*secret*", ".pgpass", ".netrc")
# Names that look like a secret's but are encrypted already, or a template of one.
NOT_SECRET_SUFFIXES = (".gpg", ".asc", ".age", ".example", ".sample", ".template", ".dist")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MAX_LINK_DEPTH = 40
# Restored modes never carry set-uid/set-gid: a backup must not be a way to plant them.
_RESTORE_MODE_MASK = 0o1777


class UnsafeArchive(PgdrError):
    """A member could write outside the destination, or does not match the manifest."""


@dataclass
class Entry:
    """One archive member as the manifest lists it."""

    path: str
    type: str  # "file", "dir" or "symlink"
    mode: str  # octal, e.g. "0644"
    mtime_ns: int
    size: int = 0
    sha256: str | None = None
    target: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Entry:
        try:
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except TypeError as exc:
            raise ConfigError(f"unreadable manifest entry: {exc}") from None

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


class FilesSummary(TypedDict):
    """A files backup in `--json` results."""

    backup_id: str
    name: str
    tier: str
    finished_at: str
    size_bytes: int
    encrypted: bool
    files: int


@dataclass
class FilesManifest(catalog.StoredManifest):
    KIND: ClassVar[str] = "files manifest"

    backup_id: str
    name: str
    tier: str
    started_at: str
    finished_at: str
    tool_version: str
    format: str
    compression: str
    encryption: dict[str, str] | None
    size_bytes: int
    archive_bytes: int
    sha256: str
    data_key: str
    sources: dict[str, str]
    entries: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return backup_prefix(self.name, self.backup_id)

    def check(self) -> None:
        super().check()
        check_name(self.name)

    def members(self) -> list[Entry]:
        return [Entry.from_dict(raw) for raw in self.entries]

    def summary(self) -> FilesSummary:
        return {
            "backup_id": self.backup_id,
            "name": self.name,
            "tier": self.tier,
            "finished_at": self.finished_at,
            "size_bytes": self.size_bytes,
            "encrypted": self.encryption is not None,
            "files": sum(1 for e in self.entries if e["type"] == "file"),
        }


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"invalid files backup name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def backup_prefix(name: str, backup_id: str) -> str:
    """`files/<name>/<tier>/<YYYY>/<MM>/<DD>/<backup_id>` (no trailing slash)."""
    return catalog.dated_prefix(f"{AREA}/{check_name(name)}", backup_id)


# --- the catalog of files backups ------------------------------------------------------------


def list_names(repo: Repository) -> list[str]:
    """The names files backups were taken under."""
    return repo.list_dirs(f"{AREA}/")


def list_file_backups(repo: Repository, name: str | None = None) -> list[FilesManifest]:
    """Every complete files backup (it has a manifest), oldest first. Each item has
    `backup_id`, `tier`, `finished`, `prefix` and `size_bytes`, like catalog.Manifest, so
    that the tier retention of database backups can choose among them too."""
    names = [check_name(name)] if name else list_names(repo)
    manifests = []
    for each in names:
        for info in repo.list(f"{AREA}/{each}/"):
            if info.key.endswith("/" + catalog.MANIFEST):
                manifests.append(FilesManifest.read(repo, info.key))
    return sorted(manifests, key=lambda m: (m.finished_at, m.backup_id))


def find_file_backup(repo: Repository, selector: str, name: str) -> FilesManifest:
    """A backup id, or `latest`: the newest complete backup named name."""
    if selector == "latest":
        backups = list_file_backups(repo, name)
        if not backups:
            raise NotFoundError(f"no files backups named {name} in {repo.url}")
        return backups[-1]
    key = f"{backup_prefix(name, selector)}/{catalog.MANIFEST}"
    if not repo.head(key):
        raise NotFoundError(f"files backup {selector} of {name} not found in {repo.url}")
    return FilesManifest.read(repo, key)


# --- what to back up -------------------------------------------------------------------------


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


# --- safety of members -----------------------------------------------------------------------


def _unsafe_path(path: str) -> bool:
    parts = path.split("/")
    return (not path or path.startswith("/") or "\0" in path
            or any(part in ("", ".", "..") for part in parts))


def _resolves_inside(parts: list[str], links: dict[str, str], depth: int = 0) -> list[str] | None:
    """Resolve a path relative to the destination, following the archive's own symlinks;
    None when it leaves the destination (or loops)."""
    resolved: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return None
            resolved.pop()
            continue
        resolved.append(part)
        target = links.get("/".join(resolved))
        if target is not None:
            if depth >= _MAX_LINK_DEPTH or target.startswith("/"):
                return None
            followed = _resolves_inside(resolved[:-1] + target.split("/"), links, depth + 1)
            if followed is None:
                return None
            resolved = followed
    return resolved


def check_members(entries: Sequence[Entry]) -> None:
    """UnsafeArchive unless every member stays inside the destination: relative paths
    without `..`, only files, directories and symlinks, no member below a symlink, and
    every symlink resolving (through the others) to a place inside."""
    seen: set[str] = set()
    links = {e.path: e.target or "" for e in entries if e.type == "symlink"}
    for entry in entries:
        if _unsafe_path(entry.path):
            raise UnsafeArchive(f"refusing member {entry.path!r}: absolute path or '..'")
        if entry.type not in ("file", "dir", "symlink"):
            raise UnsafeArchive(f"refusing member {entry.path!r}: a {entry.type}")
        if entry.path in seen:
            raise UnsafeArchive(f"refusing member {entry.path!r}: it appears twice")
        seen.add(entry.path)
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in links:
                raise UnsafeArchive(f"refusing member {entry.path!r}: it lies below a symlink")
        if entry.type == "symlink":
            target = entry.target or ""
            if (not target or target.startswith("/")
                    or _resolves_inside(parts[:-1] + target.split("/"), links) is None):
                raise UnsafeArchive(f"refusing symlink {entry.path!r} -> {target!r}: "
                                    "it points outside the destination")


def _entry_of(member: tarfile.TarInfo) -> Entry:
    if member.isreg():
        kind = "file"
    elif member.isdir():
        kind = "dir"
    elif member.issym():
        kind = "symlink"
    elif member.islnk():
        raise UnsafeArchive(f"refusing member {member.name!r}: a hard link")
    else:
        raise UnsafeArchive(f"refusing member {member.name!r}: not a file, directory or symlink")
    return Entry(member.name, kind, f"{member.mode:04o}", 0, size=member.size if kind == "file" else 0,
                 target=member.linkname if kind == "symlink" else None)


def check_archive(members: Sequence[tarfile.TarInfo], expected: Sequence[Entry]) -> None:
    """UnsafeArchive unless the archive holds exactly the manifest's members (same type,
    size, mode and link target), and those are safe."""
    check_members(expected)
    by_path = {e.path: e for e in expected}
    found: set[str] = set()
    for member in members:
        entry = _entry_of(member)
        if _unsafe_path(entry.path):
            raise UnsafeArchive(f"refusing member {entry.path!r}: absolute path or '..'")
        listed = by_path.get(entry.path)
        if listed is None or entry.path in found:
            raise UnsafeArchive(f"refusing member {entry.path!r}: not in the manifest")
        found.add(entry.path)
        if ((entry.type, entry.size, entry.target, entry.mode_bits)
                != (listed.type, listed.size, listed.target, listed.mode_bits)):
            raise UnsafeArchive(f"member {entry.path!r} does not match the manifest")
    missing = set(by_path) - found
    if missing:
        raise UnsafeArchive(f"member {sorted(missing)[0]!r} of the manifest is not in the archive")


def check_destination(dest: Path, entries: Sequence[Entry], overwrite: bool) -> None:
    """PgdrError if writing the entries into dest would follow a symlink already there, or
    replace something without overwrite."""
    for entry in entries:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            parent = dest.joinpath(*parts[:depth])
            if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                raise UnsafeArchive(f"{parent} is in the way of {entry.path} (not a directory)")
        target = dest.joinpath(*parts)
        if not os.path.lexists(target):
            continue
        existing_dir = target.is_dir() and not target.is_symlink()
        if entry.type == "dir" and existing_dir:
            continue
        if existing_dir:
            raise PgdrError(f"{target} is a directory; the backup has a {entry.type} there")
        if not overwrite:
            raise PgdrError(f"{target} exists: pass --overwrite to replace existing files")


# --- backup ----------------------------------------------------------------------------------


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


# --- restore ---------------------------------------------------------------------------------


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
    for member in sorted(members, key=lambda m: order[_entry_of(m).type]):
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
