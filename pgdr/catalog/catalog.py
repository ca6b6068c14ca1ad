"""The backup catalog: key layout, backup ids, manifests, and finding backups.

A backup exists when its manifest exists: the manifest is written last, so a killed
backup never looks complete. Verification results go to `verified.json` beside it,
so the manifest is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Self, TypeVar
from urllib.parse import quote, unquote

from pgdr.ops.errors import ConfigError, IntegrityError, NotFoundError, PgdrError
from pgdr.ops.settings import check_tier
from pgdr.storage.repository import ObjectInfo, Repository, validate_key

MANIFEST = "manifest.json"
DUMP = "dump.pgdr"
VERIFIED = "verified.json"
# Top-level areas that are not databases.
RESERVED_AREAS = frozenset({"audit", "drills", "locks", "files", "storage"})
# Per-database areas that are not backup tiers.
NON_TIER_AREAS = frozenset({"wal", "base"})

# Tiers of safety copies pgdr takes itself (of the database a restore replaces): restored
# by id or by `pgdr rollback`, never as `latest`.
SAFETY_TIERS = frozenset({"pre-restore"})

_BACKUP_ID = re.compile(r"^(\d{8}T\d{6}Z)-([a-z][a-z-]*[a-z])-([0-9a-f]{4,32})$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def new_backup_id(now: datetime, tier: str) -> str:
    """`20260128T020000Z-daily-3f2a`: sorts by time, names its tier, unique."""
    check_tier(tier)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{tier}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class BackupId:
    value: str
    started: datetime
    tier: str


def parse_backup_id(value: str) -> BackupId:
    match = _BACKUP_ID.match(value or "")
    if not match:
        raise ConfigError(f"{value!r} is not a backup id (like 20260128T020000Z-daily-3f2a)")
    started = datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return BackupId(value, started, check_tier(match.group(2)))


def database_component(name: str) -> str:
    """A database name as one key component (percent-encoded where it has to be)."""
    if not name:
        raise ConfigError("empty database name")
    encoded = quote(name, safe="")
    if encoded in (".", "..") or encoded in RESERVED_AREAS:
        encoded = "".join(f"%{ord(c):02X}" for c in encoded[:1]) + encoded[1:]
    return encoded


def database_from_component(component: str) -> str:
    return unquote(component)


def dated_prefix(root: str, backup_id: str, *, tiered: bool = True) -> str:
    """`<root>[/<tier>]/<YYYY>/<MM>/<DD>/<backup_id>` (no trailing slash): where a backup
    lies, by its tier (when the area has tiers) and the day it started."""
    parsed = parse_backup_id(backup_id)
    day = parsed.started
    tier = f"{parsed.tier}/" if tiered else ""
    return validate_key(f"{root}/{tier}{day:%Y}/{day:%m}/{day:%d}/{backup_id}")


def backup_prefix(database: str, backup_id: str) -> str:
    """`<database>/<tier>/<YYYY>/<MM>/<DD>/<backup_id>` (no trailing slash)."""
    return dated_prefix(database_component(database), backup_id)


class StoredManifest:
    """What every kind of manifest shares (database backups, files backups, storage
    snapshots, base backups): a dataclass of its kind's fields, stored as sorted JSON at
    `<prefix>/manifest.json`, written last (what makes a backup complete), and read back
    keeping the fields its kind knows: a field added later has a default, so manifests
    written before it still read. A kind names its prefix and extends `check`."""

    KIND: ClassVar[str] = "manifest"  # how errors name it
    # Fields every kind has (declared by each kind's dataclass; a property may stand for one).
    backup_id: str
    finished_at: str

    @property
    def prefix(self) -> str:
        raise NotImplementedError

    @property
    def manifest_key(self) -> str:
        return f"{self.prefix}/{MANIFEST}"

    @property
    def finished(self) -> datetime:
        return parse_iso(self.finished_at)

    def belongs_at(self, prefix: str) -> bool:
        """Whether the manifest describes the backup at prefix (one moved or copied over
        another backup's, or another database's, must never be trusted)."""
        try:
            return self.manifest_key == f"{prefix}/{MANIFEST}"
        except PgdrError:  # names that make no key describe no backup
            return False

    def check(self) -> None:
        """ConfigError unless what names the backup is valid."""
        parse_backup_id(self.backup_id)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        try:
            raw = json.loads(data)
            manifest = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})  # type: ignore[attr-defined]
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"unreadable {cls.KIND}: {exc}") from None
        manifest.check()
        return manifest

    @classmethod
    def read(cls, repo: Repository, key: str) -> Self:
        return cls.from_json(repo.get_bytes(key))

    def write(self, repo: Repository) -> str:
        """Store the manifest (last: it completes the backup); returns its key."""
        repo.put_bytes(self.manifest_key, self.to_json())
        return self.manifest_key


class _Located:
    """Where a backup's objects are, and its times, from its database, id and timestamps:
    shared by a manifest and the catalog's summary of one."""

    backup_id: str
    database: str
    tier: str
    finished_at: str
    snapshot_at: str
    size_bytes: int
    encrypted: bool

    @property
    def prefix(self) -> str:
        return backup_prefix(self.database, self.backup_id)

    @property
    def manifest_key(self) -> str:
        return f"{self.prefix}/{MANIFEST}"

    @property
    def verified_key(self) -> str:
        return f"{self.prefix}/{VERIFIED}"

    @property
    def finished(self) -> datetime:
        return parse_iso(self.finished_at)

    @property
    def snapshot(self) -> datetime:
        return parse_iso(self.snapshot_at)

    def summary(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id,
            "database": self.database,
            "tier": self.tier,
            "finished_at": self.finished_at,
            "size_bytes": self.size_bytes,
            "encrypted": self.encrypted,
        }


