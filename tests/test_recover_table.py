"""Selective table recovery on a real PostgreSQL: the runbook's "someone deleted rows"."""

from __future__ import annotations

import psycopg
import pytest

from pgdr.ops.errors import ConfigError
from pgdr.restore import row_filter, table_rows
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import table_fingerprints

ORDERS = "public.orders"


def databases(pg) -> set[str]:
    with psycopg.connect(pg.admin_url) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def sql_rows(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def run(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture
def orders(new_db) -> str:
    """A database whose `orders` (identity key, 1000 rows) referenced by `shipments`."""
    url = new_db("shop")
    run(url,
        "CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " customer int NOT NULL, note text, total numeric(10, 2))",
        "INSERT INTO orders (customer, note, total)"
        " SELECT i % 17, 'original ' || i, i * 1.5 FROM generate_series(1, 1000) i",
        "CREATE TABLE shipments (id serial PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders)",
        "INSERT INTO shipments (order_id) SELECT i FROM generate_series(1, 20) i")
    return url


def after_the_backup(url: str) -> None:
    """The user error and the life that went on: 100 rows deleted, others changed, new ones."""
    run(url,
        "DELETE FROM orders WHERE id BETWEEN 401 AND 500",
        "UPDATE orders SET note = 'changed later' WHERE id <= 50",
        "INSERT INTO orders (customer, note) SELECT 99, 'new ' || i FROM generate_series(1, 5) i")


def recover(capsys, *argv: str) -> dict:
    return cli_json(capsys, "recover-table", *argv)


def test_missing_rows_brings_back_exactly_the_deleted_rows(capsys, pg, orders, file_repo):
    cli_json(capsys, "backup", "--db", orders, "--repo", file_repo)
    original = sql_rows(orders, "SELECT * FROM orders WHERE id BETWEEN 401 AND 500 ORDER BY id")
    after_the_backup(orders)
    kept = sql_rows(orders, "SELECT * FROM orders ORDER BY id")
    before_dbs = databases(pg)

    result = recover(capsys, "latest", "--target", orders, "--table", "orders", "--repo", file_repo)

    assert result["mode"] == "missing-rows" and result["dry_run"] is False
    assert result["target"].endswith("/" + orders.rsplit("/", 1)[1])
    [table] = result["tables"]
    assert table["table"] == ORDERS
    assert (table["rows_in_backup"], table["rows_present"], table["rows_inserted"]) == (1000, 900, 100)
    assert table["side_table"] is None
    now = sql_rows(orders, "SELECT * FROM orders ORDER BY id")
    # Exactly the deleted rows came back; the changed and the new rows are as they were.
    assert sorted(set(now) - set(kept)) == original
    assert set(kept) <= set(now) and len(now) == len(kept) + 100
    assert databases(pg) == before_dbs
    # A new order gets an id past every recovered one.
    [(new_id,)] = sql_rows(orders, "INSERT INTO orders (customer) VALUES (1) RETURNING id")
    assert new_id > max(row[0] for row in now)


def test_a_truncated_table_comes_back_and_its_sequence_moves_past_it(capsys, pg, tricky_db, file_repo):
    cli_json(capsys, "backup", "--db", tricky_db, "--repo", file_repo)
    source = table_fingerprints(tricky_db)
    run(tricky_db, "TRUNCATE inventory.items RESTART IDENTITY")  # the sequence starts at 1 again

    result = recover(capsys, "latest", "--target", tricky_db, "--table", "inventory.items",
                     "--repo", file_repo)

    [table] = result["tables"]
    assert (table["rows_in_backup"], table["rows_present"], table["rows_inserted"]) == (100, 0, 100)
    assert table["sequences"] == [{"sequence": "inventory.items_id_seq", "column": "id", "from": 0,
                                   "to": 100}]
    assert table_fingerprints(tricky_db)["inventory.items"] == source["inventory.items"]
    [(new_id,)] = sql_rows(tricky_db,
                           "INSERT INTO inventory.items (sku, on_hand) VALUES ('NEW', 1) RETURNING id")
    assert new_id == 101


def test_quoted_mixed_case_tables_recover_together(capsys, pg, tricky_db, file_repo):
    cli_json(capsys, "backup", "--db", tricky_db, "--repo", file_repo)
    source = table_fingerprints(tricky_db)
    items, customers = '"Sales Data"."Order Items"', '"Sales Data"."Customers"'
    run(tricky_db,
        'DELETE FROM "Sales Data"."Order Items" WHERE "Customer ID" IN (41, 42, 43)',
        'DELETE FROM "Sales Data"."Customers" WHERE "Customer ID" IN (41, 42, 43)')

    # Parents first: the recovered order items refer to the recovered customers.
    result = recover(capsys, "latest", "--target", tricky_db, "--table", customers, "--table",
                     ' "Sales Data" . "Order Items" ', "--repo", file_repo)

    assert [t["table"] for t in result["tables"]] == [customers, items]
    assert [t["rows_inserted"] for t in result["tables"]] == [3, 21]
    after = table_fingerprints(tricky_db)
    # The identity (GENERATED ALWAYS) values came back as they were.
    assert after[customers] == source[customers] and after[items] == source[items]


def test_replace_makes_the_table_the_backups(capsys, pg, orders, file_repo):
    cli_json(capsys, "backup", "--db", orders, "--repo", file_repo)
    at_backup = table_fingerprints(orders)
    after_the_backup(orders)
    shipments = table_fingerprints(orders)["public.shipments"]

    result = recover(capsys, "latest", "--target", orders, "--table", "orders", "--mode", "replace",
                     "--repo", file_repo)

    [table] = result["tables"]
    assert table["rows_replaced"] == 1000
    assert (table["rows_inserted"], table["rows_updated"], table["rows_deleted"]) == (100, 50, 5)
    after = table_fingerprints(orders)
    assert after["public.orders"] == at_backup["public.orders"]
    assert after["public.shipments"] == shipments


@pytest.mark.parametrize("on_delete, message", [
    ("NO ACTION", "recovering public.orders failed: update or delete on table"),
    ("CASCADE", "replacing public.orders would delete 5 row(s) and cascade into shipments"),
])
def test_replace_refuses_to_break_a_foreign_key_and_changes_nothing(on_delete, message, capsys, pg, orders,
                                                                    file_repo):
    run(orders, "ALTER TABLE shipments DROP CONSTRAINT shipments_order_id_fkey",
        f"ALTER TABLE shipments ADD FOREIGN KEY (order_id) REFERENCES orders ON DELETE {on_delete}")
    cli_json(capsys, "backup", "--db", orders, "--repo", file_repo)
    after_the_backup(orders)
    run(orders, "INSERT INTO shipments (order_id) SELECT max(id) FROM orders")  # refers to a new order
    before, before_dbs = table_fingerprints(orders), databases(pg)

    code, out, err = run_cli(capsys, "recover-table", "latest", "--target", orders, "--table", "orders",
                             "--mode", "replace", "--repo", file_repo)

    line = error_line(err)
    assert code == 1 and out == ""
    assert message in line and "shipments" in line
    assert table_fingerprints(orders) == before
    assert databases(pg) == before_dbs  # the temporary database is gone after a failure too


def test_side_table_loads_the_backups_rows_beside_the_original(capsys, pg, tricky_db, file_repo):
    cli_json(capsys, "backup", "--db", tricky_db, "--repo", file_repo)
    items = '"Sales Data"."Order Items"'
    expected = sql_rows(tricky_db, 'SELECT * FROM "Sales Data"."Order Items" WHERE "Order ID" < 1010'
                        ' ORDER BY 1, 2')
    run(tricky_db, 'DELETE FROM "Sales Data"."Order Items" WHERE "Line No" = 2')
    before = table_fingerprints(tricky_db)

    result = recover(capsys, "latest", "--target", tricky_db, "--table", items, "--mode", "side-table",
                     "--where", '"Order ID" < 1010 AND note IS DISTINCT FROM \'a;b\'', "--repo", file_repo)

    [table] = result["tables"]
    side = table["side_table"]
    assert side.startswith('"Sales Data"."Order Items_recovered_')
    assert table["rows_in_backup"] == table["rows_inserted"] == len(expected) == 29
    assert table["rows_present"] == 19  # 10 of them were deleted since
    assert sql_rows(tricky_db, f"SELECT * FROM {side} ORDER BY 1, 2") == expected
    after = table_fingerprints(tricky_db)
    assert after.pop(side) and after == before  # the original and everything else untouched


def test_where_limits_the_rows_brought_back(capsys, pg, orders, file_repo):
    cli_json(capsys, "backup", "--db", orders, "--repo", file_repo)
    after_the_backup(orders)

    code, out, err = run_cli(capsys, "recover-table", "latest", "--target", orders, "--table",
                             "public.orders", "--where", "id <= 450 AND note LIKE 'original%'",
                             "--repo", file_repo)

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Recovered 1 table(s) from ") and "where id <= 450" in lines[0]
    assert lines[2].split() == ["public.orders", "450", "400", "50", "-", "-", "-"]
    assert sql_rows(orders, "SELECT min(id), max(id), count(*) FROM orders WHERE id BETWEEN 401 AND 500") \
        == [(401, 450, 50)]


@pytest.mark.parametrize("mode", ["missing-rows", "replace", "side-table"])
def test_dry_run_reports_and_changes_nothing(mode, capsys, pg, orders, file_repo):
    cli_json(capsys, "backup", "--db", orders, "--repo", file_repo)
    after_the_backup(orders)
    before, before_dbs = table_fingerprints(orders), databases(pg)

    result = recover(capsys, "latest", "--target", orders, "--table", "orders", "--mode", mode,
                     "--dry-run", "--repo", file_repo)

    assert result["dry_run"] is True and result["mode"] == mode
    [table] = result["tables"]
    assert table["rows_in_backup"] == 1000 and table["rows_present"] == 900
    assert table["side_table"] is None
    expected = {"missing-rows": (100, None, None), "replace": (100, 50, 5), "side-table": (1000, None, None)}
    assert (table["rows_inserted"], table["rows_updated"], table["rows_deleted"]) == expected[mode]
    assert table_fingerprints(orders) == before
    assert databases(pg) == before_dbs


@pytest.mark.parametrize("argv, message", [
    (["--table", "orders; DROP TABLE shipments"], "is not a table name"),
    (["--table", '"orders"; --'], "is not a table name"),
    (["--table", "orders;DROP"], "not a valid identifier"),
    (["--table", '"orders; DROP TABLE shipments"'], "is not a table in this backup"),
    (["--table", "public.nope"], "is not a table in this backup"),
    (["--table", "orders", "--table", "Public.Missing"], "is not a table in this backup"),
    (["--table", "orders", "--where", "1=1; DROP TABLE shipments"], "may not contain ';'"),
    (["--table", "orders", "--where", "1=1) OR (true"], "unbalanced ')'"),
    (["--table", "orders", "--where", "true -- comment"], "comments"),
    (["--table", "orders", "--mode", "replace", "--where", "$x$;$x$ = '' ; DROP TABLE shipments"],
     "may not contain ';'"),
    (["--table", "orders", "--where", "no_such_column = 1"], "the row filter does not work on public.orders"),
    (["--table", "orders", "--where", "pg_catalog.nextval('orders_id_seq') > 0"],
     "the row filter does not work on public.orders"),
])
def test_bad_names_and_filters_are_refused_and_change_nothing(argv, message, capsys, pg, orders, file_repo):
    cli_json(capsys, "backup", "--db", orders, "--repo", file_repo)
    after_the_backup(orders)
    before, before_dbs = table_fingerprints(orders), databases(pg)

    code, out, err = run_cli(capsys, "recover-table", "latest", "--target", orders, "--repo", file_repo,
                             *argv)

    assert code == 1 and out == ""
    assert message in error_line(err)
    assert table_fingerprints(orders) == before
    assert databases(pg) == before_dbs


def test_missing_rows_refuses_a_table_without_a_primary_key(capsys, pg, tricky_db, file_repo):
    cli_json(capsys, "backup", "--db", tricky_db, "--repo", file_repo)
    before, before_dbs = table_fingerprints(tricky_db), databases(pg)
    code, _out, err = run_cli(capsys, "recover-table", "latest", "--target", tricky_db, "--table",
                              "event_log", "--repo", file_repo)
    assert code == 1 and "public.event_log has no primary key" in error_line(err)
    assert table_fingerprints(tricky_db) == before and databases(pg) == before_dbs


def test_the_filter_cannot_run_a_second_statement_even_past_the_syntax_check(orders):
    """The server-side guard on its own: the extended protocol refuses a second statement."""
    escape = "true); DROP TABLE shipments; SELECT (1"
    with psycopg.connect(orders) as conn:
        shape = table_rows.table_shape(conn, "public", "orders")
        with pytest.raises(ConfigError, match="cannot insert multiple commands"):
            table_rows.count_source_rows(conn, shape, escape)
    assert sql_rows(orders, "SELECT count(*) FROM shipments") == [(20,)]
    with pytest.raises(ConfigError):
        row_filter.check_row_filter(escape)


@pytest.mark.parametrize("text", ["note = 'a;b'", "note = E'it\\'s; fine'", '"my;col" = 1',
                                  "note = $q$ -- ) ; $q$", "(id < 3) OR (id > 5)"])
def test_filters_with_separators_inside_literals_are_accepted(text):
    assert row_filter.check_row_filter(text) == text


# --- the row filter runs with least privilege -------------------------------------------------


@pytest.fixture
def victims(pg, orders, new_db):
    """Two idle sessions a filter must not touch: one on the production target, one on
    another database of the server. Yields their backend pids."""
    other = new_db("bystander")
    sessions = [psycopg.connect(orders, autocommit=True), psycopg.connect(other, autocommit=True)]
    yield [s.info.backend_pid for s in sessions]
    for session in sessions:
        assert session.execute("SELECT 1").fetchone() == (1,), "a victim session was ended"
        session.close()


def filter_roles(pg) -> list[str]:
    query = "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)"
    return [r[0] for r in sql_rows(pg.admin_url, query, (row_filter.FILTER_ROLE_PREFIX,))]


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_filter_cannot_end_sessions_on_the_server(dry_run, capsys, pg, orders, victims, file_repo):
    cli_json(capsys, "backup", "--db", orders, "--repo", file_repo)
    before, before_dbs = table_fingerprints(orders), databases(pg)
    attack = " OR ".join(f"pg_catalog.pg_terminate_backend({pid})" for pid in victims)

    code, out, err = run_cli(capsys, "recover-table", "latest", "--target", orders, "--repo", file_repo,
                             "--table", "orders", "--where", f"id > 0 AND ({attack})",
                             *(["--dry-run"] if dry_run else []))

    assert code == 1 and out == ""
    assert "calls pg_terminate_backend(integer,bigint)" in error_line(err)
    assert table_fingerprints(orders) == before and databases(pg) == before_dbs
    assert filter_roles(pg) == []


def test_a_filter_cannot_probe_server_files(capsys, pg, orders, file_repo):
    cli_json(capsys, "backup", "--db", orders, "--repo", file_repo)
    code, _out, err = run_cli(capsys, "recover-table", "latest", "--target", orders, "--repo", file_repo,
                              "--table", "orders", "--where",
                              "length(pg_read_file('/etc/hostname')) > 0 AND id < 10", "--dry-run")
    assert code == 1 and "calls pg_read_file(text)" in error_line(err)
    assert filter_roles(pg) == []


def test_a_filter_runs_as_a_role_that_may_only_read_its_table(pg, orders, victims):
    """The second wall, on its own: even a call that passed the allow-list would run as a
    role with SELECT on the one table, read-only, under a statement timeout."""
    with row_filter.filter_reader(orders, "public", "orders", "id < 10", timeout_seconds=7) as conn:
        role, superuser = conn.execute("SELECT current_user, rolsuper FROM pg_roles"
                                       " WHERE rolname = current_user").fetchone()
        assert role.startswith(row_filter.FILTER_ROLE_PREFIX) and superuser is False
        assert conn.execute("SHOW statement_timeout").fetchone() == ("7s",)
        assert conn.execute("SELECT count(*) FROM orders WHERE id < 10").fetchone() == (9,)
        for refused in [f"SELECT pg_terminate_backend({victims[0]})", "SELECT pg_read_file('/etc/hostname')",
                        "SELECT count(*) FROM shipments", "CREATE TABLE public.x ()"]:
            with pytest.raises(psycopg.Error):
                conn.execute(refused)
            conn.rollback()
    assert filter_roles(pg) == []


@pytest.mark.parametrize("text", ["id < 10 AND note LIKE 'original%'", "total::numeric(10, 2) > 1.5",
                                  "coalesce(note, '') ~ '^orig' AND customer IN (1, 2, 3)",
                                  "now() - interval '1 day' < now() AND lower(note) <> upper(note)"])
def test_ordinary_filters_pass_the_allow_list(text, orders):
    with psycopg.connect(orders) as conn:
        shape = table_rows.table_shape(conn, "public", "orders")
        row_filter.refuse_unsafe_filter(conn, shape, text)
        assert table_rows.count_source_rows(conn, shape, text) >= 0
