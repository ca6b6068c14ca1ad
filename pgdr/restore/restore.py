"""Restore building blocks: staging a verified local copy, pg_restore, and the swap.

A restore over an existing database never leaves it half-restored: the backup goes into
a new database, is verified there, and only then takes the old one's name in a single
transaction (the old one is kept under another name: that is the rollback).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from pgdr.ops.errors import ConfigError, NotReadyYet, PgdrError
from pgdr.pipeline.process import (
    private_directory,
    run,
    run_is_gone,
    sweep_dead_runs,
    termination_deferred,
    termination_pending,
    this_run,
)
from pgdr.postgres import postgres
from pgdr.storage.repository import ARCHIVED, READABLE, Repository

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


STAGING_PREFIX = "restore-"


def staging_root(base: str | None) -> Path:
    return Path(base or tempfile.gettempdir()) / "pgdr"


def work_directory(base: str | None) -> Path:
    """A private (0700) directory for one restore's local copy, named after this run: the
    staging directories of runs that are gone are removed first."""
    root = staging_root(base)
    root.mkdir(parents=True, exist_ok=True)
    sweep_dead_runs(root, STAGING_PREFIX)
    return private_directory(STAGING_PREFIX, root)


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
               no_acl: bool = False, secrets: list[str] | None = None, options: Sequence[str] = ()) -> None:
    """pg_restore -j into dbname; any error, including "errors ignored on restore", fails.
    `options` choose what to restore (--section, --use-list)."""
    with postgres.connect(server_url, dbname=dbname) as conn:
        major = postgres.server_major(conn)  # pg_restore of the server's version (or newer)
    argv = [postgres.pg_bin("pg_restore", major), "--exit-on-error", "--no-password",
            f"--jobs={max(1, jobs)}", f"--dbname={dbname}"]
    if no_owner:
        argv.append("--no-owner")
    if no_acl:
        argv.append("--no-acl")
    argv += [*options, str(archive)]
    with postgres.libpq_env(server_url, dbname=dbname) as env:
        # --dbname is a name, not a connection string: the server comes from PGHOST/PGPORT.
        output = run(argv, env=env, secrets=secrets or [])
    if "errors ignored on restore" in output:
        raise PgdrError(f"pg_restore reported errors into {dbname}")


# --- pgdr's tags on databases: the swap as a recoverable state machine ----------------------
#
# Every database pgdr creates or sets aside carries a JSON comment naming its role:
#   restoring    being loaded or validated by a run (host, pid): a leftover once that run is gone
#   swapping     validated, about to take `of`'s name (the plan: keep_as, its tag, the owner)
#   pre-restore  the database a restore replaced (rollback takes it back)
#   rolled-back  the restored database a rollback set aside
#   stopped-writes  on the target itself: --stop-writes-first set its connection limit to 0
#                (its own limit and comment kept in the tag) for a run (host, pid)
# The swap itself (both renames, both tags, connections allowed again) is one transaction;
# the only state between is "swapping" with connections refused, and repair_target
# finishes it. So a target never stays closed once pgdr, or the next pgdr, has run.

RESTORING = "restoring"
SWAPPING = "swapping"
PRE_RESTORE = "pre-restore"
STOPPED_WRITES = "stopped-writes"
# A run on another host is presumed gone only after this long (a swap takes seconds; the
# restore step's own timeout is a day).
OTHER_HOST_GRACE = {SWAPPING: timedelta(minutes=10), RESTORING: timedelta(hours=25),
                    STOPPED_WRITES: timedelta(hours=25)}


def set_tag(conn: psycopg.Connection, dbname: str, tag: dict[str, Any] | None) -> None:
    """The database's comment: pgdr's tag as JSON, or (None) no comment."""
    from psycopg import sql

    value = sql.Literal(json.dumps(tag, sort_keys=True)) if tag is not None else sql.SQL("NULL")
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(dbname), value))


def _comment(conn: psycopg.Connection, dbname: str) -> str | None:
    row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                       (dbname,)).fetchone()
    return row[0] if row else None


def _as_tag(comment: str | None) -> dict[str, Any] | None:
    try:
        tag = json.loads(comment or "")
    except ValueError:
        return None
    return tag if isinstance(tag, dict) and "pgdr" in tag else None


def pgdr_databases(conn: psycopg.Connection) -> list[tuple[str, dict[str, Any]]]:
    """Every database carrying a pgdr tag, with the tag."""
    rows = conn.execute("SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database").fetchall()
    return [(name, tag) for name, comment in rows if (tag := _as_tag(comment)) is not None]


def remember_comment(conn: psycopg.Connection, dbname: str, comment: str | None) -> None:
    """Keep the comment a restored database should have inside its pgdr tag (the comment
    itself holds the tag until the database takes its name)."""
    set_tag(conn, dbname, {**(_as_tag(_comment(conn, dbname)) or {}), "comment": comment})


def untag(conn: psycopg.Connection, dbname: str) -> None:
    """No longer pgdr's: the database gets the comment its tag was keeping, or none."""
    _restore_comment(conn, dbname, (_as_tag(_comment(conn, dbname)) or {}).get("comment"))