@dataclass
class Manifest(_Located, StoredManifest):
    backup_id: str
    database: str
    tier: str
    started_at: str
    finished_at: str
    snapshot_at: str
    server_version: str
    tool_version: str
    format: str
    compression: str
    encryption: dict[str, str] | None
    size_bytes: int
    dump_bytes: int
    sha256: str
    row_counts: dict[str, int]
    wal_lsn_start: str | None
    source: str
    data_key: str
    extra: dict[str, Any] = field(default_factory=dict)
    # Partitioned tables of the snapshot and the partitions that hold their rows.
    partitioned: dict[str, list[str]] = field(default_factory=dict)
    # The database itself (owner, ACL, settings, comment: pgdr/postgres/database.py), taken in the snapshot.
    database_properties: dict[str, Any] | None = None
    # The roles and tablespaces the database refers to (pgdr/postgres/database.py).
    globals: dict[str, Any] | None = None
    # Each table's content digest (pgdr.postgres.postgres.digest_select), taken with the row counts.
    digests: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The sha256 of the stored bytes this manifest was read from (from_json), not a field:
        # a verification names the manifest it verified without reading it again. None for a
        # manifest built in memory.
        self.read_sha256: str | None = None

    @property  # what _Located declares as a field, derived here from the encryption
    def encrypted(self) -> bool:  # type: ignore[override]
        return self.encryption is not None

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        manifest = super().from_json(data)
        manifest.read_sha256 = hashlib.sha256(data).hexdigest()
        return manifest


def backup_time(manifest: Any) -> datetime:
    """When a backup's data is from, by the database server's clock (its snapshot): what
    backups are ordered and aged by, whatever the clock of the host that took them. Kinds
    of manifest without a snapshot time use their finished time."""
    return manifest.snapshot if getattr(manifest, "snapshot_at", None) else manifest.finished


def backup_order(manifest: Any) -> tuple[datetime, str]:
    """The one sort key of backups (what "newer" means): oldest first by server time, then id."""
    return (backup_time(manifest), manifest.backup_id)


def clock_skew_seconds(manifest: Manifest) -> float:
    """How far the backing-up host's clock was ahead of the server's (negative: behind):
    its start time against the server's snapshot time, taken a moment later."""
    return (parse_iso(manifest.started_at) - manifest.snapshot).total_seconds()


