"""A restored database is the whole database: inheritance and partitions verify, a
partitioned table recovers as one, the database's own properties and grants come back."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from psycopg import sql

from pgdr.catalog.scan import find_backup
from pgdr.postgres import database as whole_database
from pgdr.postgres.cluster import grant_to_server
from pgdr.postgres.postgres import connect
from pgdr.restore import quality
from pgdr.storage.repository import open_repository
from tests.conftest import FIXTURES
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import counts_in, table_fingerprints


def run(url: str, *statements: str | sql.Composable) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def databases(pg) -> set[str]:
    with psycopg.connect(pg.admin_url) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def properties_of(url: str) -> dict:
    with connect(url) as conn:
        found = whole_database.read_properties(conn)
    found["acl"] = sorted(found["acl"], key=lambda a: (a["grantee"] or "", a["privilege"]))
    return found


# --- pure logic ----------------------------------------------------------------------------


@pytest.mark.parametrize("stored, elements", [
    ('"$user", public', ["$user", "public"]),
    ('app, "Odd, ""Name"""', ["app", 'Odd, "Name"']),
    ("", []),
])
def test_list_settings_split_as_postgresql_stores_them(stored, elements):
    assert whole_database.split_list_setting(stored) == elements


DUMPALL = """--
-- PostgreSQL database cluster dump
--

\\restrict abc

SET default_transaction_read_only = off;

CREATE ROLE app;
ALTER ROLE app WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS;
CREATE ROLE "Fleet; Group";
ALTER ROLE "Fleet; Group" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN NOREPLICATION NOBYPASSRLS;
COMMENT ON ROLE "Fleet; Group" IS 'drivers;
and "dispatch"';
CREATE ROLE unrelated;
ALTER ROLE unrelated WITH LOGIN;
GRANT "Fleet; Group" TO app GRANTED BY postgres;
GRANT app TO unrelated GRANTED BY postgres;
"""


def test_the_roles_script_keeps_the_referenced_roles_and_their_groups():
    kept = whole_database.roles_script(DUMPALL, {"owner": ["app"], "acl": [], "policy": [], "settings": []})
    assert kept == [
        "CREATE ROLE app;",
        "ALTER ROLE app WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS;",
        'CREATE ROLE "Fleet; Group";',
        'ALTER ROLE "Fleet; Group" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN NOREPLICATION'
        " NOBYPASSRLS;",
        'COMMENT ON ROLE "Fleet; Group" IS \'drivers;\nand "dispatch"\';',
        'GRANT "Fleet; Group" TO app GRANTED BY postgres;',
    ]


# --- row counts: one rule for backup and validation ----------------------------------------


@pytest.fixture
def inherited_db(pg, tricky_db) -> str:
    """tricky.sql (partitions, odd names) plus a three-level inheritance tree."""
    run(tricky_db,
        "CREATE TABLE vehicles (id int PRIMARY KEY, name text)",
        "CREATE TABLE trucks (payload int) INHERITS (vehicles)",
        'CREATE TABLE "Sales Data"."Electric Trucks" (battery int) INHERITS (trucks)',
        "INSERT INTO vehicles VALUES (1, 'car'), (2, 'bike')",
        "INSERT INTO trucks VALUES (3, 'truck', 10)",
        """INSERT INTO "Sales Data"."Electric Trucks" VALUES (4, 'e1', 1, 100), (5, 'e2', 2, 200)""",
        # The children get this column after their own: pg_dump does not keep that order.
        "ALTER TABLE vehicles ADD COLUMN colour text DEFAULT 'red'")
    return tricky_db


def rows_by_name(url: str, table: str) -> list[str]:
    with psycopg.connect(url) as conn:
        query = sql.SQL("SELECT to_jsonb(t)::text FROM ONLY {} t ORDER BY 1").format(sql.SQL(table))
        return [row[0] for row in conn.execute(query)]


def test_inheritance_and_partitions_back_up_restore_and_verify(capsys, pg, inherited_db, file_repo):
    backup = cli_json(capsys, "backup", "--db", inherited_db, "--repo", file_repo)
    counts = backup["row_counts"]
    # Every row counted once, in the table that stores it.
    tree = ("public.vehicles", "public.trucks", '"Sales Data"."Electric Trucks"')
    assert [counts[t] for t in tree] == [2, 1, 2]
    assert counts["public.measurements_2025_01"] > 0 and "public.measurements" not in counts

    result = cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg.url(), "--keep")
    try:
        assert result["verified"] is True and result["row_counts"] == counts
        manifest = find_backup(open_repository(file_repo), backup["backup_id"])
        assert set(manifest.digests) == set(counts)  # contents checked too, not only counts
        restored = pg.url(result["temp_database"])
        # pg_dump puts a child's inherited columns first: compare those rows by column name.
        for table in tree:
            assert rows_by_name(restored, table) == rows_by_name(inherited_db, table)
        shuffled = {f"public.{name}" for name in ("trucks", "vehicles")} | {tree[2]}
        assert {k: v for k, v in table_fingerprints(restored).items() if k not in shuffled} \
            == {k: v for k, v in table_fingerprints(inherited_db).items() if k not in shuffled}
    finally:
        pg.drop_database(result["temp_database"])