def tag_as_restoring(conn: psycopg.Connection, dbname: str, of: str) -> None:
    """Mark a database this run is loading: the next run removes it if this one dies."""
    set_tag(conn, dbname, {"pgdr": RESTORING, "of": of, "at": iso_now(), **this_run()})


def iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner_gone(tag: dict[str, Any]) -> bool:
    if run_is_gone(tag):
        return True
    grace = OTHER_HOST_GRACE.get(tag.get("pgdr", ""))
    if grace is None or tag.get("host") == socket.gethostname():
        return False
    try:
        since = datetime.fromisoformat(str(tag.get("at", "")).replace("Z", "+00:00"))
    except ValueError:
        return False
    return datetime.now(UTC) - since > grace


def tagged_databases(conn: psycopg.Connection, role: str, of: str) -> list[tuple[str, dict[str, Any]]]:
    """Databases pgdr kept aside with this role (e.g. pre-restore) for database `of`,
    newest first."""
    found = [(name, tag) for name, tag in pgdr_databases(conn)
             if tag.get("pgdr") == role and tag.get("of") == of and name != of]
    return sorted(found, key=lambda item: item[1].get("at", ""), reverse=True)


# The roles of the databases a restore or a rollback sets aside (full copies on the server).
SAFETY_ROLES = (PRE_RESTORE, "rolled-back")
_SAFETY_NAME = re.compile(r"_(pre_restore|rolled_back)_\d{8}T\d{6}$")


@dataclass(frozen=True)
class SafetyDatabase:
    name: str
    of: str
    role: str
    at: str | None


def safety_databases(conn: psycopg.Connection) -> list[SafetyDatabase]:
    """The databases restores and rollbacks set aside on this server, by tag and name (a
    database that merely carries a tag is not one)."""
    return sorted((SafetyDatabase(name, tag["of"], tag["pgdr"], tag.get("at"))
                   for name, tag in pgdr_databases(conn)
                   if tag.get("pgdr") in SAFETY_ROLES and isinstance(tag.get("of"), str)
                   and name != tag["of"] and _SAFETY_NAME.search(name)),
                  key=lambda found: found.name)


def drop_safety_database(conn: psycopg.Connection, name: str) -> None:
    """DROP DATABASE without FORCE: a copy someone is looking at is left alone (the error
    says so)."""
    from psycopg import sql

    conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))


def pause_point(phase: str) -> None:
    """Test hook: with PGDR_DEBUG_PAUSE_AT=<phase>, say so on stderr and wait there (up to
    10 minutes, or until a SIGTERM is pending) so that a test can signal pgdr in that phase."""
    if os.environ.get("PGDR_DEBUG_PAUSE_AT") != phase:
        return
    sys.stderr.write(f"pgdr: paused at {phase}\n")  # not print(): a flow's log_prints takes that
    sys.stderr.flush()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not termination_pending():
        time.sleep(0.05)


def swap_databases(server_url: str, target: str, incoming: str, keep_as: str | None, tag: dict[str, Any],
                   *, attempts: int = 50) -> None:
    """Put `incoming` in place of `target`, keeping the old one as `keep_as` with `tag`
    (keep_as None: target does not exist, incoming only takes its name).

    The plan is first recorded on incoming ("swapping"); then new connections to both are
    refused, current ones terminated, and the renames, tags and ALLOW_CONNECTIONS happen in
    one transaction, retried while clients still race in. A SIGTERM meanwhile waits for the
    swap to finish; a failure puts everything back as it was; after a SIGKILL,
    repair_target finishes it."""
    with postgres.connect(server_url, dbname=admin_database(target), autocommit=True) as conn:
        plan = {"pgdr": SWAPPING, "of": target, "keep_as": keep_as, "keep_tag": tag,
                "incoming_comment": _comment(conn, incoming), "at": iso_now(), **this_run()}
        set_tag(conn, incoming, plan)
        with termination_deferred():
            try:
                _finish_swap(conn, incoming, plan, attempts)
            except BaseException:
                _undo_swap(server_url, incoming, plan)
                raise


