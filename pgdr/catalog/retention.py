"""Retention applied to a repository: scan each area (database backups, files backups,
storage snapshots, base backups and their WAL), plan with pgdr.catalog.policy, delete.

A backup goes manifest first, so that a half-deleted backup is never taken for a complete
one. Storage snapshots share objects: deleting one removes only the objects that no
remaining snapshot refers to (`sweep`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pgdr.catalog.catalog import (
    MANIFEST,
    NON_TIER_AREAS,
    VERIFIED,
    Manifest,
    StoredManifest,
    backup_time,
    database_component,
    iso,
    parse_backup_id,
    read_verification,
)
from pgdr.catalog.policy import (
    DEFAULT_GRACE,
    BackupFacts,
    Decision,
    Policy,
    choose,
    choose_base_backups,
    is_stale,
)
from pgdr.catalog.scan import list_databases
from pgdr.files import manifest as files_manifest
from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.pitr import wal, walarchive
from pgdr.pitr.basebackup import BASE_AREA, BaseManifest
from pgdr.storage.repository import IncompleteUpload, Repository
from pgdr.storage.storage import StorageManifest, bucket_area, list_buckets, referenced_keys

DATABASE, FILES, STORAGE = "database", "files", "storage"
# Point-in-time recovery: base backups and the archived WAL of a database (named by it).
PITR = "pitr"
AREAS = (DATABASE, FILES, STORAGE, PITR)


def select_areas(area: str | None, selectors: Mapping[str, str | None]) -> list[str]:
    """The areas a prune covers: the one asked for, else those a set was named in
    (selectors: area -> database, files name or bucket), else all."""
    named = [each for each in AREAS if selectors.get(each)]
    if area is None:
        return named or list(AREAS)
    if area not in AREAS:
        raise ConfigError(f"unknown area {area!r}: choose one of {', '.join(AREAS)}")
    # The pitr area is named by its database too: the same selector may name both.
    if named and any(selectors.get(each) != selectors.get(area) for each in named):
        raise ConfigError(f"a {' and a '.join(named)} set was named, which is not the area {area}")
    return [area]


@dataclass
class StoredBackup:
    """The objects under one backup's prefix, complete (with manifest) or not."""

    group: str
    tier: str
    prefix: str
    keys: list[str]
    newest: datetime
    manifest: Any = None  # catalog.Manifest or files.FilesManifest
    verified: bool | None = None


@dataclass
class PrunePlan:
    area: str
    decisions: list[tuple[Decision, StoredBackup]]
    incomplete: list[StoredBackup]
    stale_uploads: list[IncompleteUpload]
    unreadable: list[StoredBackup]


def scan_backups(repo: Repository, root: str, group: str, kind: type[StoredManifest], *,
                 tiered: bool = True) -> tuple[list[StoredBackup], list[StoredBackup]]:
    """Every backup prefix under root (`<root>[/<tier>]/<YYYY>/<MM>/<DD>/<backup_id>/<file>`,
    all pages of every tier), complete ones with their manifest; and apart, those whose
    manifest cannot be read or describes another backup (left alone: never delete what is
    not understood)."""
    areas = ([f"{root}/{tier}" for tier in repo.list_dirs(root + "/") if tier not in NON_TIER_AREAS]
             if tiered else [root])
    found: dict[str, StoredBackup] = {}
    for area in areas:
        for info in repo.list(area + "/"):
            parts = info.key[len(area) + 1:].split("/")
            # Only ids pgdr writes, at the depth it writes them.
            if len(parts) != 5 or not _is_backup_id(parts[3]):
                continue
            prefix = f"{area}/{'/'.join(parts[:4])}"
            stored = found.setdefault(prefix, StoredBackup(group, parse_backup_id(parts[3]).tier, prefix, [],
                                                           info.modified))
            stored.keys.append(info.key)
            stored.newest = max(stored.newest, info.modified)
    readable, unreadable = [], []
    for stored in found.values():
        if f"{stored.prefix}/{MANIFEST}" in stored.keys:
            try:
                stored.manifest = kind.read(repo, f"{stored.prefix}/{MANIFEST}")
            except (PgdrError, ValueError):
                unreadable.append(stored)
                continue
            if not stored.manifest.belongs_at(stored.prefix):
                unreadable.append(stored)  # a manifest moved here from elsewhere: never trusted
                continue
        readable.append(stored)
    return readable, unreadable