def clock_warning(manifest: Manifest, max_skew_seconds: float) -> str | None:
    skew = clock_skew_seconds(manifest)
    if abs(skew) <= max_skew_seconds:
        return None
    way = "ahead of" if skew > 0 else "behind"
    return (f"the clock of the host that took {manifest.backup_id} was {abs(skew):.0f} s {way} the "
            f"database server's (more than {max_skew_seconds:g} s): pgdr orders and ages backups by the "
            f"server's time, fix the host's clock (NTP)")


# A manifest or the catalog's summary of one: the rules below read only what both hold.
Backup = TypeVar("Backup", bound="_Located")


def is_safety_copy(manifest: _Located) -> bool:
    return manifest.tier in SAFETY_TIERS


def regular_backups(backups: list[Backup]) -> list[Backup]:
    """The backups of the regular tiers (no safety copies), oldest first."""
    return sorted((m for m in backups if not is_safety_copy(m)), key=backup_order)


def newest_regular_backup(backups: list[Backup]) -> Backup | None:
    """What `latest` means for every command and flow: the newest complete backup of the
    regular tiers. A safety copy (`pre-restore`) holds the state a restore replaced, often
    the very damage being repaired: it is never `latest`."""
    regular = regular_backups(backups)
    return regular[-1] if regular else None


@dataclass(frozen=True)
class DamagedBackup:
    """A backup whose manifest cannot be read or does not belong where it lies: listed (its
    key named), never restored."""

    database: str
    backup_id: str
    tier: str
    key: str
    reason: str

    def summary(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "database": self.database, "tier": self.tier,
                "damaged": True, "key": self.key, "reason": self.reason}


def read_manifest(repo: Repository, key: str) -> Manifest:
    """The manifest stored at key: ConfigError naming the key when it cannot be read, and
    IntegrityError unless it describes that very location (a manifest copied over another
    backup's, or another database's, must never be trusted)."""
    return manifest_at(key, repo.get_bytes(key))


def manifest_at(key: str, data: bytes) -> Manifest:
    """The manifest in data, read from key: read_manifest's checks."""
    try:
        manifest = Manifest.from_json(data)
    except ConfigError as exc:
        raise ConfigError(f"damaged manifest {key}: {exc}") from None
    data_key = manifest.data_key
    if manifest.manifest_key != key or not data_key or "/" in data_key or data_key in (
            ".", "..", MANIFEST, VERIFIED):
        raise IntegrityError(
            f"the manifest at {key} does not belong there: it describes backup {manifest.backup_id} of "
            f"{manifest.database} (data {data_key!r}): it was moved or tampered with; nothing is restored "
            "from it")
    return manifest


def list_databases(repo: Repository) -> list[str]:
    return [database_from_component(name) for name in repo.list_dirs("")
            if name not in RESERVED_AREAS]


@dataclass
class Catalog:
    """What a listing of the repository found: complete backups (oldest first), damaged
    ones, the storage class of each backup's data (None where the store has none), and the
    keys of the verification records that exist."""

    backups: list[Any]
    damaged: list[DamagedBackup]
    storage_classes: dict[str, str | None]
    verified: set[str] = field(default_factory=set)


@dataclass
class _Listing:
    """The keys of one database's backups: manifests (tier, object), data storage classes,
    verification records."""

    manifests: list[tuple[str, ObjectInfo]]
    storage_classes: dict[str, str | None]
    verified: set[str]


def _list_database(repo: Repository, database: str) -> _Listing:
    listing = _Listing([], {}, set())
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


def _damaged(database: str, tier: str, key: str, error: PgdrError) -> DamagedBackup:
    return DamagedBackup(database, key.split("/")[-2], tier, key, str(error))


def _catalog(found: list[Any], damaged: list[DamagedBackup], listings: list[_Listing]) -> Catalog:
    return Catalog(sorted(found, key=backup_order), sorted(damaged, key=lambda d: d.key),
                   {k: v for listing in listings for k, v in listing.storage_classes.items()},
                   {k for listing in listings for k in listing.verified})


