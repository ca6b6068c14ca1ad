"""Restore only some tables of a backup: what recover-table and `restore --table` need.

Selective work costs what it selects. The backup's schema is restored first (pg_restore
--section=pre-data: schemas, extensions, types, domains, functions, sequences and every
table, empty), so whatever the named tables need exists; then only the rows of the named
tables, of their partitions and inheritance children, and the sequences' values
(`pg_restore -L` with a filtered table of contents). Indexes, constraints, triggers and
the other tables' rows are not restored: they cost time and nothing reads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import psycopg

from pgdr.pipeline.process import run
from pgdr.postgres import dsn, postgres, programs
from pgdr.restore import staging

Relation = tuple[str, str]
"""(schema, name) of a table, as the catalogs spell them."""

# The named tables and every table below them (partitions, inheritance children).
_FAMILY_SQL = """
WITH RECURSIVE family(oid) AS (
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%(schemas)s::text[], %(names)s::text[]))
  UNION
    SELECT i.inhrelid FROM pg_inherits i JOIN family f ON i.inhparent = f.oid
)
SELECT n.nspname, c.relname FROM family f
JOIN pg_class c ON c.oid = f.oid JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY 1, 2
"""


def _entry(line: str) -> tuple[str, str] | None:
    """(dump id, `TYPE schema tag owner`) of a `pg_restore --list` line, None for comments."""
    if line.startswith(";") or not line.strip():
        return None
    dump_id, _tableoid, _oid, rest = line.split(" ", 3)
    return dump_id, rest


def chosen_entries(listing: str, table_listings: Iterable[str]) -> list[str]:
    """The lines of the archive's listing to restore, in the archive's order: the rows
    (TABLE DATA) listed in table_listings (pg_restore --list narrowed by -n/-t to the
    wanted tables: pg_restore matches the names exactly, whatever they contain), and every
    sequence's value (SEQUENCE SET: cheap, and defaults go on from where they were)."""
    wanted = set()
    for narrowed in table_listings:
        for line in narrowed.splitlines():
            entry = _entry(line)
            if entry and entry[1].startswith("TABLE DATA "):
                wanted.add(entry[0])
    chosen = []
    for line in listing.splitlines():
        entry = _entry(line)
        if entry and (entry[0] in wanted or entry[1].startswith("SEQUENCE SET ")):
            chosen.append(line)
    return chosen


def table_family(conn: psycopg.Connection, tables: Sequence[Relation]) -> set[Relation]:
    """The named tables and their partitions and inheritance children, read from the
    restored schema."""
    rows = conn.execute(_FAMILY_SQL, {"schemas": [s for s, _ in tables], "names": [t for _, t in tables]})
    return {(schema, name) for schema, name in rows}


def restore_tables(server_url: str, dbname: str, archive: Path, tables: Sequence[Relation], *, jobs: int,
                   no_owner: bool, secrets: list[str]) -> set[Relation]:
    """Into the existing, empty database dbname: the backup's schema, then the rows of
    `tables` and of the tables below them. Returns the tables whose rows were restored."""
    staging.pg_restore(server_url, dbname, archive, jobs=1, no_owner=no_owner, secrets=secrets,
                         options=["--section=pre-data"])
    with postgres.connect(dsn.with_database(server_url, dbname)) as conn:
        family = table_family(conn, tables)
        # pg_restore of the server's version: an older one cannot read a newer archive.
        pg_restore = programs.pg_bin("pg_restore", postgres.server_major(conn))
    by_schema: dict[str, list[str]] = {}
    for schema, name in sorted(family):
        by_schema.setdefault(schema, []).extend(["-t", name])
    narrowed = [run([pg_restore, "--list", "-n", schema, *names, str(archive)], secrets=secrets)
                for schema, names in by_schema.items()]
    listing = run([pg_restore, "--list", str(archive)], secrets=secrets)
    selection = archive.with_suffix(".list")
    selection.write_text("\n".join(chosen_entries(listing, narrowed)) + "\n")
    staging.pg_restore(server_url, dbname, archive, jobs=jobs, no_owner=no_owner, secrets=secrets,
                         options=[f"--use-list={selection}"])
    return family


def row_counts_of(row_counts: dict[str, int], restored: set[Relation]) -> dict[str, int]:
    """The manifest's row counts (keyed `schema.table` as SQL writes them) of the tables
    restored."""
    return {key: count for key, count in row_counts.items() if postgres.parse_table_name(key) in restored}