def scan_database(repo: Repository, database: str) -> tuple[list[StoredBackup], list[StoredBackup]]:
    """scan_backups of a database, with each backup's verification result."""
    stored, unreadable = scan_backups(repo, database_component(database), database, Manifest)
    readable = []
    for backup in stored:
        if backup.manifest and f"{backup.prefix}/{VERIFIED}" in backup.keys:
            try:
                result = read_verification(repo, backup.manifest) or {}
            except (PgdrError, ValueError):
                unreadable.append(backup)
                continue
            backup.verified = result.get("verified") is True
        readable.append(backup)
    return readable, unreadable


def _is_backup_id(value: str) -> bool:
    try:
        parse_backup_id(value)
    except PgdrError:
        return False
    return True


def _plan(repo: Repository, area: str, root: str, scanned: tuple[list[StoredBackup], list[StoredBackup]],
          now: datetime, policy: Policy, tier: str | None, grace: timedelta,
          chooser: Callable[[list[BackupFacts], datetime, Policy], list[Decision]] = choose) -> PrunePlan:
    stored, unreadable = scanned
    complete = {s.manifest.backup_id: s for s in stored if s.manifest}
    # The tier is the backup id's (where the backup lies): base backups have no tier field.
    facts = [BackupFacts(s.manifest.backup_id, s.group, s.tier, backup_time(s.manifest), s.verified,
                         getattr(s.manifest, "parent_backup_id", None))  # an incremental base backup's
             for s in complete.values()]
    decisions = [(d, complete[d.backup.backup_id]) for d in chooser(facts, now, policy)
                 if tier is None or d.backup.tier == tier]
    incomplete = [s for s in stored if s.manifest is None and is_stale(s.newest, now, grace)]
    uploads = [u for u in repo.incomplete_uploads(root + "/") if is_stale(u.started, now, grace)]
    return PrunePlan(area, decisions, incomplete, uploads, unreadable)


def plan_prune(repo: Repository, database: str, now: datetime, policy: Policy,
               tier: str | None = None, grace: timedelta = DEFAULT_GRACE) -> PrunePlan:
    """What pruning the database would do. The floors look at all its tiers; with `tier`,
    only that tier's backups are decided on."""
    return _plan(repo, DATABASE, database_component(database), scan_database(repo, database),
                 now, policy, tier, grace)


def plan_files_prune(repo: Repository, name: str, now: datetime, policy: Policy,
                     tier: str | None = None, grace: timedelta = DEFAULT_GRACE) -> PrunePlan:
    """What pruning the files backups named name would do (as plan_prune for a database)."""
    root = f"{files_manifest.AREA}/{files_manifest.check_name(name)}"
    return _plan(repo, FILES, root, scan_backups(repo, root, name, files_manifest.FilesManifest),
                 now, policy, tier, grace)


def delete_backup(repo: Repository, stored: StoredBackup) -> str | None:
    """Delete one backup's objects, manifest first so that a half-deleted backup is never
    listed as complete; returns why it could not be deleted (Object Lock, an error), or None."""
    locked = [(key, why) for key in stored.keys if (why := repo.lock_status(key))]
    if locked:
        key, why = locked[0]
        return f"locked ({why}) on {key.rsplit('/', 1)[-1]}"
    manifest_key = f"{stored.prefix}/{MANIFEST}"
    data = sorted(k for k in stored.keys if k != manifest_key and not k.endswith(VERIFIED))
    verified = sorted(k for k in stored.keys if k != manifest_key and k.endswith(VERIFIED))
    for batch in ([manifest_key] if manifest_key in stored.keys else [], data, verified):
        failed = repo.delete_many(batch)
        if failed:
            return f"could not delete: {next(iter(failed.values()))}"
    return None


def _row(area: str, backup_id: str, group: str | None, tier: str | None, action: str, reason: str,
         finished: datetime | None = None, verified: bool | None = None) -> dict[str, object]:
    """One line of the prune report (the `--json` contract)."""
    return {"backup_id": backup_id, "area": area, "database": group, "tier": tier,
            "finished_at": iso(finished) if finished else None, "verified": verified,
            "action": action, "reason": reason}


SAFETY_DATABASE = "safety-database"


