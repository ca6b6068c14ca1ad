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
imports no Prefect and nothing heavy it does not need. Reading the whole archive (its
gaps, its age, pruning it) is pgdr.pitr.walarchive's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgdr.catalog.catalog import database_component, iso, utcnow
from pgdr.ops.errors import ConfigError, IntegrityError, NotFoundError, PgdrError, TransientError
from pgdr.pipeline import crypto
from pgdr.pipeline.pipeline import decode_bytes, decode_commands, encode_commands, encode_file
from pgdr.storage.filerepo import write_atomically
from pgdr.storage.repository import READ_CHUNK, Repository

SIDECAR = ".sha256"
# restore_command exit statuses. PostgreSQL reads any status from 1 to 125 as "not in the
# archive" (the end of recovery); above 125 it aborts recovery. pgdr uses 1 only for a
# file that is truly absent, so a corrupt or unreadable archive can never look like its end.
FETCH_NOT_FOUND = 1
FETCH_ABORT_RECOVERY = 255

SEGMENT_PATTERN = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
WAL_NAME_PATTERN = re.compile(
    r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$"
)


def check_wal_name(name: str) -> str:
    """A WAL file name as PostgreSQL passes it in %f: a segment, a `.partial` segment,
    a `.backup` label or a timeline `.history` file. Anything else is refused."""
    if not WAL_NAME_PATTERN.match(name or ""):
        raise ConfigError(f"{name!r} is not a WAL file name")
    return name


def segment_position(name: str) -> int | None:
    """A segment's place in the WAL stream, whatever its timeline (log * 2**32 + seg);
    None for a history file, which belongs to no position."""
    match = SEGMENT_PATTERN.match(name[:24])
    if not match or name.endswith(".history"):
        return None
    return int(match.group(2), 16) * 0x1_0000_0000 + int(match.group(3), 16)


def wal_file_name(timeline: int, lsn: str, segment_size: int = 16 * 1024 * 1024) -> str:
    """The segment that holds an LSN (`0/3000028`) on a timeline, as pg_walfile_name()."""
    high, _, low = lsn.partition("/")
    position = (int(high, 16) << 32 | int(low, 16)) // segment_size
    per_log = 0x1_0000_0000 // segment_size
    return f"{timeline:08X}{position // per_log:08X}{position % per_log:08X}"


WAL_AREA = "wal"


def wal_prefix(database: str) -> str:
    return f"{database_component(database)}/{WAL_AREA}/"


def data_key(database: str, name: str, encrypted: bool, stored_sha256: str | None = None) -> str:
    """Where a file's stored bytes go. Named by their checksum too, so that pushes of
    different content under one name never overwrite each other's data: only the marker,
    created once, says which of them is archived. (Archives written before that have
    `<name>.zst[.gpg]`; their markers name it.)"""
    digest = f".{stored_sha256[:16]}" if stored_sha256 else ""
    return f"{wal_prefix(database)}{check_wal_name(name)}{digest}.zst" + (".gpg" if encrypted else "")


def _is_data_key_of(key: str, database: str, name: str) -> bool:
    own = re.escape(f"{wal_prefix(database)}{name}")
    return re.fullmatch(own + r"(?:\.[0-9a-f]{16})?\.zst(?:\.gpg)?", key) is not None


def sidecar_key(database: str, name: str) -> str:
    return f"{wal_prefix(database)}{check_wal_name(name)}{SIDECAR}"


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    stored: bool  # False: it was already archived with the same content
    size: int
    wal_size: int
    wal_sha256: str


def file_checksum(path: Path) -> tuple[int, str]:
    """A local file's size and sha256."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise PgdrError(f"cannot read {path}: {exc.strerror}") from None
    return size, digest.hexdigest()


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
        if not _is_data_key_of(record["key"], database, name):
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

    The data and the marker are created only if none exists (S3 `If-None-Match: *`, a
    hard link on disk): of concurrent pushes of one name exactly one is archived; the
    others succeed if their content is the same, and fail otherwise. IntegrityError when a different
    file of that name is archived: PostgreSQL then keeps the segment and retries, and the
    operator sees why in its log.
    """
    name = check_wal_name(name or path.name)
    wal_size, wal_sha256 = file_checksum(path)
    existing = _read_sidecar(repo, database, name)
    if existing is not None:
        return _already_archived(existing, name, wal_sha256, wal_size)
    fingerprint = crypto.recipient_fingerprint(encrypt_to, gpg_homedir) if encrypt_to else None
    # (A completed segment does not change; if it did, fetch would find the checksum wrong.)
    stored = encode_file(path, encode_commands(fingerprint, gpg_homedir, zstd_level, 1))
    stored_sha256 = hashlib.sha256(stored).hexdigest()
    key = data_key(database, name, fingerprint is not None, stored_sha256)
    _store_data(repo, key, stored)
    record = {
        "name": name,
        "key": key,
        "size": len(stored),
        "sha256": stored_sha256,
        "wal_size": wal_size,
        "wal_sha256": wal_sha256,
        "compression": f"zstd-{zstd_level}",
        "encryption": {"type": "gpg", "recipient_fingerprint": fingerprint} if fingerprint else None,
        "archived_at": iso(utcnow()),
    }
    if repo.put_if_absent(sidecar_key(database, name), json.dumps(record, sort_keys=True).encode()):
        return PushResult(name, key, True, len(stored), wal_size, wal_sha256)
    # Another push of this name was archived first: ours is not the archived copy.
    winner = _read_sidecar(repo, database, name)
    if winner is None:
        raise PgdrError(f"{name}: another push's marker appeared and vanished; retrying is safe")
    if winner["key"] != key:
        # Best effort (the archiver may lack delete rights): an unmarked copy is never read.
        with contextlib.suppress(PgdrError):
            repo.delete(key)
    return _already_archived(winner, name, wal_sha256, wal_size)


