"""Restore building blocks: staging a verified local copy, pg_restore, and the swap.

A restore over an existing database never leaves it half-restored: the backup goes into
a new database, is verified there, and only then takes the old one's name in a single
transaction (the old one is kept under another name: that is the rollback).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from tasks import postgres
from tasks.errors import NotReadyYet, PgdrError
from tasks.process import run
from tasks.repository import ARCHIVED, READABLE, Repository

MAX_NAME_BYTES = 63  # PostgreSQL silently truncates longer identifiers


def derived_name(database: str, label: str, moment: datetime) -> str:
    """`<database>_<label>_<YYYYmmddTHHMMSS>`, shortened (with a hash, so two long names
    never collide) to fit PostgreSQL's 63-byte limit."""
    import hashlib

    suffix = f"_{label}_{moment:%Y%m%dT%H%M%S}"
    name = database + suffix
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(database.encode()).hexdigest()[:6]
    budget = MAX_NAME_BYTES - len(suffix.encode()) - len(digest) - 1
    head = database.encode()[:budget].decode("utf-8", "ignore")
    return f"{head}_{digest}{suffix}"


def admin_database(target: str) -> str:
    """Where to connect to create, rename and drop `target`: never target itself."""
    return "template1" if target == "postgres" else "postgres"


def work_directory(base: str | None) -> Path:
    """A private (0700) directory for one restore's local copy."""
    root = Path(base or tempfile.gettempdir()) / "pgdr"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="restore-", dir=root))


def check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed and free < needed * 1.05:
        raise PgdrError(
            f"not enough space in {directory} to stage the backup: need {needed // 2**20} MiB, "
            f"{free // 2**20} MiB free (set PGDR_WORK_DIR to a larger disk)"
        )


# How long S3's Standard retrieval typically takes, to say when to try again.
TYPICAL_RETRIEVAL_HOURS = {"GLACIER": 5, "DEEP_ARCHIVE": 12}
# Days the restored copy of an archived object stays readable (time for a retry, a drill).
RESTORED_COPY_DAYS = 7


def wait_until_readable(repo: Repository, key: str, *, wait_hours: float, wait: bool,
                        report: Callable[[str], None], poll_seconds: float = 60.0) -> str | None:
    """Make an archived object readable: start S3's restore and wait for it (reporting
    progress) up to wait_hours, or with wait=False raise NotReadyYet saying when to retry.
    Returns the object's storage class."""
    storage_class, state = repo.archive_state(key)
    if state == READABLE:
        return storage_class
    if state == ARCHIVED:
        repo.request_restore(key, RESTORED_COPY_DAYS)
        report(f"{key} is in {storage_class}: S3 restore requested")
    typical = TYPICAL_RETRIEVAL_HOURS.get(storage_class or "", 12)
    retry_at = datetime.now(UTC) + timedelta(hours=typical)
    if not wait:
        raise NotReadyYet(f"{key} is in {storage_class} and S3 is restoring it (typically {typical} h): "
                          f"run the same command again after {retry_at:%Y-%m-%d %H:%M} UTC")
    started = time.monotonic()
    while True:
        storage_class, state = repo.archive_state(key)
        if state == READABLE:
            report(f"{key} is readable again ({(time.monotonic() - started) / 60:.0f} min)")
            return storage_class
        waited = time.monotonic() - started
        if waited >= wait_hours * 3600:
            raise NotReadyYet(f"{key} is still being restored from {storage_class} after {wait_hours:g} h: "
                              f"run the same command again later (typically {typical} h in all)")
        report(f"S3 is restoring {key} from {storage_class}: {waited / 60:.0f} min so far "
               f"(typically {typical} h; waiting up to {wait_hours:g} h)")
        time.sleep(poll_seconds)


def pg_restore(server_url: str, dbname: str, archive: Path, *, jobs: int, no_owner: bool = False,
               secrets: list[str] | None = None, options: Sequence[str] = ()) -> None:
    """pg_restore -j into dbname; any error, including "errors ignored on restore", fails.
    `options` choose what to restore (--section, --use-list)."""
    argv = [postgres.pg_bin("pg_restore"), "--exit-on-error", "--no-password", f"--jobs={max(1, jobs)}",
            f"--dbname={dbname}"]
    if no_owner:
        argv.append("--no-owner")
    argv += [*options, str(archive)]
    with postgres.libpq_env(server_url, dbname=dbname) as env:
        # --dbname is a name, not a connection string: the server comes from PGHOST/PGPORT.
        output = run(argv, env=env, secrets=secrets or [])
    if "errors ignored on restore" in output:
        raise PgdrError(f"pg_restore reported errors into {dbname}")


