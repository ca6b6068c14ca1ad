"""Incremental base backups: which kind the next base backup is, and the chain of backups
that restoring one needs.

PostgreSQL 17 and newer take incremental backups (`pg_basebackup --incremental=<the
previous backup's backup_manifest>`): only the blocks changed since that backup, found in
the server's WAL summaries (`summarize_wal = on`). The parent's backup_manifest, stored
apart when it was taken, is fetched for the next incremental to start from. Restoring an
incremental needs its whole chain back to a full backup.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pgdr.ops.errors import ConfigError, IntegrityError, NotFoundError
from pgdr.pipeline.dump import fetch_dump
from pgdr.pitr.basebackup import FULL, INCREMENTAL, SERVER_MANIFEST, BaseManifest
from pgdr.storage.repository import Repository

KINDS = ("auto", FULL, INCREMENTAL)
# The default policy: a full backup when the newest chain's full is older than this.
FULL_EVERY = timedelta(days=7)


def backup_chain(backups: Iterable[BaseManifest], chosen: BaseManifest) -> list[BaseManifest]:
    """The backups that restoring `chosen` needs, full first: itself if full, else its
    parents back to a full. IntegrityError naming the broken link when a parent is missing
    or is not of the same server."""
    by_id = {b.backup_id: b for b in backups}
    chain = [chosen]
    while chain[0].kind == INCREMENTAL:
        child = chain[0]
        parent = by_id.get(child.parent_backup_id or "")
        if parent is None:
            raise IntegrityError(f"the backup chain of {chosen.backup_id} is broken: {child.backup_id} is "
                                 f"incremental on {child.parent_backup_id}, which is not in the repository")
        if parent.system_identifier != child.system_identifier or parent in chain:
            raise IntegrityError(f"the backup chain of {chosen.backup_id} is broken: parent "
                                 f"{parent.backup_id} of {child.backup_id} is not of the same server")
        chain.insert(0, parent)
    if chain[0].kind != FULL:
        raise IntegrityError(f"the backup chain of {chosen.backup_id} starts with {chain[0].backup_id}, "
                             f"of unknown kind {chain[0].kind!r}")
    return chain


@dataclass(frozen=True)
class KindPlan:
    """What the next base backup is: FULL, or INCREMENTAL on `parent`; `note` says why and
    `warning` is set when an incremental was wanted but cannot be taken."""

    kind: str
    parent: BaseManifest | None
    note: str
    warning: str | None = None


def plan_backup_kind(requested: str, backups: list[BaseManifest], *, server_major: int, summarize_wal: bool,
                     system_identifier: str, timeline: int, now: datetime,
                     full_every: timedelta = FULL_EVERY) -> KindPlan:
    """The default policy (requested "auto"): incremental on the newest base backup of the
    same server when PostgreSQL is 17 or newer, summarize_wal is on, that backup's chain is
    whole, its full finished less than `full_every` ago, and it is on the same timeline;
    otherwise full. "full" forces a full backup; "incremental" forces an incremental and
    raises ConfigError when one cannot be taken."""
    if requested not in KINDS:
        raise ConfigError(f"unknown backup kind {requested!r}: choose one of {', '.join(KINDS)}")
    if requested == FULL:
        return KindPlan(FULL, None, "a full backup was asked for")
    reason = _no_incremental_because(backups, server_major=server_major, summarize_wal=summarize_wal,
                                     system_identifier=system_identifier, timeline=timeline, now=now,
                                     full_every=full_every)
    if isinstance(reason, BaseManifest):
        return KindPlan(INCREMENTAL, reason, f"incremental on {reason.backup_id}")
    if requested == INCREMENTAL:
        raise ConfigError(f"an incremental base backup cannot be taken: {reason}")
    warned = reason.startswith("summarize_wal is off")
    return KindPlan(FULL, None, reason, reason + ": taking a full backup instead" if warned else None)


def _no_incremental_because(backups: list[BaseManifest], *, server_major: int, summarize_wal: bool,
                            system_identifier: str, timeline: int, now: datetime,
                            full_every: timedelta) -> BaseManifest | str:
    """The parent of the next incremental, or why there is none."""
    if server_major < 17:
        return f"PostgreSQL {server_major} has no incremental backups (17 and newer have)"
    if not summarize_wal:
        return "summarize_wal is off on the server (incremental backups need it on)"
    mine = [b for b in backups if b.system_identifier == system_identifier]
    if not mine:
        return "no earlier base backup of this server"
    parent = max(mine, key=lambda b: (b.finished_at, b.backup_id))
    if parent.server_manifest is None:
        return f"the newest base backup {parent.backup_id} has no stored backup_manifest"
    if int(parent.server_version.split(".")[0]) != server_major:
        return f"the newest base backup {parent.backup_id} is of PostgreSQL {parent.server_version}"
    if parent.timeline != timeline:
        return (f"the newest base backup {parent.backup_id} is of timeline {parent.timeline}, "
                f"the server is on {timeline}")
    try:
        full = backup_chain(mine, parent)[0]
    except IntegrityError as exc:
        return str(exc)
    if now - full.finished >= full_every:
        return f"the newest full backup {full.backup_id} is {full_every.days} days old or more"
    return parent


def fetch_server_manifest(repo: Repository, manifest: BaseManifest, destination: Path, *,
                          gpg_homedir: str | None = None, passphrase: str | None = None,
                          secrets: list[str] | None = None) -> Path:
    """The parent's backup_manifest, checked against its sha256, decoded into destination."""
    info = manifest.server_manifest
    if info is None:
        raise NotFoundError(f"base backup {manifest.backup_id} has no stored {SERVER_MANIFEST}")
    fetch_dump(repo, info["key"], destination, size=info["size_bytes"], sha256=info["sha256"],
               encrypted=manifest.encryption is not None, gpg_homedir=gpg_homedir, passphrase=passphrase,
               secrets=secrets)
    return destination
