"""The catalog index: `<database>/index.json`, a summary of each manifest, so that listing
backups reads only the manifests that changed; and resolving `latest` with it."""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from pgdr.catalog.catalog import (
    DamagedBackup,
    Located,
    Manifest,
    backup_order,
    database_component,
    manifest_at,
    newest_regular_backup,
    parse_backup_id,
    regular_backups,
)
from pgdr.catalog.scan import (
    Catalog,
    Listing,
    assemble_catalog,
    damaged_backup,
    find_backup,
    list_backups,
    list_database,
    list_databases,
    read_concurrently,
)
from pgdr.ops.errors import ConfigError, IntegrityError, NotFoundError, PgdrError
from pgdr.storage.repository import Repository, validate_key

# `<database>/index.json` holds a summary of each manifest a backup of the database saw,
# bound to the version of the manifest object it was made from (its tag: S3 ETag, file
# inode and mtime). It only saves reads: a listing of the keys always decides what exists,
# an entry is used only while its manifest is still that very version (otherwise the
# manifest is read), an entry whose manifest is gone is ignored, and an index that cannot
# be read is ignored whole. Restoring or verifying reads the manifest itself.

INDEX = "index.json"
INDEX_FORMAT = "pgdr-catalog-index-1"
INDEX_WRITE_ATTEMPTS = 10


def index_key(database: str) -> str:
    return validate_key(f"{database_component(database)}/{INDEX}")


@dataclass(frozen=True)
class BackupEntry(Located):
    """A complete backup as the catalog lists it: its manifest's summary, and which version
    of the manifest (object tag, sha256 of its bytes) it was taken from."""

    backup_id: str
    database: str
    tier: str
    started_at: str
    finished_at: str
    snapshot_at: str
    size_bytes: int
    dump_bytes: int
    encrypted: bool
    manifest_sha256: str
    manifest_tag: str

    @classmethod
    def of(cls, manifest: Manifest, data: bytes, tag: str) -> BackupEntry:
        """The entry of the manifest whose bytes are data, stored as version tag."""
        return cls(manifest.backup_id, manifest.database, manifest.tier, manifest.started_at,
                   manifest.finished_at, manifest.snapshot_at, manifest.size_bytes, manifest.dump_bytes,
                   manifest.encrypted, hashlib.sha256(data).hexdigest(), tag)

    @classmethod
    def from_index(cls, raw: dict[str, Any], database: str) -> BackupEntry:
        """One entry of an index: ValueError unless it is well formed and of this database."""
        entry = cls(**raw)
        types = {name: int if name.endswith("_bytes") else bool if name == "encrypted" else str
                 for name in cls.__dataclass_fields__}
        if any(type(getattr(entry, name)) is not kind for name, kind in types.items()):
            raise ValueError("an entry's field has the wrong type")
        if entry.database != database or parse_backup_id(entry.backup_id).tier != entry.tier:
            raise ValueError(f"entry {entry.backup_id} does not belong to this index")
        backup_order(entry)  # its times parse
        return entry


@dataclass
class _Index:
    entries: dict[str, BackupEntry]  # by manifest key
    tag: str | None  # the index object's version; None: there is none
    readable: bool


def read_index(repo: Repository, database: str) -> _Index:
    """The database's index; empty when there is none, and ignored whole when damaged."""
    try:
        data, tag = repo.get_tagged(index_key(database))
    except NotFoundError:
        return _Index({}, None, True)
    try:
        raw = json.loads(data)
        if raw["format"] != INDEX_FORMAT or raw["database"] != database:
            raise ValueError("not this database's index")
        entries = [BackupEntry.from_index(item, database) for item in raw["backups"]]
    except (ValueError, TypeError, KeyError, AttributeError, PgdrError):
        return _Index({}, tag, False)
    return _Index({entry.manifest_key: entry for entry in entries}, tag, True)


def _index_bytes(database: str, entries: list[BackupEntry]) -> bytes:
    return json.dumps({"format": INDEX_FORMAT, "database": database,
                       "backups": [asdict(e) for e in sorted(entries, key=lambda e: e.manifest_key)]},
                      separators=(",", ":"), sort_keys=True).encode()


def read_entry(repo: Repository, key: str) -> tuple[Manifest, BackupEntry]:
    """The manifest at key (read_manifest's checks) and its entry."""
    data, tag = repo.get_tagged(key)
    manifest = manifest_at(key, data)
    return manifest, BackupEntry.of(manifest, data, tag or "")