def _finish_swap(conn: psycopg.Connection, incoming: str, plan: dict[str, Any], attempts: int = 50) -> None:
    target, keep_as = plan["of"], plan["keep_as"]
    replacing = keep_as is not None and postgres.database_exists(conn, target)
    for _attempt in range(attempts):
        # Renaming needs both databases free of sessions.
        if replacing:
            postgres.block_and_terminate(conn, target)
        postgres.block_and_terminate(conn, incoming)
        pause_point("swap-blocked")
        try:
            with conn.transaction():
                # A database's own comment travels with its data, inside pgdr's tag while
                # the database is set aside or being restored (remember_comment).
                incoming_tag = _as_tag(plan.get("incoming_comment")) or {}
                new_comment = incoming_tag.get("comment")
                if replacing:
                    current = _comment(conn, target)
                    current_tag = _as_tag(current)
                    old_comment = current if current_tag is None else current_tag.get("comment")
                    if "comment" not in incoming_tag:
                        new_comment = old_comment
                    postgres.rename_database(conn, target, keep_as)
                    set_tag(conn, keep_as, {**plan["keep_tag"], "comment": old_comment})
                    _give_back_connection_limit(conn, keep_as, _as_tag(current))
                    postgres.allow_connections(conn, keep_as)
                postgres.rename_database(conn, incoming, target)
                _restore_comment(conn, target, new_comment)
                postgres.allow_connections(conn, target)
            return
        except psycopg.errors.ObjectInUse:
            time.sleep(0.1)
    raise PgdrError(f"could not take over {target}: sessions kept connecting to it")


def _restore_comment(conn: psycopg.Connection, dbname: str, comment: str | None) -> None:
    from psycopg import sql

    value = sql.Literal(comment) if comment is not None else sql.SQL("NULL")
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(dbname), value))


def _undo_swap(server_url: str, incoming: str, plan: dict[str, Any]) -> None:
    """After a failed swap (on a connection of its own: the swap's may be broken): both
    databases accept connections again and incoming gets its previous tag back."""
    with postgres.connect(server_url, dbname=admin_database(plan["of"]), autocommit=True) as conn:
        for name in (plan["of"], incoming):
            if postgres.database_exists(conn, name):
                postgres.allow_connections(conn, name)
        if postgres.database_exists(conn, incoming):
            _restore_comment(conn, incoming, plan.get("incoming_comment"))


def stop_writes(server_url: str, target: str) -> None:
    """--stop-writes-first: refuse new connections to `target` and end the current ones, so
    that nothing is written to it from now on. CONNECTION LIMIT 0 refuses every role but the
    superusers (ALLOW_CONNECTIONS false would refuse pg_dump as well), so pgdr must connect
    as one. The target's own limit and comment are kept in a tag naming this run, in the
    same transaction: allow_writes_again, the swap or the next pgdr puts them back."""
    from psycopg import sql

    with postgres.connect(server_url, dbname=admin_database(target), autocommit=True) as conn:
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        if not superuser[0]:  # type: ignore[index]
            raise ConfigError("--stop-writes-first needs a superuser in --target: CONNECTION LIMIT 0 "
                              "refuses every other role, including the one the pre-restore backup uses")
        with conn.transaction():
            limit = conn.execute("SELECT datconnlimit FROM pg_database WHERE datname = %s",
                                 (target,)).fetchone()[0]  # type: ignore[index]
            set_tag(conn, target, {"pgdr": STOPPED_WRITES, "of": target, "connection_limit": limit,
                                   "comment": _comment(conn, target), "at": iso_now(), **this_run()})
            conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT 0").format(sql.Identifier(target)))
        # Waits (up to 10 s each) for the sessions to end: their last writes are then counted.
        conn.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                     " WHERE datname = %s AND pid <> pg_backend_pid()", (target,))


