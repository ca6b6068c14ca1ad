"""Retention of storage snapshots, whose objects are shared between snapshots: deleting one
removes only the objects that no remaining snapshot refers to (`sweep`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from pgdr.catalog.catalog import MANIFEST, iso, parse_backup_id
from pgdr.catalog.policy import DEFAULT_GRACE, BackupFacts, Decision, Policy, choose, is_stale
from pgdr.catalog.prune_report import STORAGE, abort_stale_uploads, deletion_outcome, is_backup_id, report_row
from pgdr.ops.errors import PgdrError
from pgdr.storage.repository import IncompleteUpload, Repository
from pgdr.storage.storage import StorageManifest, bucket_area, referenced_keys


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
        if not is_backup_id(snapshot_id):
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
            action = deletion_outcome(dry_run, problem)
            reason = f"{reason}; {problem}" if problem else reason
        rows.append(report_row(STORAGE, backup.backup_id, backup.group, backup.tier, action, reason,
                               backup.finished))
    for sid in sorted(leftovers):
        if not planned.objects[sid]:
            continue  # only objects a remaining snapshot refers to: nothing to do
        note, problem = _objects_note(planned, sid, locked, failed, dry_run)
        rows.append(report_row(STORAGE, sid, plan.bucket, parse_backup_id(sid).tier,
                               "would delete" if dry_run else "failed" if problem else "deleted",
                               f"no manifest (pruned or interrupted) since "
                               f"{iso(plan.dirs[sid].newest)}; {note}" + (f"; {problem}" if problem else "")))
    rows += abort_stale_uploads(repo, STORAGE, plan.stale_uploads, dry_run)
    for sid in plan.unreadable:
        rows.append(report_row(STORAGE, sid, plan.bucket, parse_backup_id(sid).tier, "keep",
                               "manifest unreadable: left for an operator to inspect (nothing of the bucket "
                               "is deleted meanwhile: it may refer to any object)"))
    return rows