def safety_database_row(database: Any, action: str, reason: str) -> dict[str, object]:
    """The prune report's row for a safety database (pgdr.restore.restore.SafetyDatabase)."""
    try:
        at = datetime.fromisoformat(database.at.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        at = None
    return _row(SAFETY_DATABASE, database.name, database.of, database.role, action, reason, at)


def safety_databases_unchecked_row(server: str, problem: str) -> dict[str, object]:
    """The prune report's row when the server's safety databases could not be looked at."""
    return _row(SAFETY_DATABASE, server, None, None, "failed", f"safety databases not checked: {problem}")


def _outcome(dry_run: bool, problem: str | None) -> str:
    if dry_run:
        return "would delete"
    return "deleted" if problem is None else "locked" if problem.startswith("locked") else "failed"


def _abort_stale(repo: Repository, area: str, uploads: list[IncompleteUpload],
                 dry_run: bool) -> list[dict[str, object]]:
    rows = []
    for upload in uploads:
        problem = None
        if not dry_run:
            try:
                repo.abort_upload(upload)
            except PgdrError as exc:
                problem = str(exc)
        rows.append(_row(area, upload.key, None, None,
                         "would abort" if dry_run else "aborted" if problem is None else "failed",
                         f"upload started {iso(upload.started)} never completed"
                         + (f"; {problem}" if problem else "")))
    return rows


def apply_plan(repo: Repository, plan: PrunePlan, dry_run: bool) -> list[dict[str, object]]:
    """Carry out the plan (or only describe it): one row per backup and per incomplete
    backup or upload, with what happened and why."""
    rows: list[dict[str, object]] = []
    for decision, stored in plan.decisions:
        backup = decision.backup
        action, reason = "keep", decision.reason
        if decision.delete:
            problem = None if dry_run else delete_backup(repo, stored)
            action = _outcome(dry_run, problem)
            reason = f"{reason}; {problem}" if problem else reason
        rows.append(_row(plan.area, backup.backup_id, backup.group, backup.tier, action, reason,
                         backup.finished, backup.verified))
    for stored in plan.incomplete:
        problem = None if dry_run else delete_backup(repo, stored)
        rows.append(_row(plan.area, stored.prefix.rsplit("/", 1)[-1], stored.group, stored.tier,
                         "would delete" if dry_run else "deleted" if problem is None else "failed",
                         f"incomplete (no manifest) since {iso(stored.newest)}"
                         + (f"; {problem}" if problem else "")))
    rows += _abort_stale(repo, plan.area, plan.stale_uploads, dry_run)
    for stored in plan.unreadable:
        rows.append(_row(plan.area, stored.prefix.rsplit("/", 1)[-1], None, stored.tier, "keep",
                         "manifest unreadable: left for an operator to inspect"))
    return rows


# --- storage snapshots: objects shared between snapshots --------------------------------------


@dataclass
class SnapshotDir:
    """The objects under `storage/<bucket>/<snapshot_id>/`, with its manifest when complete."""

    snapshot_id: str
    keys: list[str]
    newest: datetime
    manifest: StorageManifest | None = None


@dataclass
class Sweep:
    """What deleting some snapshots removes: their manifests (first), then the objects under
    them or under manifest-less leftovers that no remaining snapshot refers to."""

    manifests: dict[str, str]  # snapshot id -> its manifest key
    objects: dict[str, list[str]]  # snapshot id -> its objects to delete
    shared: dict[str, int]  # snapshot id -> how many of its objects a remaining snapshot refers to


def sweep(dirs: Mapping[str, SnapshotDir], doomed: AbstractSet[str], leftovers: AbstractSet[str]) -> Sweep:
    """Pure: what goes when the doomed snapshots are deleted and the leftovers (directories
    without a manifest: snapshots pruned earlier, or interrupted) are swept. Every snapshot
    with a manifest that is not doomed remains, and so does every object it refers to."""
    remaining = [d.manifest for sid, d in dirs.items() if d.manifest and sid not in doomed]
    referenced = referenced_keys(remaining)
    manifests = {sid: manifest.manifest_key for sid in sorted(doomed)
                 if (manifest := dirs[sid].manifest) is not None}
    objects: dict[str, list[str]] = {}
    shared: dict[str, int] = {}
    for sid in sorted(doomed | leftovers):
        own = [key for key in dirs[sid].keys if key != manifests.get(sid)]
        objects[sid] = [key for key in own if key not in referenced]
        shared[sid] = len(own) - len(objects[sid])
    return Sweep(manifests, objects, shared)


@dataclass
class StoragePlan:
    bucket: str
    dirs: dict[str, SnapshotDir]
    decisions: list[Decision]
    leftovers: set[str]
    stale_uploads: list[IncompleteUpload]
    # Snapshot ids whose manifest cannot be read: it may refer to any object of the bucket,
    # so nothing of the bucket is deleted until an operator has looked.
    unreadable: list[str]


def snapshot_group(manifest: StorageManifest) -> str:
    """What a snapshot's retention is grouped by: its source bucket and prefix."""
    return f"{manifest.bucket}/{manifest.source_prefix}".rstrip("/")


def scan_snapshots(repo: Repository, bucket: str) -> tuple[dict[str, SnapshotDir], list[str]]:
    """Every snapshot directory of the bucket (one listing, all pages), and the ids of those
    whose manifest cannot be read."""
    root = f"{bucket_area(bucket)}/"
    dirs: dict[str, SnapshotDir] = {}
    for info in repo.list(root):
        snapshot_id = info.key[len(root):].split("/", 1)[0]
        if not _is_backup_id(snapshot_id):
            continue
        found = dirs.setdefault(snapshot_id, SnapshotDir(snapshot_id, [], info.modified))
        found.keys.append(info.key)
        found.newest = max(found.newest, info.modified)
    unreadable = []
    for snapshot_id, found in dirs.items():
        key = f"{root}{snapshot_id}/{MANIFEST}"
        if key not in found.keys:
            continue
        try:
            manifest = StorageManifest.read(repo, key)
        except (PgdrError, ValueError):
            unreadable.append(snapshot_id)
            continue
        if not manifest.belongs_at(f"{root}{snapshot_id}"):
            unreadable.append(snapshot_id)
            continue
        found.manifest = manifest
    return dirs, sorted(unreadable)


def plan_storage_prune(repo: Repository, bucket: str, now: datetime, policy: Policy,
                       tier: str | None = None, grace: timedelta = DEFAULT_GRACE) -> StoragePlan:
    """What pruning the snapshots of the bucket would do (every source prefix of it)."""
    dirs, unreadable = scan_snapshots(repo, bucket)
    facts = [BackupFacts(sid, snapshot_group(d.manifest), d.manifest.tier, d.manifest.finished)
             for sid, d in dirs.items() if d.manifest]
    decisions = [d for d in choose(facts, now, policy) if tier is None or d.backup.tier == tier]
    leftovers = {sid for sid, d in dirs.items()
                 if d.manifest is None and sid not in unreadable and is_stale(d.newest, now, grace)}
    uploads = [u for u in repo.incomplete_uploads(f"{bucket_area(bucket)}/")
               if is_stale(u.started, now, grace)]
    return StoragePlan(bucket, dirs, decisions, leftovers, uploads, unreadable)


def _each(function: Callable[[str], str | None], keys: list[str], workers: int) -> dict[str, str | None]:
    """function(key) for every key on a few threads (snapshots hold many objects)."""
    if not keys:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(keys)))) as pool:
        return dict(zip(keys, pool.map(function, keys), strict=True))


