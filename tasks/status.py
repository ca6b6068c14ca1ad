"""`pgdr status`: per database, the last backup, its age and size, and the last
verification and its result. Reads the repository only; no Prefect."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tasks import catalog
from tasks.repository import Repository

# How many recent backups to look through for the last verification.
_VERIFICATION_LOOKBACK = 10


def database_status(repo: Repository, database: str, now: datetime) -> dict[str, Any]:
    backups = catalog.list_backups(repo, database)
    entry: dict[str, Any] = {"database": database, "backups": len(backups), "last_backup": None,
                             "tier": None, "finished_at": None, "age_hours": None, "size_bytes": None,
                             "verified": None, "verified_at": None, "verified_backup": None}
    if not backups:
        return entry
    latest = backups[-1]
    entry.update(last_backup=latest.backup_id, tier=latest.tier, finished_at=latest.finished_at,
                 age_hours=round((now - catalog.backup_time(latest)).total_seconds() / 3600, 2),
                 size_bytes=latest.size_bytes)
    for manifest in reversed(backups[-_VERIFICATION_LOOKBACK:]):
        history = catalog.read_verification(repo, manifest)
        if history is not None:
            entry.update(verified=bool(history.get("verified")), verified_at=history.get("last_verified_at"),
                         verified_backup=manifest.backup_id)
            break
    return entry


def repository_status(repo: Repository, database: str | None = None,
                      now: datetime | None = None) -> dict[str, Any]:
    moment = now or catalog.utcnow()
    databases = [database] if database else catalog.list_databases(repo)
    return {"repository": repo.url, "checked_at": catalog.iso(moment),
            "databases": [database_status(repo, name, moment) for name in databases]}
