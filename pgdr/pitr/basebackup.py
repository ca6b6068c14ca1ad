"""Physical base backups for point-in-time recovery: where they are stored, their
manifest, finding one, and taking one.

`pg_basebackup -D - -Ft -X fetch | zstd | [gpg]` streams into
`<db>/base/<YYYY>/<MM>/<DD>/<id>/base.tar.zst[.gpg]`, and `manifest.json` beside it is
written last. Tar output to stdout carries one tablespace only (pg_basebackup refuses
more) and needs `-X fetch` or `-X none` (streaming WAL needs a second output file); with
`-X fetch` the backup holds the WAL it needs to become consistent, so it restores even
without the WAL archive.

The server's backup_manifest (the last member of the tar) is also stored apart, as
`backup_manifest.zst[.gpg]`, for the next incremental backup to start from (see
pgdr.pitr.incremental); pgdr.pitr.baserestore restores them.
"""


from __future__ import annotations

import contextlib
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from pgdr.catalog.catalog import MANIFEST, StoredManifest, database_component, dated_prefix
from pgdr.ops.errors import NotFoundError, PgdrError
from pgdr.pipeline.pipeline import NO_STALL_BUDGET, Encoder, encode_commands, stream_encoded
from pgdr.pipeline.process import Pipeline
from pgdr.pitr.wal import wal_file_name
from pgdr.postgres.postgres import libpq_env
from pgdr.postgres.programs import pg_bin
from pgdr.storage.repository import READ_CHUNK, PutResult, Repository

BASE_AREA = "base"
# The server's own manifest inside the tar, and the object it is stored apart as.
SERVER_MANIFEST = "backup_manifest"
FULL, INCREMENTAL = "full", "incremental"

_START = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
_END = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")


def base_prefix(database: str, backup_id: str) -> str:
    """`<database>/base/<YYYY>/<MM>/<DD>/<backup_id>` (no trailing slash)."""
    return dated_prefix(f"{database_component(database)}/{BASE_AREA}", backup_id, tiered=False)


@dataclass
class BaseManifest(StoredManifest):
    KIND: ClassVar[str] = "base backup manifest"

    backup_id: str
    database: str
    started_at: str
    finished_at: str
    start_lsn: str
    end_lsn: str
    timeline: int
    start_wal_file: str
    wal_segment_size: int
    server_version: str
    system_identifier: str
    tool_version: str
    compression: str
    encryption: dict[str, str] | None
    size_bytes: int
    sha256: str
    data_key: str
    source: str
    # full, or incremental: restoring it needs parent_backup_id and that one's chain back
    # to a full (manifests written before incrementals existed are full).
    kind: str = FULL
    parent_backup_id: str | None = None
    # Where the server's backup_manifest is stored apart: {"key", "size_bytes", "sha256"}.
    server_manifest: dict[str, Any] | None = None

    @property
    def prefix(self) -> str:
        return base_prefix(self.database, self.backup_id)


def list_base_backups(repo: Repository, database: str) -> list[BaseManifest]:
    """Every complete base backup of database (it has a manifest), oldest first."""
    found = [BaseManifest.read(repo, info.key)
             for info in repo.list(f"{database_component(database)}/{BASE_AREA}/")
             if info.key.endswith("/" + MANIFEST)]
    return sorted(found, key=lambda m: (m.finished_at, m.backup_id))


def find_base_backup(repo: Repository, database: str, backup_id: str) -> BaseManifest:
    key = f"{base_prefix(database, backup_id)}/{MANIFEST}"
    try:
        return BaseManifest.read(repo, key)
    except NotFoundError:
        raise NotFoundError(f"base backup {backup_id} of {database} not found in {repo.url}") from None


def lsn_value(lsn: str) -> int:
    high, _, low = lsn.partition("/")
    return int(high, 16) << 32 | int(low, 16)


def choose_base_backup(backups: list[BaseManifest], *, target_time: datetime | None = None,
                       target_lsn: str | None = None) -> BaseManifest:
    """The newest base backup that recovery can start from to reach the target: it must
    have finished (become consistent) before the target. No target: the newest."""
    usable = backups
    if target_time is not None:
        usable = [b for b in usable if b.finished <= target_time]
    if target_lsn is not None:
        usable = [b for b in usable if lsn_value(b.end_lsn) <= lsn_value(target_lsn)]
    if not usable:
        oldest = f" (the oldest finished {backups[0].finished_at})" if backups else ""
        raise NotFoundError(f"no base backup finished before the recovery target{oldest}")
    return usable[-1]


@dataclass(frozen=True)
class BaseBackupResult:
    stored: PutResult
    start_lsn: str
    end_lsn: str
    timeline: int
    server_manifest: bytes