def test_a_partitioned_table_recovers_with_all_its_partitions(capsys, pg, tricky_db, file_repo):
    backup = cli_json(capsys, "backup", "--db", tricky_db, "--repo", file_repo)
    before = table_fingerprints(tricky_db)
    # Rows lost in every partition, one changed.
    run(tricky_db, "DELETE FROM public.measurements WHERE id % 4 = 0",
        "UPDATE public.measurements SET reading = -1 WHERE id = 1")

    result = cli_json(capsys, "recover-table", backup["backup_id"], "--target", tricky_db,
                      "--repo", file_repo, "--table", "measurements", "--mode", "replace")
    (entry,) = result["tables"]
    assert entry["table"] == "public.measurements" and entry["rows_updated"] == 1
    assert entry["rows_inserted"] == 100
    assert table_fingerprints(tricky_db) == before
    assert counts_in(tricky_db) == backup["row_counts"]


def test_a_digest_catches_a_changed_value_that_the_counts_miss(capsys, pg, tricky_db, file_repo,
                                                               monkeypatch):
    cli_json(capsys, "backup", "--db", tricky_db, "--repo", file_repo)
    validate = quality.validate_row_counts

    def changed_before_validation(url, expected, digests=None, **options):
        run(url, """UPDATE "Sales Data"."Customers" SET "Full Name" = 'Mallory' WHERE "Customer ID" = 7""")
        return validate(url, expected, digests, **options)

    monkeypatch.setattr(quality, "validate_row_counts", changed_before_validation)
    before = databases(pg)
    code, _out, err = run_cli(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg.url())
    line = error_line(err)
    assert code == 1 and '"Sales Data"."Customers": 43 rows as expected' in line and "digest" in line
    assert databases(pg) == before


def test_pagila_round_trips_and_its_partitioned_payment_recovers(capsys, pg, pagila_db, file_repo):
    backup = cli_json(capsys, "backup", "--db", pagila_db, "--repo", file_repo)
    assert cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg.url())["verified"]
    result = cli_json(capsys, "recover-table", backup["backup_id"], "--target", pagila_db,
                      "--repo", file_repo, "--table", "payment")
    assert [t["table"] for t in result["tables"]] == ["public.payment"]


# --- the database's own properties -----------------------------------------------------------


@pytest.fixture
def roles(pg):
    """Three roles of this test: the owner, a reader with CONNECT, an outsider without."""
    tag = uuid.uuid4().hex[:8]
    names = {"owner": f"app owner {tag}", "reader": f"reader_{tag}", "outsider": f"outsider_{tag}"}
    run(pg.admin_url, *(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(n)) for n in names.values()))
    yield names
    for name in names.values():
        with psycopg.connect(pg.admin_url, autocommit=True) as conn:
            for (db,) in conn.execute("SELECT datname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba"
                                      " WHERE r.rolname = %s", (name,)).fetchall():
                pg.drop_database(db)
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def secure(pg, url: str, roles: dict[str, str]) -> None:
    """Database-level security and settings as production has them."""
    db = sql.Identifier(url.rsplit("/", 1)[1])
    run(pg.admin_url,
        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, sql.Identifier(roles["owner"])),
        sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db),
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, sql.Identifier(roles["reader"])),
        sql.SQL("ALTER DATABASE {} CONNECTION LIMIT 17").format(db),
        sql.SQL("ALTER DATABASE {} SET search_path = \"$user\", app, \"Odd, Schema\"").format(db),
        sql.SQL("ALTER DATABASE {} SET statement_timeout = '5min'").format(db),
        sql.SQL("ALTER DATABASE {} SET app.tenant = 'it''s'").format(db),
        sql.SQL("ALTER ROLE {} IN DATABASE {} SET work_mem = '8MB'").format(
            sql.Identifier(roles["reader"]), db),
        sql.SQL("COMMENT ON DATABASE {} IS 'fleet, production'").format(db))


