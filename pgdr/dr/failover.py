"""What a failover restores, and where it may point clients: the choices a failover and
the drill that rehearses it make the same way.

The backup: the newest complete backup in the DR repository whose stored bytes match
their checksum (`pre-restore` safety copies are never chosen unless pinned). A verification
recorded in that repository is shown as evidence, never used as a filter: a drill writes
verifications, and filtering on them would make a failover skip the newest backups. A
backup older than the allowed age is refused before anything changes.

The record: it must name the host of the database that passed the health checks.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pgdr.catalog import catalog, verification
from pgdr.catalog.index import resolve_backup
from pgdr.catalog.scan import find_backup, list_backups
from pgdr.ops.errors import ConfigError, IntegrityError, NotFoundError, PgdrError
from pgdr.storage.repository import Repository

# Safety copies taken just before a restore: the database a restore replaced, never a
# backup of the primary.
NEVER_CHOSEN_TIERS = frozenset({"pre-restore"})
DEFAULT_MAX_BACKUP_AGE_HOURS = 26.0


class StaleBackup(ConfigError):
    """The chosen backup is older than a failover may restore without being told to."""


@dataclass(frozen=True)
class Choice:
    manifest: catalog.Manifest
    age_seconds: float
    verification: dict[str, Any] | None = None  # the repository's verified.json, as evidence
    skipped: list[str] = field(default_factory=list)  # newer backups passed over, and why

    @property
    def evidence(self) -> str:
        """How far this backup is known good, for the report."""
        found = self.verification or {}
        if found.get("verified") is True:
            return f"checksum ok; restore verified {found.get('last_verified_at', '')}".rstrip()
        if found.get("verified") is False:
            return "checksum ok; its last restore test FAILED"
        return "checksum ok; restore never tested in this repository"

    def to_dict(self) -> dict[str, Any]:
        return {"backup_id": self.manifest.backup_id, "database": self.manifest.database,
                "tier": self.manifest.tier, "snapshot_at": self.manifest.snapshot_at,
                "age_hours": round(self.age_seconds / 3600, 3), "evidence": self.evidence,
                "verified": (self.verification or {}).get("verified"), "skipped": list(self.skipped)}


def check_age(manifest: catalog.Manifest, now: datetime, max_age_hours: float, accept_stale: bool) -> float:
    """The backup's age (from its snapshot) in seconds; StaleBackup when it is older than
    allowed and the operator did not accept that."""
    if max_age_hours <= 0:
        raise ConfigError("--max-backup-age-hours must be more than zero")
    age = (now - manifest.snapshot).total_seconds()
    if age > max_age_hours * 3600 and not accept_stale:
        raise StaleBackup(
            f"the newest usable backup {manifest.backup_id} is {age / 3600:.1f} h old (more than "
            f"{max_age_hours:g} h): restoring it would lose everything since {manifest.snapshot_at}; "
            "pass --accept-stale to restore it anyway, or --backup ID to pin one")
    return age


def choose_backup(repository: Repository, database: str | None, now: datetime, *,
                  backup_id: str | None = None, max_age_hours: float = DEFAULT_MAX_BACKUP_AGE_HOURS,
                  accept_stale: bool = False, target_database: str | None = None) -> Choice:
    """The backup a failover restores (see the module's docstring); `backup_id` pins one,
    which must still pass its checksum. Without `database`, the repository's only one, or
    the one named like `target_database`. Nothing is changed anywhere."""
    if backup_id:
        candidates = [find_backup(repository, backup_id, database)]
    else:
        database = database or resolve_backup(repository, "latest", None, target_database).database
        candidates = [m for m in reversed(list_backups(repository, database))
                      if m.tier not in NEVER_CHOSEN_TIERS]
        if not candidates:
            raise NotFoundError(f"no backup of {database} in {repository.url}")
    skipped: list[str] = []
    for manifest in candidates:
        try:
            repository.verify(f"{manifest.prefix}/{manifest.data_key}", manifest.size_bytes, manifest.sha256)
        except (IntegrityError, NotFoundError) as exc:
            if backup_id:
                raise
            skipped.append(f"{manifest.backup_id}: {exc}")
            continue
        age = check_age(manifest, now, max_age_hours, accept_stale)
        return Choice(manifest, age, verification.read_verification(repository, manifest), skipped)
    raise IntegrityError(f"no backup of {database} in {repository.url} passes its checksum "
                         f"({len(skipped)} tried)")


# --- where the record may point -------------------------------------------------------------


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host.rstrip("."), None)}
    except (OSError, UnicodeError):
        return set()


def names_host(record_value: str, host: str) -> bool:
    """Whether a DNS record value names `host`: the same name, or a name that resolves
    here to an address of that host."""
    value, wanted = record_value.rstrip(".").lower(), host.rstrip(".").lower()
    return value == wanted or bool(_addresses(value) & _addresses(wanted))


def check_record_value(record_value: str | None, checked_host: str | None, forced: bool) -> str:
    """The value the record is switched to: `checked_host` (the host of the database that
    passed the health checks) unless another value is given, which must name that host
    too, or be forced."""
    if record_value and forced:
        return record_value
    if not checked_host or checked_host.startswith("/"):
        raise PgdrError("the DR database was reached through a local socket, which no DNS record can name: "
                        "pass its host name with --record-value and --force-record-value")
    if not record_value:
        return checked_host
    if names_host(record_value, checked_host):
        return record_value
    raise PgdrError(f"--record-value {record_value} does not name {checked_host}, the database that passed "
                    "the health checks; pass --force-record-value to point the record there anyway")
