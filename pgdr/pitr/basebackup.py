"""Physical base backups for point-in-time recovery, and restoring them.

`pg_basebackup -D - -Ft -X fetch | zstd | [gpg]` streams into
`<db>/base/<YYYY>/<MM>/<DD>/<id>/base.tar.zst[.gpg]`, and `manifest.json` beside it is
written last. Tar output to stdout carries one tablespace only (pg_basebackup refuses
more) and needs `-X fetch` or `-X none` (streaming WAL needs a second output file); with
`-X fetch` the backup holds the WAL it needs to become consistent, so it restores even
without the WAL archive.

PostgreSQL 17 and newer also take incremental backups (`pg_basebackup --incremental=<the
previous backup's backup_manifest>`): only the blocks changed since that backup, found in
the server's WAL summaries (`summarize_wal = on`). The server's backup_manifest (the last
member of the tar) is therefore also stored apart, as `backup_manifest.zst[.gpg]`, for the
next incremental to start from. Restoring an incremental needs its whole chain back to a
full backup: each link is unpacked and `pg_combinebackup` rebuilds a full data directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from pgdr.catalog.catalog import MANIFEST, StoredManifest, database_component, dated_prefix
from pgdr.ops.errors import ConfigError, IntegrityError, NotFoundError, PgdrError
from pgdr.pipeline.dump import fetch_dump
from pgdr.pipeline.pipeline import NO_STALL_BUDGET, Encoder, encode_commands, stream_encoded
from pgdr.pipeline.process import Pipeline
from pgdr.pitr.wal import wal_file_name
from pgdr.postgres.postgres import libpq_env
from pgdr.postgres.programs import pg_bin
from pgdr.storage.repository import READ_CHUNK, PutResult, Repository

BASE_AREA = "base"
# Parallel streams downloading a base backup from S3: the fast way back is network-bound.
DOWNLOAD_STREAMS = 4
# The server's own manifest inside the tar, and the object it is stored apart as.
SERVER_MANIFEST = "backup_manifest"
FULL, INCREMENTAL = "full", "incremental"
KINDS = ("auto", FULL, INCREMENTAL)
# The default policy: a full backup when the newest chain's full is older than this.
FULL_EVERY = timedelta(days=7)

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


def backup_chain(backups: Iterable[BaseManifest], chosen: BaseManifest) -> list[BaseManifest]:
    """The backups that restoring `chosen` needs, full first: itself if full, else its
    parents back to a full. IntegrityError naming the broken link when a parent is missing
    or is not of the same server."""
    by_id = {b.backup_id: b for b in backups}
    chain = [chosen]
    while chain[0].kind == INCREMENTAL:
        child = chain[0]
        parent = by_id.get(child.parent_backup_id or "")
        if parent is None:
            raise IntegrityError(f"the backup chain of {chosen.backup_id} is broken: {child.backup_id} is "
                                 f"incremental on {child.parent_backup_id}, which is not in the repository")
        if parent.system_identifier != child.system_identifier or parent in chain:
            raise IntegrityError(f"the backup chain of {chosen.backup_id} is broken: parent "
                                 f"{parent.backup_id} of {child.backup_id} is not of the same server")
        chain.insert(0, parent)
    if chain[0].kind != FULL:
        raise IntegrityError(f"the backup chain of {chosen.backup_id} starts with {chain[0].backup_id}, "
                             f"of unknown kind {chain[0].kind!r}")
    return chain


@dataclass(frozen=True)
class KindPlan:
    """What the next base backup is: FULL, or INCREMENTAL on `parent`; `note` says why and
    `warning` is set when an incremental was wanted but cannot be taken."""

    kind: str
    parent: BaseManifest | None
    note: str
    warning: str | None = None


def plan_backup_kind(requested: str, backups: list[BaseManifest], *, server_major: int, summarize_wal: bool,
                     system_identifier: str, timeline: int, now: datetime,
                     full_every: timedelta = FULL_EVERY) -> KindPlan:
    """The default policy (requested "auto"): incremental on the newest base backup of the
    same server when PostgreSQL is 17 or newer, summarize_wal is on, that backup's chain is
    whole, its full finished less than `full_every` ago, and it is on the same timeline;
    otherwise full. "full" forces a full backup; "incremental" forces an incremental and
    raises ConfigError when one cannot be taken."""
    if requested not in KINDS:
        raise ConfigError(f"unknown backup kind {requested!r}: choose one of {', '.join(KINDS)}")
    if requested == FULL:
        return KindPlan(FULL, None, "a full backup was asked for")
    reason = _no_incremental_because(backups, server_major=server_major, summarize_wal=summarize_wal,
                                     system_identifier=system_identifier, timeline=timeline, now=now,
                                     full_every=full_every)
    if isinstance(reason, BaseManifest):
        return KindPlan(INCREMENTAL, reason, f"incremental on {reason.backup_id}")
    if requested == INCREMENTAL:
        raise ConfigError(f"an incremental base backup cannot be taken: {reason}")
    warned = reason.startswith("summarize_wal is off")
    return KindPlan(FULL, None, reason, reason + ": taking a full backup instead" if warned else None)


def _no_incremental_because(backups: list[BaseManifest], *, server_major: int, summarize_wal: bool,
                            system_identifier: str, timeline: int, now: datetime,
                            full_every: timedelta) -> BaseManifest | str:
    """The parent of the next incremental, or why there is none."""
    if server_major < 17:
        return f"PostgreSQL {server_major} has no incremental backups (17 and newer have)"
    if not summarize_wal:
        return "summarize_wal is off on the server (incremental backups need it on)"
    mine = [b for b in backups if b.system_identifier == system_identifier]
    if not mine:
        return "no earlier base backup of this server"
    parent = max(mine, key=lambda b: (b.finished_at, b.backup_id))
    if parent.server_manifest is None:
        return f"the newest base backup {parent.backup_id} has no stored backup_manifest"
    if int(parent.server_version.split(".")[0]) != server_major:
        return f"the newest base backup {parent.backup_id} is of PostgreSQL {parent.server_version}"
    if parent.timeline != timeline:
        return (f"the newest base backup {parent.backup_id} is of timeline {parent.timeline}, "
                f"the server is on {timeline}")
    try:
        full = backup_chain(mine, parent)[0]
    except IntegrityError as exc:
        return str(exc)
    if now - full.finished >= full_every:
        return f"the newest full backup {full.backup_id} is {full_every.days} days old or more"
    return parent


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


def fetch_server_manifest(repo: Repository, manifest: BaseManifest, destination: Path, *,
                          gpg_homedir: str | None = None, passphrase: str | None = None,
                          secrets: list[str] | None = None) -> Path:
    """The parent's backup_manifest, checked against its sha256, decoded into destination."""
    info = manifest.server_manifest
    if info is None:
        raise NotFoundError(f"base backup {manifest.backup_id} has no stored {SERVER_MANIFEST}")
    fetch_dump(repo, info["key"], destination, size=info["size_bytes"], sha256=info["sha256"],
               encrypted=manifest.encryption is not None, gpg_homedir=gpg_homedir, passphrase=passphrase,
               secrets=secrets)
    return destination