def can_connect(pg, url: str, role: str) -> bool:
    try:
        with psycopg.connect(pg.cluster.url(url.rsplit("/", 1)[1], user=role), connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def test_properties_and_grants_survive_a_restore_over_the_live_database(capsys, pg, new_db, roles, file_repo):
    target = new_db("secured")
    run(target, "CREATE TABLE orders (id int PRIMARY KEY)",
        "INSERT INTO orders SELECT generate_series(1, 50)")
    secure(pg, target, roles)
    expected = properties_of(target)
    assert not can_connect(pg, target, roles["outsider"]) and can_connect(pg, target, roles["reader"])
    backup = cli_json(capsys, "backup", "--db", target, "--repo", file_repo)

    # Whoever lacks CONNECT tries all along the restore, swap included.
    stop, got_in = threading.Event(), []

    def outsider():
        while not stop.is_set():
            if can_connect(pg, target, roles["outsider"]):
                got_in.append(True)

    probe = threading.Thread(target=outsider)
    probe.start()
    try:
        result = cli_json(capsys, "restore", backup["backup_id"], "--target", target, "--repo", file_repo,
                          "--no-pre-restore-backup")
    finally:
        stop.set()
        probe.join()
    assert result["verified"] and result["previous_database"]
    assert properties_of(target) == expected
    assert got_in == []
    pg.drop_database(result["previous_database"])


def test_properties_come_with_a_restore_into_a_new_database_and_restore_temp(capsys, pg, new_db, roles,
                                                                              file_repo):
    source = new_db("secured")
    secure(pg, source, roles)
    expected = properties_of(source)
    cli_json(capsys, "backup", "--db", source, "--repo", file_repo)
    target = pg.url(f"copy_{uuid.uuid4().hex[:8]}")
    try:
        cli_json(capsys, "restore", "latest", "--target", target, "--repo", file_repo)
        assert properties_of(target) == expected
    finally:
        pg.drop_database(target.rsplit("/", 1)[1])
    kept = cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg.url(), "--keep")
    try:
        assert properties_of(pg.url(kept["temp_database"])) == expected
    finally:
        pg.drop_database(kept["temp_database"])


def test_a_backup_without_properties_restores_with_postgresqls_default_acl(capsys, pg, new_db, file_repo):
    source = new_db("older")
    run(source, "CREATE TABLE t (id int)")
    backup = cli_json(capsys, "backup", "--db", source, "--repo", file_repo)
    repo = open_repository(file_repo)
    manifest = find_backup(repo, backup["backup_id"])
    manifest.database_properties = None  # written by a pgdr that did not record them
    repo.put_bytes(manifest.manifest_key, manifest.to_json())
    kept = cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg.url(), "--keep")
    try:
        acl = properties_of(pg.url(kept["temp_database"]))["acl"]
        public = {a["privilege"] for a in acl if a["grantee"] is None}
        assert public == {"CONNECT", "TEMPORARY"}
    finally:
        pg.drop_database(kept["temp_database"])


# --- roles: a fresh server in another region, and PostgreSQL 15 -> 17 ------------------------


def roles_on(server, names) -> set[str]:
    with psycopg.connect(server.admin_url) as conn:
        return {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (names,))}


def test_a_fresh_server_without_the_roles_refuses_then_creates_them(capsys, pg, pg17, new_db, roles,
                                                                   file_repo):
    """A backup of a PostgreSQL 15 database, restored onto an empty PostgreSQL 17 server."""
    source = new_db("secured")
    owner = sql.Identifier(roles["owner"])
    run(source,
        sql.SQL("CREATE SCHEMA app AUTHORIZATION {}").format(owner),
        "CREATE TABLE app.trips (id int PRIMARY KEY, driver text)",
        "INSERT INTO app.trips SELECT i, 'driver ' || i FROM generate_series(1, 30) i",
        sql.SQL("ALTER TABLE app.trips OWNER TO {}").format(owner),
        "ALTER TABLE app.trips ENABLE ROW LEVEL SECURITY",
        sql.SQL("CREATE POLICY own_trips ON app.trips TO {} USING (driver = current_user)").format(
            sql.Identifier(roles["reader"])),
        sql.SQL("GRANT USAGE ON SCHEMA app TO {}").format(sql.Identifier(roles["reader"])),
        sql.SQL("GRANT SELECT ON app.trips TO {}").format(sql.Identifier(roles["reader"])))
    secure(pg, source, roles)
    expected, content = properties_of(source), table_fingerprints(source)
    cli_json(capsys, "backup", "--db", source, "--repo", file_repo)
    target = pg17.url(source.rsplit("/", 1)[1])
    before = databases(pg17)

    code, _out, err = run_cli(capsys, "restore", "latest", "--target", target, "--repo", file_repo)
    line = error_line(err)
    assert code == 1 and roles["owner"] in line and roles["reader"] in line and "--create-roles" in line
    assert roles["outsider"] not in line  # no object refers to it
    assert databases(pg17) == before and roles_on(pg17, list(roles.values())) == set()

    try:
        result = cli_json(capsys, "restore", "latest", "--target", target, "--repo", file_repo,
                          "--create-roles")
        assert result["verified"]
        assert roles_on(pg17, list(roles.values())) == {roles["owner"], roles["reader"]}
        assert properties_of(target) == expected and table_fingerprints(target) == content
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'trips'").fetchone()[0] \
                == roles["owner"]
            assert conn.execute("SELECT has_table_privilege(%s, 'app.trips', 'SELECT')",
                                (roles["reader"],)).fetchone()[0]
    finally:
        pg17.drop_database(target.rsplit("/", 1)[1])
        for name in (roles["reader"], roles["owner"]):
            run(pg17.admin_url, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_a_server_without_the_tablespace_refuses_before_anything_changes(capsys, pg, pg17, new_db, file_repo,
                                                                         tmp_path):
    location = tmp_path / "fast disk"
    location.mkdir()
    grant_to_server(location)
    space = f"fast_{uuid.uuid4().hex[:8]}"
    run(pg.admin_url, sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
        sql.Identifier(space), sql.Literal(str(location))))
    source = new_db("spaced")
    try:
        run(source, sql.SQL("CREATE TABLE hot (id int) TABLESPACE {}").format(sql.Identifier(space)))
        cli_json(capsys, "backup", "--db", source, "--repo", file_repo)
        before = databases(pg17)
        code, _out, err = run_cli(capsys, "restore-temp", "latest", "--repo", file_repo,
                                  "--server", pg17.url())
        assert code == 1 and f"lacks the tablespace(s) {space}" in error_line(err)
        assert databases(pg17) == before
    finally:
        pg.drop_database(source.rsplit("/", 1)[1])
        run(pg.admin_url, sql.SQL("DROP TABLESPACE {}").format(sql.Identifier(space)))


