"""The S3 repository: backups in a bucket under a prefix, through boto3 (imported lazily,
so that the WAL commands start without it)."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from pgdr.ops.errors import (
    IntegrityError,
    NotFoundError,
    PgdrError,
    TransientError,
    first_line,
    is_transient,
)
from pgdr.storage.repository import (
    ARCHIVE_CLASSES,
    ARCHIVED,
    READ_CHUNK,
    READABLE,
    RESTORING,
    GiB,
    IncompleteUpload,
    MiB,
    ObjectInfo,
    PutResult,
    Repository,
    hash_chunks,
    validate_key,
    validate_prefix,
)
from pgdr.storage.s3upload import PartUploader, base_part_size, part_size

# The range one stream of a parallel S3 download reads at a time.
DOWNLOAD_PART = 16 * MiB
# Above COPY_LIMIT (the most one CopyObject request copies), a server-side copy is a
# multipart copy in parts of COPY_PART_SIZE.
COPY_LIMIT = 5 * GiB
COPY_PART_SIZE = 512 * MiB
# The most keys one DeleteObjects request takes.
DELETE_BATCH = 1000


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
        uploader: PartUploader | None = None
        size = 0
        try:
            for chunk in hash_chunks(chunks, digest):
                buffer += chunk
                size += len(chunk)
                while len(buffer) >= part_size((uploader.parts if uploader else 0) + 1, base):
                    if uploader is None:
                        upload_id = self._s3(
                            "create_multipart_upload", Bucket=self.bucket, Key=full_key,
                            **self._write_args(storage_class),
                        )["UploadId"]
                        uploader = PartUploader(self, full_key, upload_id, base)
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
