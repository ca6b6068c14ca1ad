"""The backup catalog's ground: key layout, backup ids and manifests.

pgdr.catalog.verification keeps each backup's verification history; pgdr.catalog.scan
lists and finds backups; pgdr.catalog.index keeps the per-database summary that saves
reading every manifest.

A backup exists when its manifest exists: the manifest is written last, so a killed
backup never looks complete. Verification results go to `verified.json` beside it,
so the manifest is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, TypedDict, TypeVar
from urllib.parse import quote, unquote

from pgdr.ops.errors import ConfigError, IntegrityError, PgdrError
from pgdr.ops.settings import check_tier
from pgdr.storage.repository import Repository, validate_key

if TYPE_CHECKING:
    pass

MANIFEST = "manifest.json"
DUMP = "dump.pgdr"
VERIFIED = "verified.json"
# The pgdr that wrote a manifest, recorded in it (`tool_version`).
TOOL_VERSION = "pgdr 0.1.0"
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


class BackupSummary(TypedDict):
    """A database backup in `--json` results: what `list` shows of each, and what `backup` starts with."""

    backup_id: str
    database: str
    tier: str
    finished_at: str
    size_bytes: int
    encrypted: bool


class ListedBackup(BackupSummary):
    """A backup in `list --json`: whether it is a restore's safety copy, and its storage class."""

    safety_copy: bool
    storage_class: str | None


class DamagedSummary(TypedDict):
    """A backup whose manifest cannot be trusted, in `list --json` and `status --json`."""

    backup_id: str
    database: str
    tier: str
    damaged: Literal[True]
    key: str
    reason: str


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


class Located:
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

    def summary(self) -> BackupSummary:
        return {
            "backup_id": self.backup_id,
            "database": self.database,
            "tier": self.tier,
            "finished_at": self.finished_at,
            "size_bytes": self.size_bytes,
            "encrypted": self.encrypted,
        }


@dataclass
class Manifest(Located, StoredManifest):
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

    @property  # what Located declares as a field, derived here from the encryption
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
Backup = TypeVar("Backup", bound="Located")


def is_safety_copy(manifest: Located) -> bool:
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

    def summary(self) -> DamagedSummary:
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