def _keep_locked(repo: Repository, plan: StoragePlan, doomed: set[str], leftovers: set[str],
                 workers: int) -> tuple[Sweep, dict[str, str], dict[str, str]]:
    """The sweep without the snapshots that have an object under Object Lock among those it
    would delete (they stay whole: their manifest too, so what they refer to stays
    protected); also why each was kept, and every locked key."""
    known: dict[str, str | None] = {}
    kept: dict[str, str] = {}
    while True:  # keeping a snapshot only protects more objects: this ends
        planned = sweep(plan.dirs, doomed, leftovers)
        wanted = {sid: [key for key in [planned.manifests.get(sid), *keys] if key]
                  for sid, keys in planned.objects.items()}
        known.update(_each(repo.lock_status, [k for keys in wanted.values() for k in keys if k not in known],
                           workers))
        locked = {sid: key for sid in doomed for key in wanted[sid] if known[key]}
        if not locked:
            return planned, kept, {key: why for key, why in known.items() if why}
        for sid, key in locked.items():
            kept[sid] = f"locked ({known[key]}) on {key.rsplit('/', 1)[-1]}"
        doomed = doomed - set(locked)


def _objects_note(planned: Sweep, sid: str, locked: Mapping[str, str], failed: Mapping[str, str],
                  dry_run: bool) -> tuple[str, str | None]:
    """What happened to one snapshot directory's objects, and the problem if any."""
    keys = planned.objects.get(sid, [])
    held = sum(1 for key in keys if key in locked)
    errors = [failed[key] for key in keys if key in failed]
    notes = [f"{len(keys) - held - len(errors)} objects {'to delete' if dry_run else 'deleted'}"]
    if planned.shared.get(sid):
        notes.append(f"{planned.shared[sid]} kept: a remaining snapshot refers to them")
    if held:
        notes.append(f"{held} under Object Lock")
    problem = f"{len(errors)} objects not deleted ({errors[0]}): the next prune retries" if errors else None
    return ", ".join(notes), problem


