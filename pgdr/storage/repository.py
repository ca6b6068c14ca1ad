"""Where backups live: one small interface, a local directory or S3 behind it.

A repository URL is `file:///path` or `s3://bucket/prefix`. Keys are relative paths
under that root; every key is validated so that no input can reach outside it.
Writes are atomic: a reader sees a whole object or none (a file is renamed into place,
an S3 multipart upload is completed or aborted).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import itertools
import os
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pgdr.ops.errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    PgdrError,
    TransientError,
    first_line,
    is_transient,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_PART_SIZE = 8 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
READ_CHUNK = 1 * MiB
# The range one stream of a parallel S3 download reads at a time.
DOWNLOAD_PART = 16 * MiB
# Parts uploaded at once by one S3 upload, and the most memory they may hold together.
UPLOAD_THREADS = 4
UPLOAD_BUFFER = 64 * MiB
# Above COPY_LIMIT (the most one CopyObject request copies), a server-side copy is a
# multipart copy in parts of COPY_PART_SIZE.
COPY_LIMIT = 5 * GiB
COPY_PART_SIZE = 512 * MiB
# The most keys one DeleteObjects request takes.
DELETE_BATCH = 1000
_PARTIAL_MARK = ".partial-"
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


def part_size(part_number: int, base: int = MIN_PART_SIZE) -> int:
    """Size of multipart part N (1-based): `base` up to part 9000, then doubling every
    100 parts (capped at 5 GiB) so that even an unexpectedly large stream — a 1 TB dump
    with no size hint — completes within S3's 10,000 parts."""
    if part_number <= 9000:
        return base
    doublings = (part_number - 9001) // 100 + 1
    return min(MAX_PART_SIZE, base << doublings)


