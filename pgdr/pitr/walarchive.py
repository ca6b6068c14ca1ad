"""What the WAL archive holds: the archived files, the gaps in them and the archive's
age (the RPO), and pruning the WAL no kept base backup needs.

Not on the archive_command path (that is pgdr.pitr.wal): these read the whole archive.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict

from pgdr.catalog.catalog import iso, utcnow
from pgdr.ops.errors import ConfigError, IntegrityError, PgdrError
from pgdr.pitr.wal import (
    SEGMENT_PATTERN,
    SIDECAR,
    WAL_NAME_PATTERN,
    archived_record,
    check_wal_name,
    data_key,
    segment_position,
    sidecar_key,
    wal_prefix,
)
from pgdr.storage.repository import Repository


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
        if name.endswith(SIDECAR) and WAL_NAME_PATTERN.match(name[: -len(SIDECAR)]):
            found.append(ArchivedFile(name[: -len(SIDECAR)], info.modified))
    return sorted(found, key=lambda f: f.name)


# Gaps listed by name in a report; the count says how many there are in all.
GAPS_LISTED = 20


def missing_segments(archived: Iterable[str], first: str, last: str,
                     segment_size: int = 16 * 1024 * 1024) -> list[str]:
    """The segments from first to last (inclusive, by place in the WAL stream, on any
    timeline) of which no whole segment is archived: recovery cannot replay past the
    first of them. Named on first's timeline."""
    per_log = 0x1_0000_0000 // segment_size

    def index(name: str) -> int:
        match = SEGMENT_PATTERN.match(name)
        if not match:
            raise ConfigError(f"{name!r} is not a WAL segment name")
        return int(match.group(2), 16) * per_log + int(match.group(3), 16)

    present = {index(name) for name in archived if SEGMENT_PATTERN.match(name)}
    return [f"{first[:8]}{i // per_log:08X}{i % per_log:08X}"
            for i in range(index(first), index(last) + 1) if i not in present]


class ArchiveStatus(TypedDict):
    """The WAL archive of a database at a glance (`archive-status`, `check`)."""

    repository: str
    database: str
    archived_files: int
    segments: int
    last_segment: str | None
    last_archived_at: str | None
    age_seconds: float | None  # of the newest segment: the RPO if the server died now
    chain_start: str | None
    missing_segments: int
    gaps: list[str]  # the first of them
    ok: bool


def archive_status(repo: Repository, database: str, now: datetime | None = None,
                   chain_start: str | None = None, segment_size: int = 16 * 1024 * 1024) -> ArchiveStatus:
    """The newest archived segment and its age: the RPO if the server died now; with
    chain_start (the newest base backup's first segment), the gaps since then."""
    files = archived_files(repo, database)
    segments = [f for f in files if SEGMENT_PATTERN.match(f.name)]
    now = now or utcnow()
    last = max(segments, key=lambda f: (f.archived, f.name)) if segments else None
    gaps = (missing_segments((f.name for f in segments), chain_start, last.name, segment_size)
            if last and chain_start else [])
    return {
        "repository": repo.url,
        "database": database,
        "archived_files": len(files),
        "segments": len(segments),
        "last_segment": last.name if last else None,
        "last_archived_at": iso(last.archived) if last else None,
        "age_seconds": round((now - last.archived).total_seconds(), 3) if last else None,
        "chain_start": chain_start,
        "missing_segments": len(gaps),
        "gaps": gaps[:GAPS_LISTED],
        "ok": last is not None and not gaps,
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


class WalPruneResult(TypedDict):
    """What `pgdr wal-prune --json` prints."""

    database: str
    base_backups: int
    prunable: list[str]
    deleted: int
    dry_run: bool


def prune_archive(repo: Repository, database: str, kept_start_segments: list[str],
                  dry_run: bool) -> WalPruneResult:
    """Delete (or with dry_run only list) the archived WAL no kept base backup needs."""
    names = prunable_segments((f.name for f in archived_files(repo, database)), kept_start_segments)
    if not dry_run and (failed := delete_archived(repo, database, names)):
        raise PgdrError(f"{len(failed)} archived WAL files not deleted: {next(iter(failed.values()))}")
    return {"database": database, "base_backups": len(kept_start_segments), "prunable": names,
            "deleted": 0 if dry_run else len(names), "dry_run": dry_run}


def delete_archived(repo: Repository, database: str, names: Iterable[str]) -> dict[str, str]:
    """Remove archived WAL files: the markers first, so a file never looks archived
    without its data (a file whose marker stays keeps its data). Returns why each file
    that could not be removed was not: empty when all are gone."""
    def data_keys(name: str) -> set[str] | str:
        """The file's data keys, or why its marker cannot be read now."""
        record = None
        try:
            record = archived_record(repo, database, name)
        except IntegrityError:
            pass  # its data is at one of the names a marker could give
        except PgdrError as exc:
            return str(exc)
        return {record["key"]} if record else {data_key(database, name, e) for e in (False, True)}

    # A year of WAL is tens of thousands of files: their markers are read a few at a time.
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = dict(zip(names := list(names), pool.map(data_keys, names), strict=True))
    failed = {name: keys for name, keys in found.items() if isinstance(keys, str)}
    owners = {key: name for name, keys in found.items() if not isinstance(keys, str) for key in keys}
    markers = {sidecar_key(database, name): name for name in found if name not in failed}
    failed.update({markers[key]: why for key, why in repo.delete_many(markers).items()})
    leftover = repo.delete_many(key for key, name in owners.items() if name not in failed)
    failed.update({owners[key]: why for key, why in leftover.items()})
    return failed
