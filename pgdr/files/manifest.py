"""Files backups in the repository: their layout, their manifest, and finding them.

Named paths are streamed as tar (PAX) | zstd | [gpg] into the repository; nothing is
staged. Layout:

    files/<name>/<tier>/<YYYY>/<MM>/<DD>/<backup_id>/archive.tar.zst[.gpg]
    files/<name>/<tier>/<YYYY>/<MM>/<DD>/<backup_id>/manifest.json    written LAST

The manifest lists every member (path, type, mode, mtime_ns, size, sha256; symlinks:
target).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypedDict

from pgdr.catalog import catalog
from pgdr.ops.errors import ConfigError, NotFoundError
from pgdr.storage.repository import Repository

AREA = "files"
ARCHIVE = "archive.tar.zst"
FORMAT = "tar-pax"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
