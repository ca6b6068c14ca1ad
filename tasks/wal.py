"""The WAL archive: `archive_command` and `restore_command` for continuous archiving.

Each archived file is two objects under `<db>/wal/`:

- `<name>.zst[.gpg]`: the file, zstd-compressed, optionally encrypted to a gpg key;
- `<name>.sha256`: the completion marker, written last, holding the size and sha256 of
  the stored bytes and of the original file.

A file counts as archived only once its marker exists (as a manifest marks a backup).
The original file's checksum is what makes a second push of the same segment safe to
accept even when encryption makes the stored bytes differ each time, and what makes a
different file under the same name a loud failure.

This path runs once per 16 MB segment, as the postgres user, from the archiver: it
imports no Prefect and nothing heavy it does not need.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tasks import crypto
from tasks.catalog import database_component, iso, utcnow
from tasks.errors import ConfigError, IntegrityError, NotFoundError, PgdrError
from tasks.process import run_bytes
from tasks.repository import Repository, write_atomically

SIDECAR = ".sha256"
# restore_command exit statuses. PostgreSQL reads any status from 1 to 125 as "not in the
# archive" (the end of recovery); above 125 it aborts recovery. pgdr uses 1 only for a
# file that is truly absent, so a corrupt or unreadable archive can never look like its end.
FETCH_NOT_FOUND = 1
FETCH_ABORT_RECOVERY = 255

_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_WAL_NAME = re.compile(
    r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$"
)


def check_wal_name(name: str) -> str:
    """A WAL file name as PostgreSQL passes it in %f: a segment, a `.partial` segment,
    a `.backup` label or a timeline `.history` file. Anything else is refused."""
    if not _WAL_NAME.match(name or ""):
        raise ConfigError(f"{name!r} is not a WAL file name")
    return name


def segment_position(name: str) -> int | None:
    """A segment's place in the WAL stream, whatever its timeline (log * 2**32 + seg);
    None for a history file, which belongs to no position."""
    match = _SEGMENT.match(name[:24])
    if not match or name.endswith(".history"):
        return None
    return int(match.group(2), 16) * 0x1_0000_0000 + int(match.group(3), 16)


def wal_file_name(timeline: int, lsn: str, segment_size: int = 16 * 1024 * 1024) -> str:
    """The segment that holds an LSN (`0/3000028`) on a timeline, as pg_walfile_name()."""
    high, _, low = lsn.partition("/")
    position = (int(high, 16) << 32 | int(low, 16)) // segment_size
    per_log = 0x1_0000_0000 // segment_size
    return f"{timeline:08X}{position // per_log:08X}{position % per_log:08X}"


def wal_prefix(database: str) -> str:
    return f"{database_component(database)}/wal/"


def data_key(database: str, name: str, encrypted: bool) -> str:
    return f"{wal_prefix(database)}{check_wal_name(name)}.zst" + (".gpg" if encrypted else "")


def sidecar_key(database: str, name: str) -> str:
    return f"{wal_prefix(database)}{check_wal_name(name)}{SIDECAR}"


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    stored: bool  # False: it was already archived with the same content
    size: int
    wal_size: int


def _read_sidecar(repo: Repository, database: str, name: str) -> dict[str, Any] | None:
    try:
        raw = repo.get_bytes(sidecar_key(database, name))
    except NotFoundError:
        return None
    try:
        record = json.loads(raw)
        if not isinstance(record, dict) or not {"key", "size", "sha256", "wal_sha256"} <= set(record):
            raise ValueError("fields missing")
        # A marker only ever names its own file's data: nothing else can be fetched through it.
        if record["key"] not in (data_key(database, name, False), data_key(database, name, True)):
            raise ValueError("foreign key")
    except ValueError:
        raise IntegrityError(f"the archive's checksum record of {name} is unreadable") from None
    return record


def archived_record(repo: Repository, database: str, name: str) -> dict[str, Any] | None:
    """The checksum record of an archived WAL file (None when it is not archived)."""
    return _read_sidecar(repo, database, name)


def push(
    repo: Repository,
    database: str,
    path: Path,
    name: str | None = None,
    *,
    encrypt_to: str | None = None,
    gpg_homedir: str | None = None,
    zstd_level: int = 3,
) -> PushResult:
    """Archive one WAL file; returns only once it is durably stored with its marker.

    IntegrityError when a different file of that name is already archived: PostgreSQL
    then keeps the segment and retries, and the operator sees why in its log.
    """
    name = check_wal_name(name or path.name)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PgdrError(f"cannot read {path}: {exc.strerror}") from None
    wal_sha256 = hashlib.sha256(data).hexdigest()
    existing = _read_sidecar(repo, database, name)
    if existing is not None:
        if existing["wal_sha256"] == wal_sha256 and existing.get("wal_size") == len(data):
            return PushResult(name, existing["key"], False, existing["size"], len(data))
        raise IntegrityError(
            f"{name} is already archived with different content (sha256 "
            f"{existing['wal_sha256'][:12]}… there, {wal_sha256[:12]}… here): refusing to overwrite it"
        )
    stored = run_bytes(["zstd", f"-{zstd_level}", "-q", "-c"], input=data)
    fingerprint = None
    if encrypt_to:
        fingerprint = crypto.recipient_fingerprint(encrypt_to, gpg_homedir)
        stored = run_bytes(crypto.encrypt_command(fingerprint, gpg_homedir), input=stored)
    key = data_key(database, name, encrypted=fingerprint is not None)
    result = repo.put_bytes(key, stored)
    record = {
        "name": name,
        "key": key,
        "size": result.size,
        "sha256": result.sha256,
        "wal_size": len(data),
        "wal_sha256": wal_sha256,
        "compression": f"zstd-{zstd_level}",
        "encryption": {"type": "gpg", "recipient_fingerprint": fingerprint} if fingerprint else None,
        "archived_at": iso(utcnow()),
    }
    repo.put_bytes(sidecar_key(database, name), json.dumps(record, sort_keys=True).encode())
    return PushResult(name, key, True, result.size, len(data))


def fetch(
    repo: Repository,
    database: str,
    name: str,
    destination: Path,
    *,
    gpg_homedir: str | None = None,
    passphrase: str | None = None,
) -> int:
    """Restore one archived WAL file to destination, atomically; returns its size.

    NotFoundError when it is not archived (the end of the archive, for recovery);
    IntegrityError when the stored bytes or the decoded file do not match the checksums
    recorded at push time. Nothing is written at destination unless it is verified.
    """
    record = _read_sidecar(repo, database, check_wal_name(name))
    if record is None:
        raise NotFoundError(f"{name} is not in the WAL archive")
    try:
        stored = repo.get_bytes(record["key"])
    except NotFoundError:
        raise IntegrityError(f"{name}: its checksum record exists but its data is gone") from None
    if len(stored) != record["size"] or hashlib.sha256(stored).hexdigest() != record["sha256"]:
        raise IntegrityError(
            f"{name} is corrupt in the archive: expected {record['size']} bytes with sha256 "
            f"{record['sha256'][:12]}…, found {len(stored)} bytes with sha256 "
            f"{hashlib.sha256(stored).hexdigest()[:12]}…"
        )
    if record.get("encryption"):
        with crypto.decrypt_command(gpg_homedir, passphrase) as (argv, fds):
            stored = run_bytes(argv, input=stored, pass_fds=fds, secrets=[passphrase or ""])
    data = run_bytes(["zstd", "-d", "-q", "-c"], input=stored)
    if hashlib.sha256(data).hexdigest() != record["wal_sha256"]:
        raise IntegrityError(f"{name} decodes to different bytes than were archived")
    try:
        write_atomically(destination, [data])
    except OSError as exc:
        raise PgdrError(f"cannot write {destination}: {exc.strerror}") from None
    return len(data)


# --- what is archived -----------------------------------------------------------------------


@dataclass(frozen=True)
class ArchivedFile:
    name: str
    archived: datetime  # when its marker was stored


def archived_files(repo: Repository, database: str) -> list[ArchivedFile]:
    """Every completely archived WAL file of database, in WAL order."""
    prefix = wal_prefix(database)
    found = []
    for info in repo.list(prefix):
        name = info.key[len(prefix):]
        if name.endswith(SIDECAR) and _WAL_NAME.match(name[: -len(SIDECAR)]):
            found.append(ArchivedFile(name[: -len(SIDECAR)], info.modified))
    return sorted(found, key=lambda f: f.name)


def archive_status(repo: Repository, database: str, now: datetime | None = None) -> dict[str, Any]:
    """The newest archived segment and its age: the RPO if the server died now."""
    files = archived_files(repo, database)
    segments = [f for f in files if _SEGMENT.match(f.name)]
    now = now or utcnow()
    last = max(segments, key=lambda f: (f.archived, f.name)) if segments else None
    return {
        "repository": repo.url,
        "database": database,
        "archived_files": len(files),
        "segments": len(segments),
        "last_segment": last.name if last else None,
        "last_archived_at": iso(last.archived) if last else None,
        "age_seconds": round((now - last.archived).total_seconds(), 3) if last else None,
        "ok": last is not None,
    }


# --- retention ------------------------------------------------------------------------------


def prunable_segments(archived: Iterable[str], kept_start_segments: Iterable[str]) -> list[str]:
    """The archived WAL files no kept base backup needs: those before the oldest kept
    backup's starting segment, on any timeline. History files are always kept (tiny, and
    recovery needs them to follow timelines); with no kept base backup nothing is
    prunable, since no deletion can then be proven safe."""
    starts = [segment_position(check_wal_name(name)) for name in kept_start_segments]
    if not starts:
        return []
    cutoff = min(p for p in starts if p is not None)
    return sorted(
        name for name in archived
        if (position := segment_position(check_wal_name(name))) is not None and position < cutoff
    )


def delete_archived(repo: Repository, database: str, names: Iterable[str]) -> int:
    """Remove archived WAL files: the marker first, so a file never looks archived
    without its data. Returns how many were removed."""
    count = 0
    for name in names:
        record = None
        with contextlib.suppress(IntegrityError):
            record = _read_sidecar(repo, database, name)
        repo.delete(sidecar_key(database, name))
        for key in {record["key"]} if record else {data_key(database, name, e) for e in (False, True)}:
            repo.delete(key)
        count += 1
    return count
