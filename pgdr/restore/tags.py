"""pgdr's tags on databases: the role of each database a restore creates or sets aside.

The tag is the database's comment, as JSON; a database's own comment is kept inside the
tag until the database takes its final name.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from pgdr.pipeline.runs import run_is_gone, this_run

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
    set_comment(conn, dbname, json.dumps(tag, sort_keys=True) if tag is not None else None)


def set_comment(conn: psycopg.Connection, dbname: str, comment: str | None) -> None:
    """The database's comment as given (None: no comment)."""
    value = sql.Literal(comment) if comment is not None else sql.SQL("NULL")
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(dbname), value))


def comment_of(conn: psycopg.Connection, dbname: str) -> str | None:
    row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                       (dbname,)).fetchone()
    return row[0] if row else None


def tag_in(comment: str | None) -> dict[str, Any] | None:
    """pgdr's tag, when the comment is one."""
    try:
        tag = json.loads(comment or "")
    except ValueError:
        return None
    return tag if isinstance(tag, dict) and "pgdr" in tag else None


def pgdr_databases(conn: psycopg.Connection) -> list[tuple[str, dict[str, Any]]]:
    """Every database carrying a pgdr tag, with the tag."""
    rows = conn.execute("SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database").fetchall()
    return [(name, tag) for name, comment in rows if (tag := tag_in(comment)) is not None]


def remember_comment(conn: psycopg.Connection, dbname: str, comment: str | None) -> None:
    """Keep the comment a restored database should have inside its pgdr tag (the comment
    itself holds the tag until the database takes its name)."""
    set_tag(conn, dbname, {**(tag_in(comment_of(conn, dbname)) or {}), "comment": comment})


def untag(conn: psycopg.Connection, dbname: str) -> None:
    """No longer pgdr's: the database gets the comment its tag was keeping, or none."""
    set_comment(conn, dbname, (tag_in(comment_of(conn, dbname)) or {}).get("comment"))


def tag_as_restoring(conn: psycopg.Connection, dbname: str, of: str) -> None:
    """Mark a database this run is loading: the next run removes it if this one dies."""
    set_tag(conn, dbname, {"pgdr": RESTORING, "of": of, "at": iso_now(), **this_run()})


def iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def owner_gone(tag: dict[str, Any]) -> bool:
    """True when the run named in tag is gone (one of another host: after OTHER_HOST_GRACE)."""
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
    conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))


def stopped_writes_tag(comment: str | None) -> dict[str, Any] | None:
    """The tag stop_writes put on a database (its own limit and comment inside), if any."""
    tag = tag_in(comment)
    return tag if tag is not None and tag.get("pgdr") == STOPPED_WRITES else None