def apply_storage_plan(repo: Repository, plan: StoragePlan, dry_run: bool,
                       workers: int = 8) -> list[dict[str, object]]:
    """Carry out the plan (or only describe it). The order keeps every remaining snapshot
    whole at each step, so a crash anywhere leaves only unreferenced leftovers, which the
    next prune sweeps:
    1. a snapshot with an object under Object Lock among those it would delete stays whole;
    2. the manifests of the doomed snapshots go (from then on, they no longer exist);
    3. the objects that no remaining snapshot refers to go; the others stay."""
    doomed = {d.backup.backup_id for d in plan.decisions if d.delete}
    leftovers = set(plan.leftovers)
    if plan.unreadable:
        doomed, leftovers = set(), set()
    planned = sweep(plan.dirs, doomed, leftovers)
    problems: dict[str, str] = {}
    locked: dict[str, str] = {}
    failed: dict[str, str] = {}
    if not dry_run:
        planned, problems, locked = _keep_locked(repo, plan, doomed, leftovers, workers)
        doomed = set(planned.manifests)
        not_deleted = repo.delete_many(planned.manifests.values())
        for sid, key in planned.manifests.items():
            if key in not_deleted:
                problems[sid] = f"could not delete: {not_deleted[key]}"
                doomed.discard(sid)  # it still exists: what it refers to stays
        planned = sweep(plan.dirs, doomed, leftovers)
        failed = repo.delete_many(key for keys in planned.objects.values() for key in keys
                                  if key not in locked)

    rows: list[dict[str, object]] = []
    for decision in plan.decisions:
        backup = decision.backup
        action, reason = "keep", decision.reason
        if decision.delete and plan.unreadable:
            reason += f"; kept while the manifest of {plan.unreadable[0]} is unreadable"
        elif decision.delete:
            problem = problems.get(backup.backup_id)
            if problem is None:
                note, problem = _objects_note(planned, backup.backup_id, locked, failed, dry_run)
                reason += f"; manifest {'to delete' if dry_run else 'deleted'}, {note}"
            action = _outcome(dry_run, problem)
            reason = f"{reason}; {problem}" if problem else reason
        rows.append(_row(STORAGE, backup.backup_id, backup.group, backup.tier, action, reason,
                         backup.finished))
    for sid in sorted(leftovers):
        if not planned.objects[sid]:
            continue  # only objects a remaining snapshot refers to: nothing to do
        note, problem = _objects_note(planned, sid, locked, failed, dry_run)
        rows.append(_row(STORAGE, sid, plan.bucket, parse_backup_id(sid).tier,
                         "would delete" if dry_run else "failed" if problem else "deleted",
                         f"no manifest (pruned or interrupted) since {iso(plan.dirs[sid].newest)}; {note}"
                         + (f"; {problem}" if problem else "")))
    rows += _abort_stale(repo, STORAGE, plan.stale_uploads, dry_run)
    for sid in plan.unreadable:
        rows.append(_row(STORAGE, sid, plan.bucket, parse_backup_id(sid).tier, "keep",
                         "manifest unreadable: left for an operator to inspect (nothing of the bucket "
                         "is deleted meanwhile: it may refer to any object)"))
    return rows


