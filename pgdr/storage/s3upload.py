"""S3 multipart uploads: how large each part is, and the threads that upload them."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pgdr.storage.repository import GiB, MiB

if TYPE_CHECKING:
    from pgdr.storage.s3repo import S3Repository

MIN_PART_SIZE = 8 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
# Parts uploaded at once by one S3 upload, and the most memory they may hold together.
UPLOAD_THREADS = 4
UPLOAD_BUFFER = 64 * MiB


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



class PartUploader:
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
