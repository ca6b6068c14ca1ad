"""Physical base backups for point-in-time recovery, and restoring them.

`pg_basebackup -D - -Ft -X fetch | zstd | [gpg]` streams into
`<db>/base/<YYYY>/<MM>/<DD>/<id>/base.tar.zst[.gpg]`, and `manifest.json` beside it is
written last. Tar output to stdout carries one tablespace only (pg_basebackup refuses
more) and needs `-X fetch` or `-X none` (streaming WAL needs a second output file); with
`-X fetch` the backup holds the WAL it needs to become consistent, so it restores even
without the WAL archive.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from tasks.catalog import MANIFEST, StoredManifest, database_component, dated_prefix
from tasks.dump import fetch_dump
from tasks.errors import ConfigError, IntegrityError, NotFoundError, PgdrError
from tasks.pipeline import NO_STALL_BUDGET, Encoder, encode_commands
from tasks.postgres import libpq_env, pg_bin
from tasks.process import Pipeline
from tasks.repository import READ_CHUNK, PutResult, Repository
from tasks.wal import wal_file_name

BASE_AREA = "base"
# Parallel streams downloading a base backup from S3: the fast way back is network-bound.
DOWNLOAD_STREAMS = 4

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
) -> BaseBackupResult:
    """Stream a base backup into repo/key; fails, storing nothing, if any step fails.
    `bin_dir`: the server's major version's programs (default: the newest installed)."""
    program = str(bin_dir / "pg_basebackup") if bin_dir else pg_bin("pg_basebackup")
    argv = [program, "-D", "-", "-Ft", "-X", "fetch", "--verbose", "--no-password",
            "--label", label, "--checkpoint", "fast" if fast_checkpoint else "spread"]
    encode = encode_commands(encrypt_to, gpg_homedir, zstd_level, zstd_threads)
    # No stall budget: pg_basebackup is rightly silent while a spread checkpoint runs.
    with libpq_env(db_url) as env, Pipeline([argv], env=env, secrets=secrets or []) as backup, \
            Encoder(encode, stdin=backup.stdout, what="base backup", secrets=secrets or [],
                    on_stall=backup.kill, stall_budget=NO_STALL_BUDGET) as encoder:
        backup.stdout.close()  # type: ignore[union-attr]
        stored = encoder.store(repo, key, raw_bytes=lambda: backup.bytes_written(0) or 0,
                               finish=backup.wait, waits_on="database",
                               progress=(lambda _raw, written: progress(written)) if progress else None)
    log = "\n".join(backup.stderr_lines(0))
    start, end = _START.search(log), _END.search(log)
    if not start or not end:
        raise PgdrError("pg_basebackup did not report its WAL start and end points")
    return BaseBackupResult(stored, start.group(1), end.group(1), int(start.group(2)))


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


def summary(manifest: BaseManifest) -> dict[str, Any]:
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
    }
