"""The one encoding of every byte stream pgdr stores, and its decoding.

Encode: a raw stream | zstd | [gpg --encrypt] -> counted, sha256, stored.
Decode: stored bytes -> [gpg --decrypt] | zstd -d -> the raw stream.

The raw stream is whatever feeds zstd's stdin: a producer's OS pipe (pg_dump,
pg_basebackup: the raw bytes never pass through Python), a file (an archived WAL
segment), or a thread of this process writing into it (a tar of files).

wal-push runs this once per WAL segment: it imports nothing heavy (no Prefect, boto3 or
psycopg) and nothing it does not need.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from pgdr.ops.errors import PgdrError
from pgdr.pipeline import crypto
from pgdr.pipeline.process import Pipeline, run_bytes
from pgdr.pipeline.watchdog import StallWatchdog, stall_seconds
from pgdr.storage.repository import READ_CHUNK, PutResult, Repository

Progress = Callable[[int, int], None]
"""Called about once a second with (bytes read so far, bytes written so far)."""

ZSTD_DECODE = ["zstd", "-d", "-q", "-c"]


def zstd_command(level: int, threads: int) -> list[str]:
    # With worker threads zstd holds back several MB per job; --single-thread streams each
    # block as soon as it is compressed (less memory, output that follows the input).
    workers = [f"-T{threads}"] if threads > 1 else ["--single-thread"]
    return ["zstd", f"-{level}", *workers, "-q", "-c"]


def encode_commands(encrypt_to: str | None, gpg_homedir: str | None, zstd_level: int,
                    zstd_threads: int) -> list[list[str]]:
    """zstd, then gpg when encrypting: the encoding of everything pgdr stores."""
    encode = [zstd_command(zstd_level, zstd_threads)]
    if encrypt_to:
        encode.append(crypto.encrypt_command(encrypt_to, gpg_homedir))
    return encode


def decode_commands(decrypt: list[str] | None) -> list[list[str]]:
    """The way back: gpg (its argv from crypto.decrypt_command) when encrypted, then zstd."""
    return ([decrypt] if decrypt else []) + [ZSTD_DECODE]


def encode_file(path: Path, encode: Sequence[Sequence[str]], *, secrets: Sequence[str] = ()) -> bytes:
    """A small file's encoded bytes, in memory. zstd reads the file itself: piping it
    through Python would cost more than compressing it."""
    try:
        source = open(path, "rb")  # noqa: SIM115 - held by the pipeline's first command
    except OSError as exc:
        raise PgdrError(f"cannot read {path}: {exc.strerror}") from None
    with source, Pipeline(encode, stdin=source, secrets=secrets) as pipeline:
        stored = pipeline.stdout.read()  # type: ignore[union-attr]
        pipeline.wait()
    return stored


def decode_bytes(stored: bytes, decode: Sequence[Sequence[str]], *, pass_fds: Sequence[int] = (),
                 secrets: Sequence[str] = ()) -> bytes:
    """Small stored bytes decoded in memory, one command after the other."""
    for argv in decode:
        stored = run_bytes(argv, input=stored, pass_fds=pass_fds, secrets=secrets)
    return stored


# A stream without a stall budget: one whose producer may rightly be silent for long
# (a base backup waiting for a spread checkpoint).
NO_STALL_BUDGET = math.inf


class Encoder:
    """The encoding commands reading `stdin` (a producer's stdout, or subprocess.PIPE to
    write into), under a stall watchdog; `store` hashes and stores their output. Use as a
    context manager: leaving it early kills the commands."""

    def __init__(self, encode: Sequence[Sequence[str]], *, stdin: IO[bytes] | int | None, what: str,
                 secrets: Sequence[str] = (), on_stall: Callable[[], None] | None = None,
                 stall_budget: float | None = None) -> None:
        self.encode = encode
        self.stdin = stdin
        self.what = what
        self.secrets = list(secrets)
        self.on_stall = on_stall
        self.stall_budget = stall_seconds() if stall_budget is None else stall_budget
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Encoder:
        with self._stack as stack:
            self.pipeline = stack.enter_context(Pipeline(self.encode, stdin=self.stdin, secrets=self.secrets))
            self.watchdog = stack.enter_context(StallWatchdog(self.what, self.stall_budget, self._stop))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)  # type: ignore[arg-type]

    def _stop(self) -> None:  # on a stall: end every process, so that every thread ends
        self.pipeline.kill()
        if self.on_stall:
            self.on_stall()

    def store(self, repo: Repository, key: str, *, raw_bytes: Callable[[], int],
              finish: Callable[[], None], waits_on: str, progress: Progress | None = None,
              storage_class: str | None = None, size_hint: int | None = None) -> PutResult:
        """Store the encoded stream at repo/key. `finish` waits for the producer and raises
        unless it succeeded; only then, and once every encoding command succeeded too, is
        the stream stored."""
        def finished() -> None:
            try:
                finish()
            except BaseException:
                self.watchdog.check()  # a stall explains why the producer was killed
                self.pipeline.wait()  # an encoder that failed first is the real cause
                raise
            self.pipeline.wait()
            self.watchdog.check()

        chunks = _stored_chunks(self.pipeline, raw_bytes, finished, progress, self.watchdog, waits_on)

        def put() -> PutResult:
            with self.watchdog.waiting("store"):
                return repo.put_stream(key, chunks, storage_class=storage_class, size_hint=size_hint)

        # In a thread the watchdog can abandon if the store stalls.
        return self.watchdog.run(put)


def _stored_chunks(encoder: Pipeline, raw_bytes: Callable[[], int], finish: Callable[[], None],
                   progress: Progress | None, watchdog: StallWatchdog, waits_on: str) -> Iterator[bytes]:
    """The encoder's output as it comes, to be hashed and stored: the one place where the
    bytes of a stream are counted (raw in, stored out) and progress reported; each read is
    a wait on `waits_on` for the stall watchdog. At the end of the stream, `finish` raises
    unless every producer succeeded: only then may the stream be stored."""
    written = 0
    last_report = time.monotonic()
    while True:
        with watchdog.waiting(waits_on):
            chunk = encoder.stdout.read1(READ_CHUNK)  # type: ignore[union-attr]
        if not chunk:
            break
        written += len(chunk)
        if progress and time.monotonic() - last_report >= 1.0:
            progress(raw_bytes(), written)
            last_report = time.monotonic()
        yield chunk
    finish()
    if progress:
        progress(raw_bytes(), written)


Feed = Callable[["_Feeder"], None]
"""Writes the raw bytes to encode and store (its argument has a `write` method)."""


def stream_encoded(
    feed: Feed,
    repo: Repository,
    key: str,
    *,
    encode: list[list[str]],
    what: str,
    on_broken: Callable[[], None] | None = None,
    storage_class: str | None = None,
    size_hint: int | None = None,
    secrets: list[str] | None = None,
    progress: Progress | None = None,
) -> tuple[PutResult, int]:
    """Run feed in a thread, writing into the encoder, and store the encoder's output at
    repo/key. Nothing is stored unless the feed and every encoder command succeeded.
    Returns what was stored and the number of raw bytes fed."""
    with Encoder(encode, stdin=subprocess.PIPE, what=what, secrets=secrets or [],
                 on_stall=on_broken) as encoder:
        feeder = _Feeder(feed, encoder.pipeline, what, on_broken, encoder.watchdog)
        feeder.start()

        def finish() -> None:
            feeder.join()
            if feeder.error:
                raise feeder.error

        stored = encoder.store(repo, key, raw_bytes=lambda: feeder.bytes, finish=finish, waits_on="encoder",
                               progress=progress, storage_class=storage_class, size_hint=size_hint)
    return stored, feeder.bytes


class _Feeder(threading.Thread):
    """Runs the feed into the encoder's stdin, counting its bytes; keeps its error for
    the end of the stream, where it stops the upload from completing."""

    def __init__(self, feed: Feed, sink: Pipeline, what: str,
                 on_broken: Callable[[], None] | None, watchdog: StallWatchdog) -> None:
        super().__init__(daemon=True)
        self.feed = feed
        self.sink = sink
        self.what = what
        self.on_broken = on_broken
        self.waiting = watchdog.waiting  # a feed marks its own waits: `with sink.waiting("database")`
        self.bytes = 0
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        with self.waiting("encoder"):
            self.sink.stdin.write(data)  # type: ignore[union-attr]
        self.bytes += len(data)
        return len(data)

    def run(self) -> None:
        try:
            self.feed(self)
        except (BrokenPipeError, ValueError):
            if self.on_broken:
                self.on_broken()
            self.error = PgdrError(f"the compressor stopped reading the {self.what}")
        except BaseException as exc:  # re-raised by the reader at the end of the stream
            self.error = exc
        finally:
            with contextlib.suppress(BrokenPipeError):
                self.sink.stdin.close()  # type: ignore[union-attr]