def _set_comment(conn: psycopg.Connection, dbname: str, comment: dict[str, Any]) -> None:
    from psycopg import sql

    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
        sql.Identifier(dbname), sql.Literal(json.dumps(comment, sort_keys=True))))


def _tagged(conn: psycopg.Connection) -> list[tuple[str, dict[str, Any]]]:
    """Every database with a pgdr tag (a JSON comment), and its tag."""
    rows = conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database"
        " WHERE shobj_description(oid, 'pg_database') LIKE '{%%'").fetchall()
    found = []
    for name, comment in rows:
        try:
            tag = json.loads(comment)
        except ValueError:
            continue
        if isinstance(tag, dict) and tag.get("pgdr"):
            found.append((name, tag))
    return found


def tagged_databases(conn: psycopg.Connection, role: str, of: str) -> list[tuple[str, dict[str, Any]]]:
    """Databases pgdr kept aside with this role (e.g. pre-restore) for database `of`,
    newest first."""
    found = [(name, tag) for name, tag in _tagged(conn) if tag.get("pgdr") == role and tag.get("of") == of]
    return sorted(found, key=lambda item: item[1].get("at", ""), reverse=True)


# The roles of the databases a restore or a rollback sets aside (full copies on the server).
SAFETY_ROLES = ("pre-restore", "rolled-back")
_SAFETY_NAME = re.compile(r"_(pre_restore|rolled_back)_\d{8}T\d{6}$")


@dataclass(frozen=True)
class SafetyDatabase:
    name: str
    of: str
    role: str
    at: str | None


def safety_databases(conn: psycopg.Connection) -> list[SafetyDatabase]:
    """The databases restores and rollbacks set aside on this server, by name. A database
    that carries a tag but is named otherwise is not one: after a rollback the live
    database still carries the pre-restore tag of the copy it was."""
    return sorted((SafetyDatabase(name, tag["of"], tag["pgdr"], tag.get("at"))
                   for name, tag in _tagged(conn)
                   if tag.get("pgdr") in SAFETY_ROLES and isinstance(tag.get("of"), str)
                   and name != tag["of"] and _SAFETY_NAME.search(name)),
                  key=lambda found: found.name)


def drop_safety_database(conn: psycopg.Connection, name: str) -> None:
    """DROP DATABASE without FORCE: a copy someone is looking at is left alone (the error
    says so)."""
    from psycopg import sql

    conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))


def swap_databases(server_url: str, target: str, incoming: str, keep_as: str, tag: dict[str, Any],
                   *, attempts: int = 50) -> None:
    """Put `incoming` in place of `target`, keeping the old one as `keep_as`.

    New connections to target are refused, the current ones terminated, and both renames
    happen in one transaction, retried while clients still race in. On any failure the
    target keeps its name and accepts connections again."""
    with postgres.connect(server_url, dbname=admin_database(target), autocommit=True) as conn:
        try:
            for _attempt in range(attempts):
                # Renaming needs both databases free of sessions.
                postgres.block_and_terminate(conn, target)
                postgres.block_and_terminate(conn, incoming)
                try:
                    with conn.transaction():
                        postgres.rename_database(conn, target, keep_as)
                        postgres.rename_database(conn, incoming, target)
                    break
                except psycopg.errors.ObjectInUse:
                    time.sleep(0.1)
            else:
                raise PgdrError(f"could not take over {target}: sessions kept connecting to it")
        except BaseException:
            postgres.allow_connections(conn, target)
            postgres.allow_connections(conn, incoming)
            raise
        postgres.allow_connections(conn, target)
        postgres.allow_connections(conn, keep_as)
        _set_comment(conn, keep_as, tag)


def drop_quietly(server_url: str, dbname: str) -> None:
    """Best-effort cleanup of a scratch database (used on failure paths)."""
    try:
        with postgres.connect(server_url, dbname=admin_database(dbname), autocommit=True) as conn:
            postgres.drop_database(conn, dbname)
    except PgdrError:
        pass
