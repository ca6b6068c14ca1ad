"""What the repository holds: `pgdr list` and `pgdr status`.

Monitoring runs these often: like wal-push they import no Prefect and are bound without
the command-line parser (flows.cli.main), so their options are plain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flows.cli import render
from flows.cli.common import Result, command, settings
from flows.cli.results import ListResult
from pgdr.ops.errors import PgdrError

if TYPE_CHECKING:
    from pgdr.catalog.catalog import ListedBackup
    from pgdr.pitr.basebackup import BaseBackupSummary


@command(render.show_list, runs_flow=False)
def list_(*, repo: str | None = None, db: str | None = None, json: bool = False) -> ListResult:
    """List complete backups.

    Args:
        repo: repository URL
        db: only this database (NAME)
        json: print one JSON object on stdout
    """
    from pgdr.catalog import catalog
    from pgdr.catalog.index import scan_catalog
    from pgdr.storage.repository import open_repository

    config = settings()
    repository = open_repository(repo or config.repo_url, region=config.aws_region)
    found = scan_catalog(repository, db)
    backups: list[ListedBackup] = [
        {**m.summary(), "safety_copy": catalog.is_safety_copy(m),
         "storage_class": found.storage_classes.get(m.backup_id)} for m in found.backups]
    base_backups, unreadable = _base_backups(repository, db)
    return {"repository": repository.url, "backups": backups,
            "damaged": [d.summary() for d in found.damaged], "base_backups": base_backups,
            "base_backups_unreadable": unreadable}


def _base_backups(repository: Any, database: str | None) -> tuple[list[BaseBackupSummary], list[str]]:
    """The physical base backups (point-in-time recovery), with their kind and parent; a
    database whose base backup manifests cannot be read is named apart, not an error."""
    from pgdr.catalog.pitr_retention import list_pitr_sets
    from pgdr.pitr.basebackup import list_base_backups, summary

    found: list[BaseBackupSummary] = []
    unreadable: list[str] = []
    for name in [database] if database else list_pitr_sets(repository):
        try:
            found += [summary(b) for b in list_base_backups(repository, name)]
        except PgdrError:
            unreadable.append(name)
    return found, unreadable


@command(render.show_status, runs_flow=False)
def status(*, repo: str | None = None, db: str | None = None, server: str | None = None,
           json: bool = False) -> Result:
    """Last backup, its age and size, and last verification per database.

    Args:
        repo: repository URL
        db: only this database (NAME)
        server: also list the safety databases restores left on this server (default: DATABASE_URL)
        json: print one JSON object on stdout
    """
    from pgdr.catalog.status import repository_status
    from pgdr.storage.repository import open_repository

    config = settings()
    repository = open_repository(repo or config.repo_url, region=config.aws_region)
    result = repository_status(repository, db, server_url=server or config.db_url)
    replica_url = config.replica_repo_url
    if replica_url and replica_url.rstrip("/") != repository.url.rstrip("/"):
        from pgdr.catalog.catalog import utcnow
        from pgdr.storage.replica import replica_lag

        try:
            replica = open_repository(replica_url, region=config.aws_region)
            result["replica"] = replica_lag(repository, replica, utcnow())
        except PgdrError as exc:  # the primary's status still stands
            result["replica"] = {"replica": replica_url, "error": str(exc)}
    return result