@dataclass
class _DatabaseCatalog:
    entries: list[BackupEntry]
    damaged: list[DamagedBackup]
    listing: Listing
    index: _Index


def _catalog_of(repo: Repository, database: str) -> _DatabaseCatalog:
    """One database's backups: its keys listed, the index read, and only the manifests the
    index does not hold (in that version) read."""
    listing = list_database(repo, database)
    index = read_index(repo, database)
    entries, unread = [], []
    for tier, info in listing.manifests:
        entry = index.entries.get(info.key)
        if entry is not None and info.tag is not None and entry.manifest_tag == info.tag:
            entries.append(entry)
        else:
            unread.append((tier, info.key))

    def read(key: str) -> BackupEntry | PgdrError:
        try:
            return read_entry(repo, key)[1]
        except (ConfigError, IntegrityError) as exc:
            return exc

    damaged = []
    for (tier, key), read_back in zip(unread, read_concurrently(read, [k for _, k in unread]), strict=True):
        if isinstance(read_back, PgdrError):
            damaged.append(damaged_backup(database, tier, key, read_back))
        else:
            entries.append(read_back)
    return _DatabaseCatalog(entries, damaged, listing, index)


def scan_catalog(repo: Repository, database: str | None = None) -> Catalog[BackupEntry]:
    """scan_backups with BackupEntry summaries in place of whole manifests, from the index
    where it holds them: the same backups and damaged ones, in the same order."""
    entries, damaged, listings = [], [], []
    for db in [database] if database else list_databases(repo):
        found = _catalog_of(repo, db)
        entries += found.entries
        damaged += found.damaged
        listings.append(found.listing)
    return assemble_catalog(entries, damaged, listings)


def refresh_index(repo: Repository, database: str) -> bool:
    """Bring the database's index up to date with its manifests (after a backup wrote one, or
    to rebuild a damaged index): entries of every readable manifest, none of a gone one. A
    conditional write: when another writer replaced the index meanwhile, read again and
    retry, so that no writer's entry is lost. False when every attempt lost that race."""
    for attempt in range(INDEX_WRITE_ATTEMPTS):
        if attempt:
            time.sleep(random.uniform(0, 0.05 * attempt))  # writers that collided do not collide again
        found = _catalog_of(repo, database)
        if found.index.readable and set(found.index.entries.values()) == set(found.entries):
            return True
        if repo.put_if_tag(index_key(database), _index_bytes(database, found.entries), found.index.tag):
            return True
    return False


def _confirmed_latest(repo: Repository, backups: list[BackupEntry]) -> Manifest | None:
    """newest_regular_backup of entries, read from its manifest, when the manifests agree
    with their entries: the newest one's, and those of any backup started later by its id
    (so that no entry can put an older backup before a newer one). None when any
    disagrees or cannot be read: then every manifest decides."""
    latest = newest_regular_backup(backups)
    if latest is None:
        return None
    started = parse_backup_id(latest.backup_id).started
    later = [e for e in regular_backups(backups) if parse_backup_id(e.backup_id).started > started]
    manifest = None
    for entry in [latest, *later]:
        try:
            read, real = read_entry(repo, entry.manifest_key)
        except (ConfigError, IntegrityError, NotFoundError):
            return None
        if real != entry:
            return None
        manifest = manifest or read
    return manifest


def resolve_backup(repo: Repository, selector: str, database: str | None = None,
                   target_database: str | None = None) -> Manifest:
    """A backup id, or `latest`: the newest complete backup of the regular tiers
    (newest_regular_backup) of `database`; without it, of the only database in the
    repository; with several, of the target's database name."""
    if selector != "latest":
        return find_backup(repo, selector, database)
    if database is None:
        databases = list_databases(repo)
        if len(databases) == 1:
            database = databases[0]
        elif target_database in databases:
            database = target_database
        elif not databases:
            raise NotFoundError(f"no backups in {repo.url}")
        else:
            raise ConfigError(
                f"several databases in {repo.url} ({', '.join(databases)}): name one with --db"
            )
    backups = scan_catalog(repo, database).backups
    latest = _confirmed_latest(repo, backups) or newest_regular_backup(list_backups(repo, database))
    if latest is None:
        only = " other than safety copies (restore one by its id)" if backups else ""
        raise NotFoundError(f"no backups of {database}{only} in {repo.url}")
    return latest
