"""Replacing a database with a restored one: the swap, stopping writes, and repairing what a killed run left.

A restore over an existing database never leaves it half-restored: the backup goes into
a new database, is verified there, and only then takes the old one's name in a single
transaction (the old one is kept under another name: that is the rollback).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.pipeline.runs import this_run
from pgdr.pipeline.termination import termination_deferred, termination_pending
from pgdr.postgres import postgres
from pgdr.restore import tags

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
        plan = {"pgdr": tags.SWAPPING, "of": target, "keep_as": keep_as, "keep_tag": tag,
                "incoming_comment": tags.comment_of(conn, incoming), "at": tags.iso_now(), **this_run()}
        tags.set_tag(conn, incoming, plan)
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
                # the database is set aside or being restored (tags.remember_comment).
                incoming_tag = tags.tag_in(plan.get("incoming_comment")) or {}
                new_comment = incoming_tag.get("comment")
                if replacing:
                    current = tags.comment_of(conn, target)
                    current_tag = tags.tag_in(current)
                    old_comment = current if current_tag is None else current_tag.get("comment")
                    if "comment" not in incoming_tag:
                        new_comment = old_comment
                    postgres.rename_database(conn, target, keep_as)
                    tags.set_tag(conn, keep_as, {**plan["keep_tag"], "comment": old_comment})
                    _give_back_connection_limit(conn, keep_as, tags.tag_in(current))
                    postgres.allow_connections(conn, keep_as)
                postgres.rename_database(conn, incoming, target)
                tags.set_comment(conn, target, new_comment)
                postgres.allow_connections(conn, target)
            return
        except psycopg.errors.ObjectInUse:
            time.sleep(0.1)
    raise PgdrError(f"could not take over {target}: sessions kept connecting to it")


def _undo_swap(server_url: str, incoming: str, plan: dict[str, Any]) -> None:
    """After a failed swap (on a connection of its own: the swap's may be broken): both
    databases accept connections again and incoming gets its previous tag back."""
    with postgres.connect(server_url, dbname=admin_database(plan["of"]), autocommit=True) as conn:
        for name in (plan["of"], incoming):
            if postgres.database_exists(conn, name):
                postgres.allow_connections(conn, name)
        if postgres.database_exists(conn, incoming):
            tags.set_comment(conn, incoming, plan.get("incoming_comment"))


def stop_writes(server_url: str, target: str) -> None:
    """--stop-writes-first: refuse new connections to `target` and end the current ones, so
    that nothing is written to it from now on. CONNECTION LIMIT 0 refuses every role but the
    superusers (ALLOW_CONNECTIONS false would refuse pg_dump as well), so pgdr must connect
    as one. The target's own limit and comment are kept in a tag naming this run, in the
    same transaction: allow_writes_again, the swap or the next pgdr puts them back."""
    with postgres.connect(server_url, dbname=admin_database(target), autocommit=True) as conn:
        superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        if not superuser[0]:  # type: ignore[index]
            raise ConfigError("--stop-writes-first needs a superuser in --target: CONNECTION LIMIT 0 "
                              "refuses every other role, including the one the pre-restore backup uses")
        with conn.transaction():
            limit = conn.execute("SELECT datconnlimit FROM pg_database WHERE datname = %s",
                                 (target,)).fetchone()[0]  # type: ignore[index]
            tags.set_tag(conn, target, {"pgdr": tags.STOPPED_WRITES, "of": target, "connection_limit": limit,
                                        "comment": tags.comment_of(conn, target), "at": tags.iso_now(),
                                        **this_run()})
            conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT 0").format(sql.Identifier(target)))
        # Waits (up to 10 s each) for the sessions to end: their last writes are then counted.
        conn.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                     " WHERE datname = %s AND pid <> pg_backend_pid()", (target,))


def _give_back_connection_limit(conn: psycopg.Connection, dbname: str, tag: dict[str, Any] | None) -> None:
    if tag is not None and tag.get("pgdr") == tags.STOPPED_WRITES:
        conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
            sql.Identifier(dbname), sql.Literal(int(tag["connection_limit"]))))


def allow_writes_again(server_url: str, target: str) -> bool:
    """Undo stop_writes: `target` gets its own connection limit and comment back (in one
    transaction). False when it was not stopped (e.g. the swap already gave them back)."""
    with postgres.connect(server_url, dbname=admin_database(target), autocommit=True) as conn:
        return _allow_writes_again(conn, target)


def _allow_writes_again(conn: psycopg.Connection, target: str) -> bool:
    with conn.transaction():
        tag = tags.stopped_writes_tag(tags.comment_of(conn, target))
        if tag is None:
            return False
        _give_back_connection_limit(conn, target, tag)
        tags.set_comment(conn, target, tag.get("comment"))
    return True


def repair_target(server_url: str, target: str) -> list[str]:
    """Bring `target` out of whatever state a killed pgdr left it in: finish an interrupted
    swap (the incoming database had been validated), drop databases that runs now gone were
    loading, let a target whose writes a run now gone had stopped accept connections again.
    Returns one line per thing done."""
    done = []
    with postgres.connect(server_url, dbname=admin_database(target), autocommit=True) as conn:
        for name, tag in tags.pgdr_databases(conn):
            if tag.get("of") != target or name == target or not tags.owner_gone(tag):
                continue
            if tag["pgdr"] == tags.SWAPPING:
                _finish_swap(conn, name, tag)
                kept = f"; the previous database is kept as {tag['keep_as']}" if tag.get("keep_as") else ""
                done.append(f"finished the interrupted swap of {target}: it now holds {name}'s content{kept}")
            elif tag["pgdr"] == tags.RESTORING:
                postgres.drop_database(conn, name)
                done.append(f"dropped {name}, left over by a killed restore of {target}")
        stopped = tags.stopped_writes_tag(tags.comment_of(conn, target))
        if stopped is not None and tags.owner_gone(stopped) and _allow_writes_again(conn, target):
            done.append(f"{target} accepts connections again (a killed restore had stopped writes to it)")
    return done


def sweep_leftover_databases(server_url: str) -> list[str]:
    """Drop every database a run that is now gone was loading (any target on this server)."""
    done = []
    with postgres.connect(server_url, dbname="postgres", autocommit=True) as conn:
        targets = {tag["of"] for name, tag in tags.pgdr_databases(conn)
                   if tag.get("pgdr") in (tags.RESTORING, tags.SWAPPING, tags.STOPPED_WRITES)
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
