"""What `--json` prints for the commands that build their result here rather than in a
flow (the flows' results are described where they are built)."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from pgdr.pitr.walarchive import ArchiveStatus  # light: the WAL commands load it anyway

if TYPE_CHECKING:  # list and status stay light: these modules load psycopg
    from pgdr.catalog.catalog import DamagedSummary, ListedBackup
    from pgdr.pitr.basebackup import BaseBackupSummary


class ListResult(TypedDict):
    """`pgdr list --json`: each backup is its manifest's summary plus `safety_copy` and
    `storage_class`; damaged manifests come apart, never restored."""

    repository: str
    backups: list[ListedBackup]
    damaged: list[DamagedSummary]
    base_backups: list[BaseBackupSummary]  # physical base backups, with kind and parent
    base_backups_unreadable: list[str]  # databases whose base backup manifests cannot be read


class ArchiveStatusResult(ArchiveStatus):
    """`pgdr archive-status --json`: the archive, and the newest base backup it continues
    (None when there is none)."""

    base_backup: dict[str, str | None] | None


class WalPushResult(TypedDict):
    """`pgdr wal-push --json`."""

    name: str
    key: str
    stored: bool
    size_bytes: int
    wal_bytes: int
    database: str
    repository: str


class WalFetchResult(TypedDict):
    """`pgdr wal-fetch --json`."""

    name: str
    path: str
    wal_bytes: int
    database: str