@pytest.mark.parametrize("options", [("--no-owner", "--no-acl"), ("--no-owner", "--create-roles")],
                         ids=["no-owner-no-acl", "no-owner-create-roles"])
def test_no_owner_restores_onto_a_server_without_the_owner(options, capsys, pg, pg17, new_db, roles,
                                                          file_repo):
    source = new_db("secured")
    run(source, "CREATE TABLE trips (id int PRIMARY KEY)", "INSERT INTO trips SELECT generate_series(1, 10)",
        sql.SQL("ALTER TABLE trips OWNER TO {}").format(sql.Identifier(roles["owner"])))
    secure(pg, source, roles)
    cli_json(capsys, "backup", "--db", source, "--repo", file_repo)
    kept = cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg17.url(), "--keep",
                    *options)
    try:
        assert kept["verified"] and kept["row_counts"] == {"public.trips": 10}
        restored = properties_of(pg17.url(kept["temp_database"]))
        assert restored["connection_limit"] == 17 and restored["comment"] == "fleet, production"
        assert restored["owner"] == "postgres"
        grantees = {a["grantee"] for a in restored["acl"]}
        if "--no-acl" in options:
            assert roles_on(pg17, list(roles.values())) == set() and grantees == {None, "postgres"}
        else:  # the reader and its CONNECT come back; the owner's privileges go to the owner here
            assert roles_on(pg17, list(roles.values())) == {roles["reader"]}
            assert grantees == {"postgres", roles["reader"]}
    finally:
        pg17.drop_database(kept["temp_database"])
        run(pg17.admin_url, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(roles["reader"])))


# --- the core round trips on each supported major version -------------------------------------


@pytest.fixture(params=[15, 17], ids=["pg15", "pg17"])
def server(request):
    return request.getfixturevalue("pg" if request.param == 15 else "pg17")


def test_core_round_trips_on_each_major_version(capsys, server, file_repo):
    """backup, restore (new database and over the live one), restore-temp, recover-table."""
    name = f"tricky_{uuid.uuid4().hex[:8]}"
    source = server.create_database(name)
    try:
        server.load_sql(source, FIXTURES / "tricky.sql")
        content = table_fingerprints(source)
        backup = cli_json(capsys, "backup", "--db", source, "--repo", file_repo)
        assert backup["row_counts"] == counts_in(source)

        temp = cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", server.url())
        assert temp["verified"] and temp["row_counts"] == backup["row_counts"]

        run(source, 'DELETE FROM "Sales Data"."Order Items" WHERE "Line No" = 2')
        cli_json(capsys, "recover-table", "latest", "--target", source, "--repo", file_repo,
                 "--table", '"Sales Data"."Order Items"')
        assert table_fingerprints(source) == content

        run(source, "DELETE FROM public.measurements")
        over = cli_json(capsys, "restore", backup["backup_id"], "--target", source, "--repo", file_repo,
                        "--no-pre-restore-backup")
        assert over["verified"] and table_fingerprints(source) == content
        server.drop_database(over["previous_database"])
    finally:
        server.drop_database(name)
