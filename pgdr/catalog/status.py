"""`pgdr status`: per database, the last backup, its age and size, its own verification
state, the newest verified backup, and damaged manifests. Reads the repository only; no
Prefect."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pgdr.catalog import catalog, verification
from pgdr.catalog.index import BackupEntry, scan_catalog
from pgdr.catalog.scan import Catalog, list_databases
from pgdr.storage.repository import Repository

# How many recent backups to look through for the newest verified one.
_VERIFICATION_LOOKBACK = 10


def _state(repo: Repository, found: Catalog[BackupEntry],
           manifest: BackupEntry | catalog.Manifest) -> tuple[str, str | None, str | None]:
    if manifest.verified_key not in found.verified:
        return verification.NEVER_STATE, None, None  # the listing has no record: nothing to read
    try:
        return verification.verification_state(verification.read_verification(repo, manifest))
    except ValueError:
        return verification.FAILED_STATE, None, f"unreadable {catalog.VERIFIED} of {manifest.backup_id}"


def database_status(repo: Repository, database: str, now: datetime) -> dict[str, Any]:
    found = scan_catalog(repo, database)
    backups = found.backups
    entry: dict[str, Any] = {"database": database, "backups": len(backups), "last_backup": None,
                             "tier": None, "finished_at": None, "age_hours": None, "size_bytes": None,
                             "storage_class": None, "last_backup_state": None, "last_backup_reason": None,
                             "last_backup_verified_at": None,
                             "verified": None, "verified_at": None, "verified_backup": None,
                             "damaged": [d.summary() for d in found.damaged]}
    latest = catalog.newest_regular_backup(backups)
    if latest is None:
        return entry
    state, when, reason = _state(repo, found, latest)
    entry.update(last_backup=latest.backup_id, tier=latest.tier, finished_at=latest.finished_at,
                 age_hours=round((now - catalog.backup_time(latest)).total_seconds() / 3600, 2),
                 size_bytes=latest.size_bytes, storage_class=found.storage_classes.get(latest.backup_id),
                 last_backup_state=state, last_backup_reason=reason, last_backup_verified_at=when,
                 verified={verification.VERIFIED_STATE: True, verification.FAILED_STATE: False}.get(state))
    for manifest in reversed(catalog.regular_backups(backups)[-_VERIFICATION_LOOKBACK:]):
        state, when, _reason = _state(repo, found, manifest)
        if state == verification.VERIFIED_STATE:
            entry.update(verified_at=when, verified_backup=manifest.backup_id)
            break
    return entry


def server_safety_databases(server_url: str, of: str | None = None) -> dict[str, Any]:
    """The databases restores and rollbacks set aside on a server (full copies, dropped by
    prune after PGDR_KEEP_SAFETY_DATABASES_DAYS); an unreachable server is reported, not raised."""
    from pgdr.ops.errors import PgdrError
    from pgdr.postgres import dsn, postgres
    from pgdr.restore import restore as restoring
    from pgdr.restore import tags

    report: dict[str, Any] = {"server": dsn.display_dsn(server_url), "databases": [], "error": None}
    try:
        admin = restoring.admin_database(dsn.database_name(server_url))
        with postgres.connect(server_url, dbname=admin) as conn:
            found = tags.safety_databases(conn)
    except PgdrError as exc:
        report["error"] = str(exc)
        return report
    report["databases"] = [{"name": d.name, "of": d.of, "role": d.role, "at": d.at}
                           for d in found if of is None or d.of == of]
    return report


def repository_status(repo: Repository, database: str | None = None,
                      now: datetime | None = None, server_url: str | None = None) -> dict[str, Any]:
    moment = now or catalog.utcnow()
    databases = [database] if database else list_databases(repo)
    status: dict[str, Any] = {"repository": repo.url, "checked_at": catalog.iso(moment),
              "databases": [database_status(repo, name, moment) for name in databases]}
    if server_url:
        status["safety_databases"] = server_safety_databases(server_url, database)
    return status