def base_part_size(size_hint: int | None) -> int:
    """The first parts' size: big enough that size_hint fits in 9000 parts."""
    if not size_hint:
        return MIN_PART_SIZE
    needed = -(-size_hint // 9000)
    return min(MAX_PART_SIZE, max(MIN_PART_SIZE, -(-needed // MiB) * MiB))


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


def _chunks_of(chunks: Iterable[bytes], digest: Any) -> Iterator[bytes]:
    for chunk in chunks:
        if chunk:
            digest.update(chunk)
            yield chunk


# --- local directory ----------------------------------------------------------------------


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

    def put_stream(self, key: str, chunks: Iterable[bytes], *, storage_class: str | None = None,
                   size_hint: int | None = None) -> PutResult:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PgdrError(f"cannot write to repository {self.url}: {exc.strerror}") from None
        digest = hashlib.sha256()
        size = 0

        def counted() -> Iterator[bytes]:
            # Counted, not stat()ed afterwards: a concurrent delete of the key (a WAL push
            # that lost a race removing its copy) must not turn a completed write into an error.
            nonlocal size
            for chunk in _chunks_of(chunks, digest):
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
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
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


# --- S3 -------------------------------------------------------------------------------------


class S3Repository(Repository):
    """boto3 with the standard configuration chain (AWS_ENDPOINT_URL, profiles, roles)."""

    def __init__(self, bucket: str, prefix: str, *, sse: str = "AES256",
                 kms_key_id: str | None = None, region: str | None = None,
                 client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.client = client or s3_client(region)

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1:] if self.prefix else full_key

    def _write_args(self, storage_class: str | None) -> dict[str, Any]:
        args: dict[str, Any] = {"ServerSideEncryption": self.sse}
        if self.sse == "aws:kms" and self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        if storage_class and storage_class != "STANDARD":
            args["StorageClass"] = storage_class
        return args

    def put_stream(self, key: str, chunks: Iterable[bytes], *, storage_class: str | None = None,
                   size_hint: int | None = None) -> PutResult:
        full_key = self._key(key)
        digest = hashlib.sha256()
        base = base_part_size(size_hint)
        buffer = bytearray()
        uploader: _PartUploader | None = None
        size = 0
        try:
            for chunk in _chunks_of(chunks, digest):
                buffer += chunk
                size += len(chunk)
                while len(buffer) >= part_size((uploader.parts if uploader else 0) + 1, base):
                    if uploader is None:
                        upload_id = self._s3(
                            "create_multipart_upload", Bucket=self.bucket, Key=full_key,
                            **self._write_args(storage_class),
                        )["UploadId"]
                        uploader = _PartUploader(self, full_key, upload_id, base)
                    uploader.submit(buffer, part_size(uploader.parts + 1, base))
            if uploader is None:
                self._s3("put_object", Bucket=self.bucket, Key=full_key, Body=bytes(buffer),
                         **self._write_args(storage_class))
            else:
                if buffer:
                    uploader.submit(buffer, len(buffer))
                self._s3("complete_multipart_upload", Bucket=self.bucket, Key=full_key,
                         UploadId=uploader.upload_id, MultipartUpload={"Parts": uploader.finish()})
                uploader = None
        except BaseException:
            if uploader is not None:
                uploader.cancel()
                self._abort(full_key, uploader.upload_id)
            raise
        stored = self.head(key)
        if stored is None or stored.size != size:
            raise IntegrityError(f"{key}: S3 reports {stored.size if stored else 'no'} bytes "
                                 f"after an upload of {size}")
        return PutResult(key, size, digest.hexdigest())

    def _upload_part(self, full_key: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
        response = self._s3("upload_part", Bucket=self.bucket, Key=full_key, UploadId=upload_id,
                            PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _abort(self, full_key: str, upload_id: str) -> None:
        # Best effort: prune aborts stale uploads that this could not.
        with contextlib.suppress(Exception):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)

    def _s3(self, operation: str, *, tolerate: tuple[str, ...] = (), **kwargs: Any) -> Any:
        """Call the S3 operation; errors become one-line PgdrErrors (None for `tolerate`d codes)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            if code in tolerate:
                return None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFoundError(f"{self._rel(kwargs.get('Key', ''))} is not in the repository") from None
            if code == "NoSuchBucket":
                raise PgdrError(f"bucket {self.bucket} does not exist") from None
            message = f"S3 {operation} failed: {code} {error.get('Message', '')}".strip()
            raise _s3_error(exc, message) from None
        except BotoCoreError as exc:
            raise _s3_error(exc, f"S3 {operation} failed: {exc}") from None

    def get_stream(self, key: str) -> Iterator[bytes]:
        full_key = self._key(key)
        # Resolve "absent" before the caller starts consuming.
        response = self._s3("get_object", Bucket=self.bucket, Key=full_key)
        return self._read(full_key, response)

    def _read(self, full_key: str, response: dict[str, Any]) -> Iterator[bytes]:
        """Stream the body; on a dropped connection, resume from the last byte received."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        total = int(response["ContentLength"])
        etag = response.get("ETag")
        offset = 0
        resumes = 0
        while True:
            try:
                for chunk in response["Body"].iter_chunks(READ_CHUNK):
                    offset += len(chunk)
                    yield chunk
                if offset >= total:
                    return
                raise PgdrError("connection closed early")
            except (BotoCoreError, HTTPError, PgdrError, OSError):
                resumes += 1
                if resumes > 5:
                    raise TransientError(
                        f"reading {self._rel(full_key)} failed after {offset} bytes") from None
                response = self._s3("get_object", Bucket=self.bucket, Key=full_key,
                                     Range=f"bytes={offset}-", IfMatch=etag)

    def get_stream_parallel(self, key: str, streams: int) -> Iterator[bytes]:
        if streams <= 1:
            return self.get_stream(key)
        full_key = self._key(key)
        head = self._s3("head_object", Bucket=self.bucket, Key=full_key)
        size = int(head["ContentLength"])
        if size <= DOWNLOAD_PART:
            return self.get_stream(key)
        return self._read_ranges(full_key, size, head["ETag"], streams)

    def _get_range(self, full_key: str, start: int, end: int, etag: str) -> bytes:
        """Bytes start..end (inclusive) of this very version (If-Match: a replaced object fails)."""
        for _ in range(3):
            response = self._s3("get_object", Bucket=self.bucket, Key=full_key, Range=f"bytes={start}-{end}",
                                IfMatch=etag)
            try:
                data: bytes = response["Body"].read()
            except Exception:  # noqa: S112 - a dropped connection: read the range again
                continue
            if len(data) == end - start + 1:
                return data
        raise PgdrError(f"reading {self._rel(full_key)} failed at bytes {start}-{end}")

    def _read_ranges(self, full_key: str, size: int, etag: str, streams: int) -> Iterator[bytes]:
        """Ranges of DOWNLOAD_PART on `streams` threads, yielded in order; at most `streams`
        parts in memory."""
        starts = iter(range(0, size, DOWNLOAD_PART))
        pool = ThreadPoolExecutor(streams, thread_name_prefix="s3-get")

        def fetch(start: int) -> Future[bytes]:
            return pool.submit(self._get_range, full_key, start, min(size, start + DOWNLOAD_PART) - 1, etag)

        try:
            window = deque(fetch(start) for start in itertools.islice(starts, streams))
            while window:
                data = window.popleft().result()
                following = next(starts, None)
                if following is not None:
                    window.append(fetch(following))
                yield data
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            response = self._s3("head_object", Bucket=self.bucket, Key=self._key(key))
        except NotFoundError:
            return None
        return ObjectInfo(key, int(response["ContentLength"]), response["LastModified"],
                          response.get("StorageClass", "STANDARD"), response.get("ETag"))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield ObjectInfo(self._rel(item["Key"]), int(item["Size"]), item["LastModified"],
                                     item.get("StorageClass"), item.get("ETag"))
        except Exception as exc:
            raise _s3_error(exc, f"cannot list {self.url}: {first_line(exc)}") from None

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        validate_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full, Delimiter="/")
        names = []
        try:
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    names.append(common["Prefix"][len(full):].rstrip("/"))
        except Exception as exc:
            raise _s3_error(exc, f"cannot list {self.url}: {first_line(exc)}") from None
        return sorted(names)

    def delete(self, key: str) -> None:
        self._s3("delete_object", Bucket=self.bucket, Key=self._key(key))

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """DeleteObjects, DELETE_BATCH keys a request; S3 reports a failure per key."""
        full_keys = {self._key(key): key for key in keys}
        ordered = list(full_keys)
        failed: dict[str, str] = {}
        for batch in (ordered[start:start + DELETE_BATCH] for start in range(0, len(ordered), DELETE_BATCH)):
            try:
                response = self._s3("delete_objects", Bucket=self.bucket,
                                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True})
            except PgdrError as exc:
                failed.update(dict.fromkeys((full_keys[key] for key in batch), str(exc)))
                continue
            for error in response.get("Errors", []):
                why = f"S3 delete_objects failed: {error.get('Code', '')} {error.get('Message', '')}"
                failed[full_keys.get(error["Key"], self._rel(error["Key"]))] = why.strip()
        return failed

    def copy(self, src_key: str, dst_key: str, *, storage_class: str | None = None) -> None:
        """Server-side: the bytes never pass through this machine."""
        self.copy_object((self.bucket, self._key(src_key)), (self.bucket, self._key(dst_key)),
                         storage_class=storage_class)

    def copy_object(self, source: tuple[str, str], dest: tuple[str, str], *, etag: str | None = None,
                    storage_class: str | None = None, source_client: Any = None,
                    limit: int = COPY_LIMIT, part_size: int = COPY_PART_SIZE) -> None:
        """Server-side copy of (bucket, full key) to (bucket, full key) with s3transfer's managed
        copy: one CopyObject up to `limit`, else a multipart copy in parts of `part_size`
        (metadata and content type carried over, aborted on failure). With an ETag, exactly
        that version is copied: an object replaced meanwhile fails the copy rather than
        mixing versions. Objects written into this repository's bucket get its encryption
        and the storage class; elsewhere (a restore into a user's bucket) the bucket's defaults."""
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        (src_bucket, src_key), (dst_bucket, dst_key) = source, dest
        extra: dict[str, Any] = self._write_args(storage_class) if dst_bucket == self.bucket else {}
        if etag:
            extra["CopySourceIfMatch"] = etag
        config = TransferConfig(multipart_threshold=limit, multipart_chunksize=part_size)
        try:
            self.client.copy({"Bucket": src_bucket, "Key": src_key}, dst_bucket, dst_key, ExtraArgs=extra,
                             SourceClient=source_client or self.client, Config=config)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, f"copying s3://{src_bucket}/{src_key} failed: {first_line(exc)}") from None

    def incomplete_uploads(self, prefix: str = "") -> builtins.list[IncompleteUpload]:
        validate_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=full)
        found = []
        for page in pages:
            for upload in page.get("Uploads", []):
                found.append(IncompleteUpload(self._rel(upload["Key"]), upload["Initiated"],
                                              upload["UploadId"]))
        return found

    def abort_upload(self, upload: IncompleteUpload) -> None:
        self._s3("abort_multipart_upload", Bucket=self.bucket, Key=self._key(upload.key),
                 UploadId=upload.upload_id)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        # 412: the object exists; 409: a concurrent conditional write won the race.
        response = self._s3("put_object", tolerate=("PreconditionFailed", "ConditionalRequestConflict"),
                            Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*",
                            **self._write_args(None))
        return response is not None

    def get_tagged(self, key: str) -> tuple[bytes, str | None]:
        response = self._s3("get_object", Bucket=self.bucket, Key=self._key(key))
        return b"".join(self._read(self._key(key), response)), response.get("ETag")

    def put_if_tag(self, key: str, data: bytes, tag: str | None) -> bool:
        # 412: another version is there now; 409: a concurrent conditional write won the
        # race; 404: the version was deleted meanwhile.
        condition = {"IfMatch": tag} if tag else {"IfNoneMatch": "*"}
        try:
            response = self._s3("put_object", tolerate=("PreconditionFailed", "ConditionalRequestConflict"),
                                Bucket=self.bucket, Key=self._key(key), Body=data, **condition,
                                **self._write_args(None))
        except NotFoundError:
            return False
        return response is not None

    def copy_from(self, source: S3Repository, key: str, *, storage_class: str | None = None) -> None:
        """Server-side copy of source's key to the same key here: the bytes never pass
        through this machine."""
        self.copy_object((source.bucket, source._key(key)), (self.bucket, self._key(key)),
                         storage_class=storage_class, source_client=source.client)

    def archive_state(self, key: str) -> tuple[str | None, str]:
        response = self._s3("head_object", Bucket=self.bucket, Key=self._key(key))
        storage_class = response.get("StorageClass", "STANDARD")
        restore = response.get("Restore") or ""
        if storage_class not in ARCHIVE_CLASSES or 'ongoing-request="false"' in restore:
            return storage_class, READABLE
        return storage_class, RESTORING if 'ongoing-request="true"' in restore else ARCHIVED

    def request_restore(self, key: str, days: int) -> None:
        self._s3("restore_object", tolerate=("RestoreAlreadyInProgress",), Bucket=self.bucket,
                 Key=self._key(key),
                 RestoreRequest={"Days": days, "GlacierJobParameters": {"Tier": "Standard"}})

    def lock_status(self, key: str) -> str | None:
        # A plain delete in a versioned bucket only adds a delete marker and "succeeds"
        # while the locked version stays: ask before deleting instead.
        try:
            head = self._s3("head_object", Bucket=self.bucket, Key=self._key(key))
        except NotFoundError:
            return None
        if head.get("ObjectLockLegalHoldStatus") == "ON":
            return "legal hold"
        until = head.get("ObjectLockRetainUntilDate")
        if until and until > datetime.now(UTC):
            return f"{head.get('ObjectLockMode', 'locked')} until {until.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
        return None


class _PartUploader:
    """Uploads the parts of one multipart upload on a few threads while the next part is
    being read, so the dump does not wait for the network. Parts in flight are bounded
    (UPLOAD_THREADS, fewer for large parts) so memory stays bounded at any size."""

    def __init__(self, repo: S3Repository, full_key: str, upload_id: str, base_part: int) -> None:
        self.repo = repo
        self.full_key = full_key
        self.upload_id = upload_id
        self.parts = 0
        threads = max(1, min(UPLOAD_THREADS, UPLOAD_BUFFER // base_part))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="s3-part")
        self._slots = threading.BoundedSemaphore(threads)
        self._pending: list[Future[dict[str, Any]]] = []
        self._failure: BaseException | None = None

    def submit(self, buffer: bytearray, take: int) -> None:
        """Move the first `take` bytes of buffer into the next part; blocks while every
        thread is busy, and raises the first failure of an earlier part."""
        self._slots.acquire()
        if self._failure is not None:
            self._slots.release()
            raise self._failure
        body = bytes(buffer[:take])
        del buffer[:take]
        self.parts += 1
        future = self._pool.submit(self.repo._upload_part, self.full_key, self.upload_id, self.parts, body)
        future.add_done_callback(self._done)
        self._pending.append(future)

    def _done(self, future: Future[dict[str, Any]]) -> None:
        if not future.cancelled() and future.exception() is not None and self._failure is None:
            self._failure = future.exception()
        self._slots.release()

    def finish(self) -> list[dict[str, Any]]:
        """Every part's number and ETag, in order, once all are uploaded."""
        try:
            return [future.result() for future in self._pending]
        finally:
            self._pool.shutdown(wait=True)

    def cancel(self) -> None:
        """Drop queued parts and wait for running ones, so that the abort comes last."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _s3_error(exc: BaseException, message: str) -> PgdrError:
    """The one-line error for a failed S3 call: a TransientError when another try may
    succeed (5xx, throttling, a dropped or timed-out connection), else permanent."""
    return TransientError(message) if is_transient(exc) else PgdrError(message)


# Functions called with every new S3 client: how tests inject faults through botocore's
# event hooks (client.meta.events), and where an operator could add instrumentation.
S3_CLIENT_HOOKS: list[Callable[[Any], None]] = []


def s3_client(region: str | None = None) -> Any:
    """A boto3 S3 client (pgdr.storage.aws.client) with the S3 hooks."""
    from pgdr.storage import aws

    return aws.client("s3", region, hooks=S3_CLIENT_HOOKS)


def open_repository(url: str, *, sse: str = "AES256", kms_key_id: str | None = None,
                    region: str | None = None) -> Repository:
    """The repository a URL names: file:///path or s3://bucket[/prefix]."""
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