class TarMemberCatcher:
    """Keeps the contents of one member of a tar stream that passes by in chunks (ustar
    headers: pg_basebackup writes no long-name extensions for its own top-level files)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.found: bytes | None = None
        self._pending = b""  # an incomplete header
        self._skip = 0  # bytes of the current member's data (and padding) still to pass
        self._keep: bytearray | None = None
        self._keep_size = 0
        self._ended = False

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view and not self._ended:
            if self._skip:
                taken = view[:self._skip]
                if self._keep is not None and len(self._keep) < self._keep_size:
                    self._keep += taken[:self._keep_size - len(self._keep)]
                self._skip -= len(taken)
                view = view[len(taken):]
                if not self._skip and self._keep is not None:
                    self.found, self._keep = bytes(self._keep), None
                continue
            need = 512 - len(self._pending)
            self._pending += bytes(view[:need])
            view = view[need:]
            if len(self._pending) == 512:
                self._header(self._pending)
                self._pending = b""

    def _header(self, block: bytes) -> None:
        if not block.strip(b"\0"):
            self._ended = True  # the end-of-archive marker
            return
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        size_field = block[124:136]
        if size_field[0] & 0x80:  # base-256 for members of 8 GiB and more
            size = int.from_bytes(size_field[1:], "big")
        else:
            size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        self._skip = (size + 511) // 512 * 512
        if name == self.name:
            self._keep, self._keep_size = bytearray(), size
            if not size:
                self.found, self._keep = b"", None


def stream_basebackup(
    db_url: str,
    repo: Repository,
    key: str,
    *,
    label: str,
    encrypt_to: str | None = None,
    gpg_homedir: str | None = None,
    fast_checkpoint: bool = True,
    zstd_level: int = 3,
    zstd_threads: int = 2,
    secrets: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
    bin_dir: Path | None = None,
    incremental_from: Path | None = None,
) -> BaseBackupResult:
    """Stream a base backup into repo/key; fails, storing nothing, if any step fails.
    `bin_dir`: the server's major version's programs (default: the newest installed);
    `incremental_from`: the parent's backup_manifest for an incremental backup.

    pg_basebackup's tar passes through this process on its way to zstd: its backup_manifest
    member is kept for the next incremental (the result's server_manifest)."""
    program = str(bin_dir / "pg_basebackup") if bin_dir else pg_bin("pg_basebackup")
    argv = [program, "-D", "-", "-Ft", "-X", "fetch", "--verbose", "--no-password",
            "--label", label, "--checkpoint", "fast" if fast_checkpoint else "spread"]
    if incremental_from is not None:
        argv.append(f"--incremental={incremental_from}")
    catcher = TarMemberCatcher(SERVER_MANIFEST)
    encode = encode_commands(encrypt_to, gpg_homedir, zstd_level, zstd_threads)
    # No stall budget: pg_basebackup is rightly silent while a spread checkpoint runs.
    with libpq_env(db_url) as env, Pipeline([argv], env=env, secrets=secrets or []) as backup, \
            Encoder(encode, stdin=subprocess.PIPE, what="base backup", secrets=secrets or [],
                    on_stall=backup.kill, stall_budget=NO_STALL_BUDGET) as encoder:
        pump = _Pump(backup, encoder.pipeline, catcher)
        pump.start()

        def finish() -> None:
            pump.join()
            backup.wait()
            if pump.error:
                raise pump.error

        stored = encoder.store(repo, key, raw_bytes=lambda: pump.bytes, finish=finish, waits_on="database",
                               progress=(lambda _raw, written: progress(written)) if progress else None)
    log = "\n".join(backup.stderr_lines(0))
    start, end = _START.search(log), _END.search(log)
    if not start or not end:
        raise PgdrError("pg_basebackup did not report its WAL start and end points")
    if catcher.found is None:
        raise PgdrError(f"pg_basebackup wrote no {SERVER_MANIFEST} into its tar")
    return BaseBackupResult(stored, start.group(1), end.group(1), int(start.group(2)), catcher.found)


class _Pump(threading.Thread):
    """Copies pg_basebackup's output into the encoder, showing each chunk to the catcher;
    on a failure it stops pg_basebackup and keeps the error for the end of the stream."""

    def __init__(self, source: Pipeline, sink: Pipeline, catcher: TarMemberCatcher) -> None:
        super().__init__(daemon=True)
        self.source, self.sink, self.catcher = source, sink, catcher
        self.bytes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while chunk := self.source.stdout.read1(READ_CHUNK):  # type: ignore[union-attr]
                self.catcher.feed(chunk)
                self.sink.stdin.write(chunk)  # type: ignore[union-attr]
                self.bytes += len(chunk)
        except BrokenPipeError:
            self.source.kill()
            self.error = PgdrError("the compressor stopped reading the base backup")
        except BaseException as exc:
            self.source.kill()
            self.error = exc
        finally:
            with contextlib.suppress(BrokenPipeError):
                self.sink.stdin.close()  # type: ignore[union-attr]


def store_server_manifest(repo: Repository, key: str, data: bytes, *, encrypt_to: str | None,
                          gpg_homedir: str | None, zstd_level: int,
                          secrets: list[str] | None) -> dict[str, Any]:
    """Store the server's backup_manifest encoded like the backup; where and what it is."""
    def feed(sink: Any) -> None:
        sink.write(data)

    stored, _ = stream_encoded(feed, repo, key,
                               encode=encode_commands(encrypt_to, gpg_homedir, zstd_level, 1),
                               what=SERVER_MANIFEST, secrets=secrets)
    return {"key": key, "size_bytes": stored.size, "sha256": stored.sha256}


def start_wal_file(result: BaseBackupResult, segment_size: int) -> str:
    return wal_file_name(result.timeline, result.start_lsn, segment_size)


class BaseBackupSummary(TypedDict):
    """A base backup in `--json` results (`basebackup`, `list`, `archive-status`)."""

    backup_id: str
    database: str
    finished_at: str
    start_lsn: str
    end_lsn: str
    timeline: int
    start_wal_file: str
    size_bytes: int
    sha256: str
    encrypted: bool
    kind: str
    parent_backup_id: str | None


def summary(manifest: BaseManifest) -> BaseBackupSummary:
    return {
        "backup_id": manifest.backup_id,
        "database": manifest.database,
        "finished_at": manifest.finished_at,
        "start_lsn": manifest.start_lsn,
        "end_lsn": manifest.end_lsn,
        "timeline": manifest.timeline,
        "start_wal_file": manifest.start_wal_file,
        "size_bytes": manifest.size_bytes,
        "sha256": manifest.sha256,
        "encrypted": manifest.encryption is not None,
        "kind": manifest.kind,
        "parent_backup_id": manifest.parent_backup_id,
    }