def stopped_writes_tag(comment: str | None) -> dict[str, Any] | None:
    """The tag stop_writes put on a database (its own limit and comment inside), if any."""
    tag = _as_tag(comment)
    return tag if tag is not None and tag.get("pgdr") == STOPPED_WRITES else None


def _give_back_connection_limit(conn: psycopg.Connection, dbname: str, tag: dict[str, Any] | None) -> None:
    from psycopg import sql

    if tag is not None and tag.get("pgdr") == STOPPED_WRITES:
        conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
            sql.Identifier(dbname), sql.Literal(int(tag["connection_limit"]))))


def allow_writes_again(server_url: str, target: str) -> bool:
    """Undo stop_writes: `target` gets its own connection limit and comment back (in one
    transaction). False when it was not stopped (e.g. the swap already gave them back)."""
    with postgres.connect(server_url, dbname=admin_database(target), autocommit=True) as conn:
        return _allow_writes_again(conn, target)


def _allow_writes_again(conn: psycopg.Connection, target: str) -> bool:
    with conn.transaction():
        tag = stopped_writes_tag(_comment(conn, target))
        if tag is None:
            return False
        _give_back_connection_limit(conn, target, tag)
        _restore_comment(conn, target, tag.get("comment"))
    return True


def repair_target(server_url: str, target: str) -> list[str]:
    """Bring `target` out of whatever state a killed pgdr left it in: finish an interrupted
    swap (the incoming database had been validated), drop databases that runs now gone were
    loading, let a target whose writes a run now gone had stopped accept connections again.
    Returns one line per thing done."""
    done = []
    with postgres.connect(server_url, dbname=admin_database(target), autocommit=True) as conn:
        for name, tag in pgdr_databases(conn):
            if tag.get("of") != target or name == target or not _owner_gone(tag):
                continue
            if tag["pgdr"] == SWAPPING:
                _finish_swap(conn, name, tag)
                kept = f"; the previous database is kept as {tag['keep_as']}" if tag.get("keep_as") else ""
                done.append(f"finished the interrupted swap of {target}: it now holds {name}'s content{kept}")
            elif tag["pgdr"] == RESTORING:
                postgres.drop_database(conn, name)
                done.append(f"dropped {name}, left over by a killed restore of {target}")
        stopped = stopped_writes_tag(_comment(conn, target))
        if stopped is not None and _owner_gone(stopped) and _allow_writes_again(conn, target):
            done.append(f"{target} accepts connections again (a killed restore had stopped writes to it)")
    return done


def sweep_local_leftovers(work_dir: str | None) -> list[str]:
    """Remove the staging directories (decrypted dumps) and passfile directories of runs of
    this host that are gone; one line for each."""
    removed = sweep_dead_runs(staging_root(work_dir), STAGING_PREFIX) + sweep_dead_runs(
        None, postgres.PASSFILE_PREFIX)
    return [f"removed {path}, left by a killed run" for path in removed]


def sweep_leftover_databases(server_url: str) -> list[str]:
    """Drop every database a run that is now gone was loading (any target on this server)."""
    done = []
    with postgres.connect(server_url, dbname="postgres", autocommit=True) as conn:
        targets = {tag["of"] for name, tag in pgdr_databases(conn)
                   if tag.get("pgdr") in (RESTORING, SWAPPING, STOPPED_WRITES)
                   and isinstance(tag.get("of"), str)}
    for target in sorted(targets):
        done += repair_target(server_url, target)
    return done


def rows_written(server_url: str, dbname: str) -> int | None:
    """Rows inserted, updated and deleted in dbname's own tables since the statistics began
    (None when unknown). The system catalogs are left out: autovacuum's ANALYZE writes
    pg_statistic, which no user wrote. Sessions flush their counts when they end, as the swap
    makes them."""
    try:
        with postgres.connect(server_url, dbname=dbname, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute("SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)"
                               " FROM pg_stat_user_tables").fetchone()
    except PgdrError:
        return None  # the database takes no connection now: the count is unknown, not zero
    return int(row[0]) if row and row[0] is not None else None


def drop_quietly(server_url: str, dbname: str) -> None:
    """Best-effort cleanup of a scratch database (used on failure paths)."""
    try:
        with postgres.connect(server_url, dbname=admin_database(dbname), autocommit=True) as conn:
            postgres.drop_database(conn, dbname)
    except PgdrError:
        pass
