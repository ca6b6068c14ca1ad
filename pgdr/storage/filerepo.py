"""The file repository: backups in a local (or mounted) directory, written atomically."""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgdr.ops.errors import ConfigError, NotFoundError, PgdrError
from pgdr.storage.repository import (
    READ_CHUNK,
    IncompleteUpload,
    ObjectInfo,
    PutResult,
    Repository,
    hash_chunks,
    validate_key,
    validate_prefix,
)

_PARTIAL_MARK = ".partial-"


def _partial_beside(path: Path) -> Path:
    """A private name beside path (never listed as a key) to write into first."""
    return path.with_name(f".{path.name}{_PARTIAL_MARK}{uuid.uuid4().hex[:8]}")


def _write_synced(path: Path, chunks: Iterable[bytes]) -> None:
    """Write the chunks to path and fsync it: its bytes are on disk before it gets a name."""
    with open(path, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def write_atomically(destination: Path, chunks: Iterable[bytes]) -> None:
    """Write beside destination, fsync, rename into place, fsync the directory: a crash
    leaves the old state or the whole new file, never part of it."""
    partial = _partial_beside(destination)
    try:
        _write_synced(partial, chunks)
        os.replace(partial, destination)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _sync_directory(destination.parent)


def _file_tag(stat: os.stat_result) -> str:
    return f"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"


def _sync_directory(directory: Path) -> None:
    """fsync a directory: the names created or renamed in it survive a crash."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)



class FileRepository(Repository):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()

    def _path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ConfigError(f"invalid repository key {key!r}")
        return path

    def _writable_path(self, key: str) -> Path:
        """The key's path, its directory created."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PgdrError(f"cannot write to repository {self.url}: {exc.strerror}") from None
        return path

    def put_stream(self, key: str, chunks: Iterable[bytes], *, storage_class: str | None = None,
                   size_hint: int | None = None) -> PutResult:
        path = self._writable_path(key)
        digest = hashlib.sha256()
        size = 0

        def counted() -> Iterator[bytes]:
            # Counted, not stat()ed afterwards: what this call wrote, whatever a concurrent
            # writer or delete of the key does to the name next.
            nonlocal size
            for chunk in hash_chunks(chunks, digest):
                size += len(chunk)
                yield chunk

        write_atomically(path, counted())
        return PutResult(key, size, digest.hexdigest())

    def get_stream(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        except FileNotFoundError:
            raise NotFoundError(f"{key} is not in the repository") from None
        return self._read(handle)

    @staticmethod
    def _read(handle: Any) -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(READ_CHUNK):
                yield chunk

    def head(self, key: str) -> ObjectInfo | None:
        try:
            stat = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC), tag=_file_tag(stat))

    def _walk(self, prefix: str) -> Iterator[tuple[str, Path]]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key, path

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        for key, path in self._walk(prefix):
            if _PARTIAL_MARK in path.name:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # deleted while we listed
            yield ObjectInfo(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC),
                             tag=_file_tag(stat))

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        validate_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Remove directories the deletion left empty, up to the root.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def incomplete_uploads(self, prefix: str = "") -> builtins.list[IncompleteUpload]:
        validate_prefix(prefix)
        found = []
        for key, path in self._walk(prefix):
            if _PARTIAL_MARK in path.name:
                try:
                    started = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                except FileNotFoundError:
                    continue
                found.append(IncompleteUpload(key, started, path.name))
        return found

    def abort_upload(self, upload: IncompleteUpload) -> None:
        (self.root / upload.key).unlink(missing_ok=True)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        # Written whole under a private name, then hard-linked into place: link() fails
        # when the name exists, so creation is exclusive and nobody reads a partial file.
        path = self._writable_path(key)
        partial = _partial_beside(path)
        try:
            _write_synced(partial, [data])
            os.link(partial, path)
        except FileExistsError:
            return False
        finally:
            partial.unlink(missing_ok=True)
        _sync_directory(path.parent)
        return True

    def get_tagged(self, key: str) -> tuple[bytes, str | None]:
        try:
            with open(self._path(key), "rb") as handle:
                # The open file is the version read, whatever is renamed over its name meanwhile.
                return handle.read(), _file_tag(os.fstat(handle.fileno()))
        except FileNotFoundError:
            raise NotFoundError(f"{key} is not in the repository") from None

    def put_if_tag(self, key: str, data: bytes, tag: str | None) -> bool:
        # Compare and replace under an exclusive lock on the directory: writers of the key
        # on this host (or sharing this file system's locks) take turns.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            try:
                current = _file_tag(path.stat())
            except FileNotFoundError:
                current = None
            if current != tag:
                return False
            write_atomically(path, [data])
            return True
        finally:
            os.close(dir_fd)  # releases the lock