def scan_backups(repo: Repository, database: str | None = None) -> Catalog:
    """Every complete backup (it has a manifest), each manifest read whole, and, apart,
    those whose manifest cannot be read: one damaged manifest never hides the rest."""
    manifests, damaged, listings = [], [], []
    for db in [database] if database else list_databases(repo):
        listing = _list_database(repo, db)
        listings.append(listing)
        keys = [info.key for _, info in listing.manifests]
        for (tier, info), read in zip(listing.manifests, read_manifests(repo, keys), strict=True):
            if isinstance(read, PgdrError):
                damaged.append(_damaged(db, tier, info.key, read))
            else:
                manifests.append(read)
    return _catalog(manifests, damaged, listings)


def list_backups(repo: Repository, database: str | None = None) -> list[Manifest]:
    """Every complete backup with a readable manifest, oldest first."""
    return scan_backups(repo, database).backups


MANIFEST_READERS = 16


def _read_concurrently(read: Callable[[str], Any], keys: list[str]) -> list[Any]:
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

    return _read_concurrently(read, keys)


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


# --- the catalog index ----------------------------------------------------------------------
#
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
class BackupEntry(_Located):
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
    listing: _Listing
    index: _Index


def _catalog_of(repo: Repository, database: str) -> _DatabaseCatalog:
    """One database's backups: its keys listed, the index read, and only the manifests the
    index does not hold (in that version) read."""
    listing = _list_database(repo, database)
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
    for (tier, key), read_back in zip(unread, _read_concurrently(read, [k for _, k in unread]), strict=True):
        if isinstance(read_back, PgdrError):
            damaged.append(_damaged(database, tier, key, read_back))
        else:
            entries.append(read_back)
    return _DatabaseCatalog(entries, damaged, listing, index)


def scan_catalog(repo: Repository, database: str | None = None) -> Catalog:
    """scan_backups with BackupEntry summaries in place of whole manifests, from the index
    where it holds them: the same backups and damaged ones, in the same order."""
    entries, damaged, listings = [], [], []
    for db in [database] if database else list_databases(repo):
        found = _catalog_of(repo, db)
        entries += found.entries
        damaged += found.damaged
        listings.append(found.listing)
    return _catalog(entries, damaged, listings)


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


def find_backup(repo: Repository, backup_id: str, database: str | None = None) -> Manifest:
    parse_backup_id(backup_id)
    databases = [database] if database else list_databases(repo)
    for db in databases:
        key = f"{backup_prefix(db, backup_id)}/{MANIFEST}"
        if repo.head(key):
            return read_manifest(repo, key)
    raise NotFoundError(f"backup {backup_id} not found in {repo.url}")


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


def read_verification(repo: Repository, manifest: Manifest | BackupEntry) -> dict[str, Any] | None:
    if not repo.head(manifest.verified_key):
        return None
    return json.loads(repo.get_bytes(manifest.verified_key))


def append_verification(repo: Repository, manifest: Manifest, result: dict[str, Any]) -> None:
    """Add one verification result, passed or failed (`success`, `at`, and `reason` when it
    failed), to the backup's history; the newest result is the backup's state."""
    try:
        history = read_verification(repo, manifest)
    except ValueError:
        history = None  # an unreadable history is replaced by what is known now
    history = history or {"backup_id": manifest.backup_id, "results": []}
    history["results"].append(result)
    history["verified"] = result["success"]
    history["last_verified_at"] = result["at"]
    history["reason"] = None if result["success"] else result.get("reason")
    if "manifest_sha256" in result:
        history["manifest_sha256"] = result["manifest_sha256"]
    write_verification(repo, manifest, history)


VERIFIED_STATE, FAILED_STATE, NEVER_STATE = "verified", "failed", "never verified"


def verification_state(history: dict[str, Any] | None) -> tuple[str, str | None, str | None]:
    """(state, when, reason) of a backup from its verification history: its newest result."""
    if not history or "verified" not in history:
        return NEVER_STATE, None, None
    if history["verified"] is True:
        return VERIFIED_STATE, history.get("last_verified_at"), None
    return FAILED_STATE, history.get("last_verified_at"), history.get("reason") or "verification failed"


def write_verification(repo: Repository, manifest: Manifest, result: dict[str, Any]) -> None:
    repo.put_bytes(manifest.verified_key, json.dumps(result, indent=2, sort_keys=True).encode())
