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
import time
from dataclasses import dataclass
from pathlib import Path

from pgdr.ops.errors import IntegrityError
from pgdr.pipeline import crypto
from pgdr.pipeline.pipeline import Encoder, Progress, decode_commands, encode_commands
from pgdr.pipeline.process import Pipeline
from pgdr.pipeline.watchdog import StallWatchdog, stall_seconds
from pgdr.postgres.postgres import libpq_env
from pgdr.postgres.programs import pg_bin
from pgdr.storage.repository import PutResult, Repository


@dataclass(frozen=True)
class DumpResult:
    stored: PutResult
    dump_bytes: int


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
    with libpq_env(db_url) as env, \
            Pipeline([dump_argv], env=env, secrets=secrets or []) as dump, \
            Encoder(encode, stdin=dump.stdout, what="dump", secrets=secrets or [],
                    on_stall=dump.kill) as encoder:
        # zstd alone holds the read end: if it stops, pg_dump gets a broken pipe, not a hang.
        dump.stdout.close()  # type: ignore[union-attr]
        dumped = 0

        def finish() -> None:
            nonlocal dumped
            dumped = dump.bytes_written(0, final=True) or 0
            dump.wait()

        stored = encoder.store(repo, key, raw_bytes=lambda: dump.bytes_written(0) or 0, finish=finish,
                               waits_on="database", progress=progress, storage_class=storage_class,
                               size_hint=size_hint)
    return DumpResult(stored, dumped)


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
            commands = decode_commands(gpg_argv if encrypted else None)
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
