"""Where backups live: the Repository interface every store implements, and open_repository.

A repository URL is `file:///path` (pgdr.storage.filerepo) or `s3://bucket/prefix`
(pgdr.storage.s3repo). Keys are relative paths under that root; every key is validated so
that no input can reach outside it. Writes are atomic: a reader sees a whole object or none
(a file is renamed into place, an S3 multipart upload is completed or aborted).
"""

from __future__ import annotations

import builtins
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pgdr.ops.errors import ConfigError, IntegrityError, NotFoundError, PgdrError

MiB = 1024 * 1024
GiB = 1024 * MiB
READ_CHUNK = 1 * MiB
_KEY_PART = re.compile(r"^[A-Za-z0-9._~%+=@,-]+$")


def validate_key(key: str) -> str:
    """A key is a relative path of plain components: no `..`, no absolute path, no
    backslash or control character, nothing a URL could turn into another place."""
    if not isinstance(key, str) or not key or key.startswith("/") or key.endswith("/"):
        raise ConfigError(f"invalid repository key {key!r}")
    for part in key.split("/"):
        if part in ("", ".", "..") or not _KEY_PART.match(part):
            raise ConfigError(f"invalid repository key {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key with an optional trailing slash."""
    if prefix:
        validate_key(prefix.rstrip("/") or "/")
    return prefix


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime
    storage_class: str | None = None
    # Changes whenever the object is written again (S3: its ETag; a file: its inode and
    # mtime, as every write renames a new file into place): what the catalog index binds to.
    tag: str | None = None


# Storage classes whose objects S3 must restore (RestoreObject, hours) before they can be read.
ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
READABLE, ARCHIVED, RESTORING = "readable", "archived", "restoring"


@dataclass(frozen=True)
class PutResult:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class IncompleteUpload:
    """An upload that was started and never completed (a killed backup)."""

    key: str
    started: datetime
    upload_id: str



class Repository(ABC):
    url: str

    @abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes], *, storage_class: str | None = None,
                   size_hint: int | None = None) -> PutResult:
        """Store the chunks under key atomically; return size and sha256 of what was stored."""

    @abstractmethod
    def get_stream(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks; NotFoundError when absent."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and time, or None when absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every complete object whose key starts with prefix (all pages)."""

    @abstractmethod
    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """The next path component of every key under prefix (`prefix` ends with / or is '')."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object (no error when it is already gone)."""

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Remove every object (as delete, in no particular order); returns why each key
        that could not be deleted was not: empty when all are gone."""
        failed = {}
        for key in keys:
            try:
                self.delete(key)
            except PgdrError as exc:
                failed[key] = str(exc)
        return failed

    def copy(self, src_key: str, dst_key: str, *, storage_class: str | None = None) -> None:
        """Store a copy of the object src_key under dst_key (atomically, as put_stream)."""
        info = self.head(src_key)
        if info is None:
            raise NotFoundError(f"{src_key} is not in the repository")
        self.put_stream(dst_key, self.get_stream(src_key), storage_class=storage_class, size_hint=info.size)

    @abstractmethod
    def incomplete_uploads(self, prefix: str = "") -> builtins.list[IncompleteUpload]:
        """Uploads started but never completed under prefix."""

    @abstractmethod
    def abort_upload(self, upload: IncompleteUpload) -> None:
        """Discard an incomplete upload."""

    def put_bytes(self, key: str, data: bytes, *, storage_class: str | None = None) -> PutResult:
        return self.put_stream(key, [data], storage_class=storage_class, size_hint=len(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only if no object has the key (atomically): False if one has."""
        raise ConfigError(f"{self.url} does not support conditional writes")

    def get_tagged(self, key: str) -> tuple[bytes, str | None]:
        """The object's bytes and the tag of that very version; NotFoundError when absent."""
        raise ConfigError(f"{self.url} does not support tagged reads")

    def put_if_tag(self, key: str, data: bytes, tag: str | None) -> bool:
        """Replace the object only while it is still the version `tag` names (None: only
        while there is none), atomically: False when another writer came first."""
        raise ConfigError(f"{self.url} does not support conditional writes")

    def lock_status(self, key: str) -> str | None:
        """Why the object cannot be deleted now (S3 Object Lock), or None."""
        return None

    def archive_state(self, key: str) -> tuple[str | None, str]:
        """(storage class, READABLE | ARCHIVED | RESTORING): whether the object can be read
        now, or must first come back from an archive storage class."""
        return None, READABLE

    def request_restore(self, key: str, days: int) -> None:
        """Ask the store to bring an archived object back, readable for `days` days."""
        raise ConfigError(f"{self.url} has no archive storage classes")

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.get_stream(key))

    def get_stream_parallel(self, key: str, streams: int) -> Iterator[bytes]:
        """get_stream, downloading in several streams at once where the store gains from it
        (S3 ranged GETs): the same bytes, in order."""
        return self.get_stream(key)

    def sha256(self, key: str) -> tuple[int, str]:
        """Read the whole object back: (size, sha256 of its bytes)."""
        digest = hashlib.sha256()
        size = 0
        for chunk in self.get_stream(key):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()

    def verify(self, key: str, size: int, sha256: str) -> None:
        """IntegrityError unless the stored object has exactly this size and checksum."""
        actual_size, actual = self.sha256(key)
        if actual_size != size or actual != sha256:
            raise IntegrityError(
                f"{key} is corrupt: expected {size} bytes with sha256 {sha256[:12]}…, "
                f"found {actual_size} bytes with sha256 {actual[:12]}…"
            )


def hash_chunks(chunks: Iterable[bytes], digest: Any) -> Iterator[bytes]:
    """The non-empty chunks, each added to digest as it passes."""
    for chunk in chunks:
        if chunk:
            digest.update(chunk)
            yield chunk


def open_repository(url: str, *, sse: str = "AES256", kms_key_id: str | None = None,
                    region: str | None = None) -> Repository:
    """The repository a URL names: file:///path or s3://bucket[/prefix]."""
    # Imported here, not at the top: both stores build on this module.
    from pgdr.storage.filerepo import FileRepository
    from pgdr.storage.s3repo import S3Repository

    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"file repository URLs have no host: {url}")
        path = Path(unquote(parsed.path))
        if not path.is_absolute() or ".." in path.parts:
            raise ConfigError(f"file repository path must be absolute: {url}")
        return FileRepository(path)
    if parsed.scheme == "s3":
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", parsed.netloc or ""):
            raise ConfigError(f"invalid S3 bucket name in {url}")
        prefix = parsed.path.strip("/")
        if prefix:
            validate_key(prefix)
        if parsed.query or parsed.fragment or parsed.params:
            raise ConfigError(f"S3 repository URLs take no query or fragment: {url}")
        return S3Repository(parsed.netloc, prefix, sse=sse, kms_key_id=kms_key_id, region=region)
    raise ConfigError(f"unsupported repository URL {url!r}: use file:///path or s3://bucket/prefix")
