"""Retention applied to a repository: which areas a prune covers, and each set's retention
handed to its area's module (database and files backups, storage snapshots, base backups and
their WAL), each of which scans, plans with pgdr.catalog.policy and deletes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from pgdr.catalog.backup_retention import apply_plan, plan_files_prune, plan_prune
from pgdr.catalog.pitr_retention import list_pitr_sets, prune_pitr
from pgdr.catalog.policy import Policy
from pgdr.catalog.prune_report import AREAS, DATABASE, FILES, PITR, STORAGE
from pgdr.catalog.scan import list_databases
from pgdr.catalog.snapshot_retention import apply_storage_plan, plan_storage_prune
from pgdr.files import manifest as files_manifest
from pgdr.ops.errors import ConfigError
from pgdr.storage.repository import Repository
from pgdr.storage.storage import list_buckets


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
