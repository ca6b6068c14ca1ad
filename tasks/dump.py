"""The byte pipelines of a backup and of a restore.

Backup:  pg_dump -Fc -Z0 --snapshot | zstd | [gpg --encrypt] -> sha256 -> repository.
Restore: repository -> sha256 -> [gpg --decrypt] | zstd -d -> one local file.

Nothing is staged on the way up (no "disk full" during a backup). On the way down the
one local file is what pg_restore -j needs; it is only handed over once the checksum of
the stored bytes matched, and it is removed on any failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks import crypto
from tasks.errors import IntegrityError, PgdrError
from tasks.postgres import libpq_env, pg_bin
from tasks.process import CommandError, Pipeline
from tasks.repository import READ_CHUNK, PutResult, Repository
from tasks.watchdog import StallWatchdog, stall_seconds

Progress = Callable[[int, int], None]
"""Called about once a second with (bytes read so far, bytes written so far)."""


@dataclass(frozen=True)
class DumpResult:
    stored: PutResult
    dump_bytes: int


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
    def stop() -> None:  # on a stall: end every process, so that every thread ends
        encoder.kill()
        if on_broken:
            on_broken()

    with Pipeline(encode, stdin=subprocess.PIPE, secrets=secrets or []) as encoder, \
            StallWatchdog(what, stall_seconds(), stop) as watchdog:
        feeder = _Feeder(feed, encoder, what, on_broken, watchdog)
        feeder.start()

        def finish() -> None:
            feeder.join()
            encoder.wait()
            watchdog.check()
            if feeder.error:
                raise feeder.error

        stored = _store(repo, key, _stored_chunks(encoder, lambda: feeder.bytes, finish, progress,
                                                  watchdog, "encoder"),
                        watchdog, storage_class, size_hint)
    return stored, feeder.bytes


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


def _store(repo: Repository, key: str, chunks: Iterator[bytes], watchdog: StallWatchdog,
           storage_class: str | None, size_hint: int | None) -> PutResult:
    """repo.put_stream in a thread the watchdog can abandon if the store stalls."""
    def store() -> PutResult:
        with watchdog.waiting("store"):
            return repo.put_stream(key, chunks, storage_class=storage_class, size_hint=size_hint)

    return watchdog.run(store)


def stream_dump(
    db_url: str,
    repo: Repository,
    key: str,
    *,
    snapshot: str | None,
    encrypt_to: str | None = None,
    gpg_homedir: str | None = None,
    storage_class: str | None = None,
    size_hint: int | None = None,
    zstd_level: int = 3,
    zstd_threads: int = 2,
    secrets: list[str] | None = None,
    progress: Progress | None = None,
    server_major: int | None = None,
) -> DumpResult:
    """Dump the database into repo/key; fails (and stores nothing) if any step fails.
    pg_dump is the one of the server's major version (pg_bin).

    pg_dump writes into zstd through an OS pipe: the raw archive never passes through
    Python, which only hashes and stores the encoded bytes. The raw size is what the
    kernel counted pg_dump writing. Waiting for zstd's output is waiting for the database:
    zstd only stops when pg_dump does."""
    dump_argv = [pg_bin("pg_dump", server_major), "--format=custom", "--compress=0", "--no-password"]
    if snapshot:
        dump_argv.append(f"--snapshot={snapshot}")
    encode = encode_commands(encrypt_to, gpg_homedir, zstd_level, zstd_threads)

    def stop() -> None:  # on a stall: end every process, so that every thread ends
        dump.kill()
        encoder.kill()

    with libpq_env(db_url) as env, \
            Pipeline([dump_argv], env=env, secrets=secrets or []) as dump, \
            Pipeline(encode, stdin=dump.stdout, secrets=secrets or []) as encoder, \
            StallWatchdog("dump", stall_seconds(), stop) as watchdog:
        # zstd alone holds the read end: if it stops, pg_dump gets a broken pipe, not a hang.
        dump.stdout.close()  # type: ignore[union-attr]
        dumped = 0

        def raw_bytes() -> int:
            return dump.bytes_written(0) or 0

        def finish() -> None:
            nonlocal dumped
            dumped = dump.bytes_written(0, final=True) or 0
            try:
                dump.wait()
            except CommandError:
                watchdog.check()  # a stall explains why pg_dump was killed
                encoder.wait()  # an encoder that failed first is the real cause
                raise
            encoder.wait()
            watchdog.check()

        stored = _store(repo, key, _stored_chunks(encoder, raw_bytes, finish, progress, watchdog, "database"),
                        watchdog, storage_class, size_hint)
    return DumpResult(stored, dumped)


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


def fetch_dump(
    repo: Repository,
    key: str,
    destination: Path,
    *,
    size: int,
    sha256: str,
    encrypted: bool,
    gpg_homedir: str | None = None,
    passphrase: str | None = None,
    secrets: list[str] | None = None,
    progress: Progress | None = None,
    streams: int = 1,
) -> int:
    """Decode the stored dump into destination; IntegrityError (and no file left) unless
    the stored bytes match size and sha256. Returns the decoded size. `streams` > 1
    downloads in that many parallel streams where the repository gains from it."""
    digest = hashlib.sha256()
    received = 0
    try:
        with crypto.decrypt_command(gpg_homedir, passphrase) as (gpg_argv, fds), \
                open(destination, "wb") as out:
            commands = ([gpg_argv] if encrypted else []) + [["zstd", "-d", "-q", "-c"]]
            with Pipeline(commands, stdin=subprocess.PIPE, stdout=out, pass_fds=fds,
                          secrets=(secrets or []) + ([passphrase] if passphrase else [])) as decode, \
                    StallWatchdog("download", stall_seconds(), decode.kill) as watchdog:

                def receive() -> None:
                    nonlocal received
                    last_report = time.monotonic()
                    broken = False
                    chunks = iter(repo.get_stream_parallel(key, streams))
                    while True:
                        with watchdog.waiting("store"):
                            chunk = next(chunks, None)
                        if chunk is None:
                            break
                        digest.update(chunk)
                        received += len(chunk)
                        if not broken:
                            try:
                                with watchdog.waiting("encoder"):
                                    decode.stdin.write(chunk)  # type: ignore[union-attr]
                            except BrokenPipeError:
                                broken = True  # keep reading: the checksum says why
                        if progress and time.monotonic() - last_report >= 1.0:
                            progress(received, destination.stat().st_size)
                            last_report = time.monotonic()

                watchdog.run(receive)
                with contextlib.suppress(BrokenPipeError):
                    decode.stdin.close()  # type: ignore[union-attr]
                if received != size or digest.hexdigest() != sha256:
                    decode.kill()
                    raise IntegrityError(
                        f"{key} is corrupt: expected {size} bytes with sha256 {sha256[:12]}…, "
                        f"got {received} bytes with sha256 {digest.hexdigest()[:12]}…"
                    )
                decode.wait()
                out.flush()
        return destination.stat().st_size
    except BaseException:
        destination.unlink(missing_ok=True)
        raise
