"""One operation per database (or files-backup name, or snapshotted bucket) at a time: a
lock object in the repository.

Why a repository lock and not a Prefect global concurrency limit: backups and prunes
start from the Prefect UI, from schedules, from GitHub Actions and from a shell, and a
shell run may use its own temporary Prefect server; the repository is the one thing they
all share, and the lock lives beside the data it protects. `locks/<database>.json`
(`locks/files/<name>.json`, `locks/storage/<bucket>.json` for the other areas) is
created with a conditional write (S3 `If-None-Match: *`, a hard link on disk), names its
holder, and is renewed by a heartbeat while held; a lock whose holder stopped renewing it
(a killed process) expires and is taken over.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from pgdr.catalog.catalog import database_component, iso, parse_iso, utcnow
from pgdr.ops.errors import PgdrError
from pgdr.pipeline.runs import run_is_gone, this_run
from pgdr.storage.repository import Repository

LOCK_TTL = timedelta(minutes=5)
HEARTBEAT_SECONDS = 60.0
POLL_SECONDS = 2.0


DATABASE = "database"


class LockBusy(PgdrError):
    """Another operation holds the lock."""


def lock_key(name: str, area: str = DATABASE) -> str:
    """A database's lock, or one of another area's set (a database name never holds a '/'
    once encoded, so the areas cannot collide)."""
    component = database_component(name)
    return f"locks/{component}.json" if area == DATABASE else f"locks/{area}/{component}.json"


def _label(name: str, area: str) -> str:
    return name if area == DATABASE else f"{area} {name}"


def _holder(operation: str, token: str) -> dict[str, Any]:
    now = utcnow()
    return {"operation": operation, **this_run(), "token": token,
            "acquired_at": iso(now), "expires_at": iso(now + LOCK_TTL)}


def _read(repo: Repository, key: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(repo.get_bytes(key))
        return record
    except (PgdrError, ValueError):
        return None  # gone meanwhile, or half-visible: try again


def _died_here(holder: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process is gone."""
    return run_is_gone(holder)


def _describe(holder: dict[str, Any]) -> str:
    return (f"{holder.get('operation')} on {holder.get('host')} (pid {holder.get('pid')}) "
            f"since {holder.get('acquired_at')}")


def acquire(repo: Repository, database: str, operation: str, wait_seconds: float,
            area: str = DATABASE) -> dict[str, Any]:
    """Take the lock, waiting up to wait_seconds for its holder; LockBusy after that."""
    key = lock_key(database, area)
    holder = _holder(operation, secrets.token_hex(8))
    deadline = time.monotonic() + wait_seconds
    while True:
        if repo.put_if_absent(key, json.dumps(holder).encode()):
            return holder
        current = _read(repo, key)
        if current and (parse_iso(current["expires_at"]) < utcnow() or _died_here(current)):
            # The holder stopped renewing, or was a process of this host that no longer
            # exists (killed): it is gone. Two takers racing here both delete, and only
            # one conditional create wins.
            repo.delete(key)
            continue
        if time.monotonic() >= deadline:
            who = _describe(current) if current else "another operation"
            raise LockBusy(f"{_label(database, area)} is locked by {who}; try again when it has finished")
        time.sleep(POLL_SECONDS)


def lock_holder(repo: Repository, name: str, area: str = DATABASE) -> dict[str, Any] | None:
    """Who holds the lock now (None: nobody, or it could not be read)."""
    return _read(repo, lock_key(name, area))


def release(repo: Repository, database: str, holder: dict[str, Any], area: str = DATABASE) -> None:
    key = lock_key(database, area)
    current = _read(repo, key)
    if current and current.get("token") == holder["token"]:
        repo.delete(key)


def _renew(repo: Repository, key: str, holder: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        current = _read(repo, key)
        if not current or current.get("token") != holder["token"]:
            return  # taken over (we were presumed dead): nothing left to renew
        holder["expires_at"] = iso(utcnow() + LOCK_TTL)
        with contextlib.suppress(PgdrError):  # the next beat tries again
            repo.put_bytes(key, json.dumps(holder).encode())


@contextlib.contextmanager
def database_lock(repo: Repository, database: str, operation: str, wait_seconds: float = 600.0,
                  area: str = DATABASE) -> Iterator[dict[str, Any]]:
    """Hold the database's lock (or, with area, that of a files backup name or a snapshotted
    bucket) for the block, renewing it while the block runs."""
    holder = acquire(repo, database, operation, wait_seconds, area)
    stop = threading.Event()
    beat = threading.Thread(target=_renew, args=(repo, lock_key(database, area), holder, stop), daemon=True,
                            name=f"pgdr-lock-{_label(database, area)}")
    beat.start()
    try:
        yield holder
    finally:
        stop.set()
        beat.join()
        release(repo, database, holder, area)