def _store_data(repo: Repository, key: str, stored: bytes) -> None:
    """Store a push's bytes under their content-named key, created only if absent: pushes
    of the same bytes share one copy and never replace it or read back each other's upload.
    A push of the same bytes that lost the marker to another content removes the shared
    copy; one found gone is written again (the marker then refuses this push as well)."""
    for _ in range(3):
        if repo.put_if_absent(key, stored):
            return
        there = repo.head(key)
        if there is not None:
            if there.size != len(stored):
                raise IntegrityError(f"{key} holds {there.size} bytes, not the {len(stored)} "
                                     "its name promises")
            return
    raise TransientError(f"{key}: the copy kept vanishing while it was being stored; retrying is safe")


def _already_archived(record: dict[str, Any], name: str, wal_sha256: str, wal_size: int) -> PushResult:
    """Pushing a file that is archived already: fine if it is the same file, refused if not."""
    if record["wal_sha256"] == wal_sha256 and record.get("wal_size") == wal_size:
        return PushResult(name, record["key"], False, record["size"], wal_size, wal_sha256)
    raise IntegrityError(
        f"{name} is already archived with different content (sha256 "
        f"{record['wal_sha256'][:12]}… there, {wal_sha256[:12]}… here): refusing to overwrite it"
    )


# --- pushing ahead (archive_command in parallel) ---------------------------------------------
#
# PostgreSQL runs archive_command for one segment at a time. With --jobs N, the push of one
# segment also pushes up to N-1 more that PostgreSQL has already marked ready
# (pg_wal/archive_status/<name>.ready), in parallel, and notes each one stored in a spool
# directory. When PostgreSQL then asks for one of those, the note answers at once. A note
# is written only after its push returned (stored durably with its marker) and names the
# repository, the area and the file's checksum: it is used only for exactly that file.

SPOOL_SUFFIX = ".pushed"


def ready_files(wal_dir: Path) -> list[str]:
    """The WAL files PostgreSQL marked ready to archive, in its order (history files first)."""
    try:
        marked = [p.name[: -len(".ready")] for p in (wal_dir / "archive_status").iterdir()
                  if p.name.endswith(".ready")]
    except OSError:
        return []
    return sorted((n for n in marked if WAL_NAME_PATTERN.match(n)),
                  key=lambda n: (not n.endswith(".history"), n))


def _spool_note(spool: Path, name: str) -> Path:
    return spool / f"{check_wal_name(name)}{SPOOL_SUFFIX}"


def _note_pushed(spool: Path, repo: Repository, database: str, result: PushResult) -> None:
    note = {"repository": repo.url, "database": database, "name": result.name, "key": result.key,
            "size": result.size, "wal_size": result.wal_size, "wal_sha256": result.wal_sha256}
    write_atomically(_spool_note(spool, result.name), [json.dumps(note).encode()])


def _pushed_ahead(spool: Path, repo: Repository, database: str, path: Path, name: str) -> PushResult | None:
    """The push of this very file noted earlier (same repository, area and content), if any."""
    note_path = _spool_note(spool, name)
    try:
        note = json.loads(note_path.read_bytes())
    except (OSError, ValueError):
        return None
    note_path.unlink(missing_ok=True)
    if (note.get("repository"), note.get("database")) != (repo.url, database):
        return None
    size, sha256 = file_checksum(path)
    if (size, sha256) != (note.get("wal_size"), note.get("wal_sha256")):
        return None
    return PushResult(name, note["key"], False, note["size"], size, sha256)


def push_ahead(repo: Repository, database: str, path: Path, spool: Path, jobs: int,
               **options: Any) -> PushResult:
    """Archive path (as push) and, in parallel, up to jobs-1 more files PostgreSQL has
    marked ready; return once path is archived. A failure of another file is left for
    PostgreSQL's own call for it, which reports it."""
    name = check_wal_name(path.name)
    spool.mkdir(parents=True, exist_ok=True)
    earlier = _pushed_ahead(spool, repo, database, path, name)
    if earlier is not None:
        return earlier
    ahead = [n for n in ready_files(path.parent) if n != name and not _spool_note(spool, n).exists()]
    batch = [path] + [path.parent / n for n in ahead[: max(0, jobs - 1)]]
    with ThreadPoolExecutor(max_workers=len(batch)) as pool:
        futures = [pool.submit(push, repo, database, each, **options) for each in batch]
    for future in futures[1:]:
        if future.exception() is None:
            _note_pushed(spool, repo, database, future.result())
    return futures[0].result()


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
            data = decode_bytes(stored, decode_commands(argv), pass_fds=fds, secrets=[passphrase or ""])
    else:
        data = decode_bytes(stored, decode_commands(None))
    if hashlib.sha256(data).hexdigest() != record["wal_sha256"]:
        raise IntegrityError(f"{name} decodes to different bytes than were archived")
    try:
        write_atomically(destination, [data])
    except OSError as exc:
        raise PgdrError(f"cannot write {destination}: {exc.strerror}") from None
    return len(data)
