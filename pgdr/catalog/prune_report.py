"""The prune report's rows (the `--json` contract) and what every area's retention shares
to write them: the areas, the outcome of a deletion, stale uploads aborted, and the backup
ids recognised in a listing."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pgdr.catalog.catalog import iso, parse_backup_id
from pgdr.ops.errors import PgdrError
from pgdr.storage.repository import IncompleteUpload, Repository

DATABASE, FILES, STORAGE = "database", "files", "storage"
# Point-in-time recovery: base backups and the archived WAL of a database (named by it).
PITR = "pitr"
AREAS = (DATABASE, FILES, STORAGE, PITR)


def is_backup_id(value: str) -> bool:
    """Whether a name found in a listing is a backup id pgdr writes (anything else is left alone)."""
    try:
        parse_backup_id(value)
    except PgdrError:
        return False
    return True


def report_row(area: str, backup_id: str, group: str | None, tier: str | None, action: str, reason: str,
               finished: datetime | None = None, verified: bool | None = None) -> dict[str, object]:
    """One line of the prune report (the `--json` contract)."""
    return {"backup_id": backup_id, "area": area, "database": group, "tier": tier,
            "finished_at": iso(finished) if finished else None, "verified": verified,
            "action": action, "reason": reason}


SAFETY_DATABASE = "safety-database"


def safety_database_row(database: Any, action: str, reason: str) -> dict[str, object]:
    """The prune report's row for a safety database (pgdr.restore.tags.SafetyDatabase)."""
    try:
        at = datetime.fromisoformat(database.at.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        at = None
    return report_row(SAFETY_DATABASE, database.name, database.of, database.role, action, reason, at)


def safety_databases_unchecked_row(server: str, problem: str) -> dict[str, object]:
    """The prune report's row when the server's safety databases could not be looked at."""
    return report_row(SAFETY_DATABASE, server, None, None, "failed",
                      f"safety databases not checked: {problem}")


def deletion_outcome(dry_run: bool, problem: str | None) -> str:
    """The report's action for a deletion: planned (dry run), done, or kept by a lock or an error."""
    if dry_run:
        return "would delete"
    return "deleted" if problem is None else "locked" if problem.startswith("locked") else "failed"


def abort_stale_uploads(repo: Repository, area: str, uploads: list[IncompleteUpload],
                        dry_run: bool) -> list[dict[str, object]]:
    """Abort the uploads that never completed (or only describe it): one report row each."""
    rows = []
    for upload in uploads:
        problem = None
        if not dry_run:
            try:
                repo.abort_upload(upload)
            except PgdrError as exc:
                problem = str(exc)
        rows.append(report_row(area, upload.key, None, None,
                               "would abort" if dry_run else "aborted" if problem is None else "failed",
                               f"upload started {iso(upload.started)} never completed"
                               + (f"; {problem}" if problem else "")))
    return rows