def start_wal_file(result: BaseBackupResult, segment_size: int) -> str:
    return wal_file_name(result.timeline, result.start_lsn, segment_size)


def restore_base_backup(repo: Repository, manifest: BaseManifest, datadir: Path, *,
                        gpg_homedir: str | None = None, passphrase: str | None = None,
                        secrets: list[str] | None = None) -> None:
    """Verify and decode the stored backup, then unpack it into datadir (new or empty).

    The tar is checked against the manifest's sha256 before it is unpacked.
    """
    if datadir.exists() and any(datadir.iterdir()):
        raise ConfigError(f"{datadir} is not empty: restore a base backup into a new directory")
    datadir.mkdir(parents=True, exist_ok=True)
    datadir.chmod(0o700)
    archive = datadir.with_name(f".{datadir.name}.base.tar")
    try:
        fetch_dump(repo, f"{manifest.prefix}/{manifest.data_key}", archive, size=manifest.size_bytes,
                   sha256=manifest.sha256, encrypted=manifest.encryption is not None,
                   gpg_homedir=gpg_homedir, passphrase=passphrase, secrets=secrets,
                   streams=DOWNLOAD_STREAMS)
        with tarfile.open(archive, "r:") as tar:
            extract_safely(tar, datadir)
    except BaseException:
        shutil.rmtree(datadir, ignore_errors=True)
        raise
    finally:
        archive.unlink(missing_ok=True)


def restore_backup_chain(repo: Repository, chain: list[BaseManifest], datadir: Path, *,
                         bin_dir: Path | None = None, gpg_homedir: str | None = None,
                         passphrase: str | None = None, secrets: list[str] | None = None) -> None:
    """Restore a full backup (a chain of one) or rebuild one from a chain (full first, then
    each incremental): every link is verified and unpacked beside datadir, then
    pg_combinebackup writes datadir. A damaged link fails before datadir is written."""
    if len(chain) == 1:
        restore_base_backup(repo, chain[0], datadir, gpg_homedir=gpg_homedir, passphrase=passphrase,
                            secrets=secrets)
        return
    if datadir.exists() and any(datadir.iterdir()):
        raise ConfigError(f"{datadir} is not empty: restore a base backup into a new directory")
    staging = datadir.with_name(f".{datadir.name}.chain")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700, parents=True)
    try:
        links = []
        for index, link in enumerate(chain):
            links.append(staging / f"{index:03d}-{link.backup_id}")
            restore_base_backup(repo, link, links[-1], gpg_homedir=gpg_homedir, passphrase=passphrase,
                                secrets=secrets)
        if datadir.exists():
            datadir.rmdir()  # empty (checked): pg_combinebackup creates it
        program = str(bin_dir / "pg_combinebackup") if bin_dir else pg_bin("pg_combinebackup")
        with Pipeline([[program, *map(str, links), "-o", str(datadir)]], stdout=subprocess.DEVNULL,
                      secrets=secrets or []) as combine:
            combine.wait()
    except BaseException:
        shutil.rmtree(datadir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def extract_safely(tar: tarfile.TarFile, datadir: Path) -> None:
    """Unpack only plain files and directories, each strictly inside datadir, owned by
    us and private (0600/0700), whatever the archive says. A single-tablespace base
    backup holds nothing else; anything else (links, devices, `..`) is refused.
    (tarfile's `data` filter would do this, but only from Python 3.11.4.)"""
    root = datadir.resolve()
    for member in tar:
        path = (root / member.name).resolve()
        if member.name.startswith("/") or not path.is_relative_to(root):
            raise IntegrityError(f"base backup entry {member.name!r} points outside the data directory")
        if member.isdir():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif member.isfile():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            source = tar.extractfile(member)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with source, os.fdopen(fd, "wb") as out:  # type: ignore[union-attr]
                shutil.copyfileobj(source, out, READ_CHUNK)  # type: ignore[arg-type]
        else:
            raise IntegrityError(f"base backup entry {member.name!r} is not a file or directory")


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
