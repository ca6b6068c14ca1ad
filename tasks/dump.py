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
from tasks.process import Pipeline
from tasks.repository import READ_CHUNK, PutResult, Repository

Progress = Callable[[int, int], None]
"""Called about once a second with (bytes read so far, bytes written so far)."""


@dataclass(frozen=True)
class DumpResult:
    stored: PutResult
    dump_bytes: int


def zstd_command(level: int, threads: int) -> list[str]:
    return ["zstd", f"-{level}", f"-T{threads}", "-q", "-c"]


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
) -> DumpResult:
    """Dump the database into repo/key; fails (and stores nothing) if any step fails."""
    dump_argv = [pg_bin("pg_dump"), "--format=custom", "--compress=0", "--no-password"]
    if snapshot:
        dump_argv.append(f"--snapshot={snapshot}")
    encode = [zstd_command(zstd_level, zstd_threads)]
    if encrypt_to:
        encode.append(crypto.encrypt_command(encrypt_to, gpg_homedir))
    with libpq_env(db_url) as env, \
            Pipeline([dump_argv], env=env, secrets=secrets or []) as dump, \
            Pipeline(encode, stdin=subprocess.PIPE, secrets=secrets or []) as encoder:
        counter = _Relay(dump, encoder)
        counter.start()

        def stored_bytes() -> Iterator[bytes]:
            written = 0
            last_report = time.monotonic()
            while chunk := encoder.stdout.read1(READ_CHUNK):  # type: ignore[union-attr]
                written += len(chunk)
                if progress and time.monotonic() - last_report >= 1.0:
                    progress(counter.bytes, written)
                    last_report = time.monotonic()
                yield chunk
            # End of stream: only a stream whose every producer succeeded may be stored.
            counter.join()
            dump.wait()
            encoder.wait()
            if counter.error:
                raise counter.error
            if progress:
                progress(counter.bytes, written)

        stored = repo.put_stream(key, stored_bytes(), storage_class=storage_class,
                                 size_hint=size_hint)
    return DumpResult(stored, counter.bytes)


class _Relay(threading.Thread):
    """Copies pg_dump's output into the encoder, counting the dump's bytes."""

    def __init__(self, source: Pipeline, sink: Pipeline) -> None:
        super().__init__(daemon=True)
        self.source = source
        self.sink = sink
        self.bytes = 0
        self.error: PgdrError | None = None

    def run(self) -> None:
        reader, writer = self.source.stdout, self.sink.stdin
        try:
            while chunk := reader.read1(READ_CHUNK):  # type: ignore[union-attr]
                writer.write(chunk)  # type: ignore[union-attr]
                self.bytes += len(chunk)
        except (BrokenPipeError, ValueError):
            self.source.kill()
            self.error = PgdrError("the compressor stopped reading the dump")
        finally:
            with contextlib.suppress(BrokenPipeError):
                writer.close()  # type: ignore[union-attr]


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
) -> int:
    """Decode the stored dump into destination; IntegrityError (and no file left) unless
    the stored bytes match size and sha256. Returns the decoded size."""
    digest = hashlib.sha256()
    received = 0
    try:
        with crypto.decrypt_command(gpg_homedir, passphrase) as (gpg_argv, fds), \
                open(destination, "wb") as out:
            commands = ([gpg_argv] if encrypted else []) + [["zstd", "-d", "-q", "-c"]]
            with Pipeline(commands, stdin=subprocess.PIPE, stdout=out, pass_fds=fds,
                          secrets=(secrets or []) + ([passphrase] if passphrase else [])) as decode:
                last_report = time.monotonic()
                broken = False
                for chunk in repo.get_stream(key):
                    digest.update(chunk)
                    received += len(chunk)
                    if not broken:
                        try:
                            decode.stdin.write(chunk)  # type: ignore[union-attr]
                        except BrokenPipeError:
                            broken = True  # keep reading: the checksum says why
                    if progress and time.monotonic() - last_report >= 1.0:
                        progress(received, destination.stat().st_size)
                        last_report = time.monotonic()
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
