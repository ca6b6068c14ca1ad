"""Scanning the repository for backups: list every database's manifests and read them
(concurrently, a damaged one set apart), or find one backup by its id."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from pgdr.catalog.catalog import (
    DUMP,
    MANIFEST,
    NON_TIER_AREAS,
    RESERVED_AREAS,
    VERIFIED,
    DamagedBackup,
    Located,
    Manifest,
    backup_order,
    backup_prefix,
    database_component,
    database_from_component,
    parse_backup_id,
    read_manifest,
    utcnow,
)
from pgdr.ops.errors import ConfigError, IntegrityError, NotFoundError, PgdrError
from pgdr.ops.settings import check_tier
from pgdr.storage.repository import ObjectInfo, Repository


def list_databases(repo: Repository) -> list[str]:
    return [database_from_component(name) for name in repo.list_dirs("")
            if name not in RESERVED_AREAS]


BackupT = TypeVar("BackupT", bound=Located)


@dataclass
class Catalog(Generic[BackupT]):
    """What a listing of the repository found: complete backups (oldest first), damaged
    ones, the storage class of each backup's data (None where the store has none), and the
    keys of the verification records that exist."""

    backups: list[BackupT]  # whole manifests from scan_backups, index entries from scan_catalog
    damaged: list[DamagedBackup]
    storage_classes: dict[str, str | None]
    verified: set[str] = field(default_factory=set)


@dataclass
class Listing:
    """The keys of one database's backups: manifests (tier, object), data storage classes,
    verification records."""

    manifests: list[tuple[str, ObjectInfo]]
    storage_classes: dict[str, str | None]
    verified: set[str]


def list_database(repo: Repository, database: str) -> Listing:
    """The keys of one database's backups, every tier listed once (no object read)."""
    listing = Listing([], {}, set())
    db_prefix = database_component(database) + "/"
    for tier in repo.list_dirs(db_prefix):
        if tier in NON_TIER_AREAS:
            continue
        for info in repo.list(f"{db_prefix}{tier}/"):
            if info.key.endswith("/" + DUMP):
                listing.storage_classes[info.key.split("/")[-2]] = info.storage_class
            elif info.key.endswith("/" + MANIFEST):
                listing.manifests.append((tier, info))
            elif info.key.endswith("/" + VERIFIED):
                listing.verified.add(info.key)
    return listing


def damaged_backup(database: str, tier: str, key: str, error: PgdrError) -> DamagedBackup:
    """The DamagedBackup of the manifest at key, which could not be read."""
    return DamagedBackup(database, key.split("/")[-2], tier, key, str(error))


def assemble_catalog(found: list[BackupT], damaged: list[DamagedBackup],
                     listings: list[Listing]) -> Catalog[BackupT]:
    """The Catalog of what one or more database listings found, in catalog order."""
    return Catalog(sorted(found, key=backup_order), sorted(damaged, key=lambda d: d.key),
                   {k: v for listing in listings for k, v in listing.storage_classes.items()},
                   {k for listing in listings for k in listing.verified})


def scan_backups(repo: Repository, database: str | None = None) -> Catalog[Manifest]:
    """Every complete backup (it has a manifest), each manifest read whole, and, apart,
    those whose manifest cannot be read: one damaged manifest never hides the rest."""
    manifests, damaged, listings = [], [], []
    for db in [database] if database else list_databases(repo):
        listing = list_database(repo, db)
        listings.append(listing)
        keys = [info.key for _, info in listing.manifests]
        for (tier, info), read in zip(listing.manifests, read_manifests(repo, keys), strict=True):
            if isinstance(read, PgdrError):
                damaged.append(damaged_backup(db, tier, info.key, read))
            else:
                manifests.append(read)
    return assemble_catalog(manifests, damaged, listings)


def list_backups(repo: Repository, database: str | None = None) -> list[Manifest]:
    """Every complete backup with a readable manifest, oldest first."""
    return scan_backups(repo, database).backups


MANIFEST_READERS = 16


def read_concurrently(read: Callable[[str], Any], keys: list[str]) -> list[Any]:
    """read(key) of every key, on S3 many at once: each read is a round trip."""
    if len(keys) < 2:
        return [read(key) for key in keys]
    with ThreadPoolExecutor(min(MANIFEST_READERS, len(keys)), thread_name_prefix="manifests") as pool:
        return list(pool.map(read, keys))


def read_manifests(repo: Repository, keys: list[str]) -> list[Manifest | PgdrError]:
    """The manifests at keys (the error in place of a damaged or misplaced one), read
    concurrently."""

    def read(key: str) -> Manifest | PgdrError:
        try:
            return read_manifest(repo, key)
        except (ConfigError, IntegrityError) as exc:
            return exc

    return read_concurrently(read, keys)


def backups_since(repo: Repository, database: str, tier: str, since: datetime) -> list[Manifest]:
    """Complete backups of one database and tier started at `since` or later, oldest first;
    lists only the days since then and reads only those manifests."""
    found = []
    day = since.date()
    while day <= utcnow().date():
        prefix = f"{database_component(database)}/{check_tier(tier)}/{day:%Y}/{day:%m}/{day:%d}/"
        for info in repo.list(prefix):
            backup_id = info.key.removeprefix(prefix).split("/")[0]
            if info.key.endswith("/" + MANIFEST) and parse_backup_id(backup_id).started >= since:
                found.append(read_manifest(repo, info.key))
        day += timedelta(days=1)
    return sorted(found, key=backup_order)


def find_backup(repo: Repository, backup_id: str, database: str | None = None) -> Manifest:
    parse_backup_id(backup_id)
    databases = [database] if database else list_databases(repo)
    for db in databases:
        key = f"{backup_prefix(db, backup_id)}/{MANIFEST}"
        if repo.head(key):
            return read_manifest(repo, key)
    raise NotFoundError(f"backup {backup_id} not found in {repo.url}")