def prune_set(repo: Repository, area: str, name: str, now: datetime, policy: Policy,
              tier: str | None = None, dry_run: bool = False) -> list[dict[str, object]]:
    """Retention for one set: a database, the files backups of one name, or the storage
    snapshots of one bucket. The caller holds the set's lock (pgdr.catalog.locks) unless dry_run."""
    if area == STORAGE:
        return apply_storage_plan(repo, plan_storage_prune(repo, name, now, policy, tier), dry_run)
    if area == PITR:
        return prune_pitr(repo, name, now, policy, tier, dry_run)
    plan = (plan_prune if area == DATABASE else plan_files_prune)(repo, name, now, policy, tier)
    return apply_plan(repo, plan, dry_run)


def list_sets(repo: Repository, area: str) -> list[str]:
    """The databases, files-backup names or snapshotted buckets in the repository."""
    return {DATABASE: list_databases, FILES: files_manifest.list_names, STORAGE: list_buckets,
            PITR: list_pitr_sets}[area](repo)



# --- point-in-time recovery: base backups and the WAL they need ---------------------------------
#
# Base backups are chosen by pgdr.catalog.policy.choose_base_backups; archived WAL older than the
# oldest base backup that remains is deleted (a kept chain's full is the oldest of its chain).


def list_pitr_sets(repo: Repository) -> list[str]:
    """The databases with base backups or archived WAL."""
    return [name for name in list_databases(repo)
            if {BASE_AREA, wal.WAL_AREA} & set(repo.list_dirs(f"{database_component(name)}/"))]


def scan_base_backups(repo: Repository, database: str) -> tuple[list[StoredBackup], list[StoredBackup]]:
    """scan_backups of a database's base backups (`<db>/base/<YYYY>/<MM>/<DD>/<backup_id>/<file>`)."""
    return scan_backups(repo, f"{database_component(database)}/{BASE_AREA}", database, BaseManifest,
                        tiered=False)


def plan_pitr_prune(repo: Repository, database: str, now: datetime, policy: Policy,
                    tier: str | None = None, grace: timedelta = DEFAULT_GRACE) -> PrunePlan:
    """What pruning the database's base backups would do (the WAL follows them)."""
    return _plan(repo, PITR, f"{database_component(database)}/{BASE_AREA}", scan_base_backups(repo, database),
                 now, policy, tier, grace, choose_base_backups)


def prune_archived_wal(repo: Repository, database: str, remaining: list[BaseManifest],
                       dry_run: bool) -> list[dict[str, object]]:
    """Delete the archived WAL older than the oldest remaining base backup: one report row."""
    names = walarchive.prunable_segments((f.name for f in walarchive.archived_files(repo, database)),
                                         (b.start_wal_file for b in remaining))
    if not names:
        return []
    oldest = min(remaining, key=lambda b: (wal.segment_position(b.start_wal_file), b.backup_id))
    problem = None
    if not dry_run:
        failed = list(walarchive.delete_archived(repo, database, names).values())
        if failed:
            problem = f"{len(failed)} not deleted ({failed[0]}): the next prune retries"
    reason = (f"{len(names)} archived WAL files before {oldest.start_wal_file}, where the oldest "
              f"remaining base backup {oldest.backup_id} starts" + (f"; {problem}" if problem else ""))
    return [_row(PITR, f"wal {names[0]}..{names[-1]}", database, None, _outcome(dry_run, problem), reason)]


def prune_pitr(repo: Repository, database: str, now: datetime, policy: Policy, tier: str | None = None,
               dry_run: bool = False) -> list[dict[str, object]]:
    """Retention for a database's base backups, then its archived WAL. The WAL goes only
    once the backups are decided and deleted, and only before the oldest one that is still
    there (a backup that could not be deleted keeps its WAL); nothing goes while a base
    backup's manifest is unreadable (it may need any of it)."""
    plan = plan_pitr_prune(repo, database, now, policy, tier)
    rows = apply_plan(repo, plan, dry_run)
    if plan.unreadable:
        return rows
    gone = {r["backup_id"] for r in rows if r["action"] in ("deleted", "would delete")}
    remaining = [s.manifest for s in scan_base_backups(repo, database)[0]
                 if s.manifest and s.manifest.backup_id not in gone]
    return rows + prune_archived_wal(repo, database, remaining, dry_run)
