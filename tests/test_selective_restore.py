"""Selective work costs what it selects: `restore --table` (and recover-table, which uses
the same path) restores the backup's schema and only the named tables' rows."""

from __future__ import annotations

import psycopg

from pgdr.restore.selective import chosen_entries
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import table_fingerprints

ORDER_ITEMS = '"Sales Data"."Order Items"'

LISTING = """;
; Archive created at 2026-12-01 15:00:00 UTC
;
218; 1259 16411 TABLE Sales Data Order Items postgres
3450; 0 0 COMMENT Sales Data TABLE "Order Items" postgres
3427; 0 16402 TABLE DATA Sales Data Order postgres
3428; 0 16411 TABLE DATA Sales Data Order Items postgres
3430; 0 16429 TABLE DATA inventory items postgres
3454; 0 0 SEQUENCE SET inventory items_id_seq postgres
3260; 2606 16418 CONSTRAINT Sales Data Order Items Order Items_pkey postgres
"""
# pg_restore --list -n "Sales Data" -t "Order Items": pg_restore matched the names itself.
NARROWED = """;
218; 1259 16411 TABLE Sales Data Order Items postgres
3450; 0 0 COMMENT Sales Data TABLE "Order Items" postgres
3428; 0 16411 TABLE DATA Sales Data Order Items postgres
"""


def test_the_list_keeps_the_named_tables_rows_and_every_sequence_value_in_archive_order():
    chosen = chosen_entries(LISTING, [NARROWED])
    assert [line.split(";")[0] for line in chosen] == ["3428", "3454"]
    assert chosen_entries(LISTING, []) == ["3454; 0 0 SEQUENCE SET inventory items_id_seq postgres"]


def _rows(url: str, query: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def test_restore_of_named_tables_brings_their_rows_and_the_schema_they_need(capsys, pg, tricky_db, file_repo,
                                                                             new_db):
    backup = cli_json(capsys, "backup", "--db", tricky_db, "--repo", file_repo)
    source = table_fingerprints(tricky_db)
    target = pg.url(f"part_{backup['backup_id'][-4:]}")

    result = cli_json(capsys, "restore", backup["backup_id"], "--target", target, "--repo", file_repo,
                      "--table", ORDER_ITEMS, "--table", "inventory.items")
    new_db_name = target.rsplit("/", 1)[1]
    try:
        assert result["verified"] is True
        assert result["row_counts"] == {ORDER_ITEMS: 300, "inventory.items": 100}
        restored = table_fingerprints(target)
        # The named tables hold exactly the backup's rows, their enum and sequences with them.
        for key in (ORDER_ITEMS, "inventory.items", "sequence:inventory.items_id_seq",
                    "sequence:inventory.invoice_no"):
            assert restored[key] == source[key], key
        # Every other table is there, empty: its rows were never restored.
        assert _rows(target, 'SELECT count(*) FROM "Sales Data"."Customers"') == [(0,)]
        assert _rows(target, "SELECT count(*) FROM public.measurements") == [(0,)]
        assert source['"Sales Data"."Customers"'] != restored['"Sales Data"."Customers"']
        # No index or constraint was built for them either: only the schema's pre-data.
        assert _rows(target, "SELECT count(*) FROM pg_constraint WHERE contype IN ('p', 'u', 'f') "
                             "AND connamespace::regnamespace::text <> 'pg_catalog'") == [(0,)]
    finally:
        pg.drop_database(new_db_name)


def test_restore_of_named_tables_into_an_existing_database_is_refused(capsys, pg, tricky_db, file_repo):
    cli_json(capsys, "backup", "--db", tricky_db, "--repo", file_repo)
    before = table_fingerprints(tricky_db)
    code, _out, err = run_cli(capsys, "restore", "latest", "--target", tricky_db, "--repo", file_repo,
                              "--table", "inventory.items", "--json")
    assert code == 1
    assert "--table restores into a new database only" in error_line(err)
    assert table_fingerprints(tricky_db) == before
