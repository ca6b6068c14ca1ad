"""The fleet: many databases backed up as separate flow runs, spread over a real work pool's
worker, at most the per-server limit at once; one failure fails only its own run."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType

from deployments.register import register
from flows.fleet import fleet as fleet_flow
from pgdr.catalog import verification
from pgdr.catalog.scan import list_backups
from pgdr.dr import fleet
from pgdr.postgres.cluster import free_port
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.fake_pg_dump import overlap, timed_pg_bin
from tests.support.worker import process_worker, worker_env

POOL = "pgdr-fleet-test"


def small_database(new_db, rows: int) -> str:
    url = new_db("fleet_member")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE readings (id bigint PRIMARY KEY, value text)")
        conn.execute("INSERT INTO readings SELECT g, md5(g::text) FROM generate_series(1, %s) g", [rows])
    return url


async def _pool() -> None:
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)


async def _limit(name: str) -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(name)).limit


async def _state_of(run_id: str) -> StateType:
    async with get_client() as client:
        return (await client.read_flow_run(run_id)).state.type


def test_five_databases_on_one_server_never_more_than_two_at_once(new_db, file_repo, tmp_path):
    urls = [small_database(new_db, 2000 + i) for i in range(5)]
    dumps = tmp_path / "dumps.log"
    bin_dir = timed_pg_bin(tmp_path / "bin", dumps, hold=2.0)
    asyncio.run(_pool())
    register(["backup/fleet"], work_pool=POOL)
    # One worker that would run all five at once: only the server's limit holds them back.
    with process_worker(POOL, tmp_path, worker_env(PGDR_PG_BIN=str(bin_dir)), "--limit", "5") as log:
        result = fleet_flow(databases=urls, repo=file_repo, host_limit=2, max_parallel=5,
                            deployment="backup/fleet")

    rows = result["databases"]
    assert [row["status"] for row in rows] == ["ok"] * 5, log.read_text()[-3000:]
    assert result["ok"]
    assert all(row["size_bytes"] and row["flow_run"] for row in rows)
    assert len({row["flow_run"] for row in rows}) == 5  # each database its own flow run
    repo = open_repository(file_repo)
    for url in urls:
        (stored,) = list_backups(repo, url.rsplit("/", 1)[1])
        assert stored.row_counts == {"public.readings": 2000 + urls.index(url)}
    host = fleet.Member.of(urls[0]).host
    assert asyncio.run(_limit(fleet.HOST_LIMIT_PREFIX + host)) == 2
    assert result["server_limits"] == {host: 2}
    assert len(dumps.read_text().splitlines()) == 5
    assert overlap(dumps) <= 2


def test_an_unreachable_database_fails_its_own_run_and_the_fleet_not_the_others(new_db, file_repo, capsys):
    urls = [small_database(new_db, 100 * (i + 1)) for i in range(4)]
    ghost = f"postgresql://postgres@127.0.0.1:{free_port()}/ghost"
    listed = [arg for url in [*urls[:2], ghost, *urls[2:]] for arg in ("--db", url)]
    code, out, err = run_cli(capsys, "fleet", "--local", "--repo", file_repo, "--host-limit", "2", *listed,
                             "--json")
    assert code == 1
    assert "ghost (cannot connect to postgres@127.0.0.1" in error_line(err)
    report = json.loads(out)
    assert not report["ok"]
    by_name = {row["database"]: row for row in report["databases"]}
    assert [row["database"] for row in report["databases"]] == [
        url.rsplit("/", 1)[1] for url in urls[:2]] + ["ghost"] + [url.rsplit("/", 1)[1] for url in urls[2:]]
    assert by_name["ghost"]["status"] == "failed" and "cannot connect" in by_name["ghost"]["reason"]
    assert asyncio.run(_state_of(by_name["ghost"]["flow_run"])) == StateType.FAILED
    repo = open_repository(file_repo)
    for index, url in enumerate(urls):
        row = by_name[url.rsplit("/", 1)[1]]
        assert row["status"] == "ok" and row["size_bytes"] > 0
        assert asyncio.run(_state_of(row["flow_run"])) == StateType.COMPLETED
        (stored,) = list_backups(repo, url.rsplit("/", 1)[1])
        assert stored.row_counts == {"public.readings": 100 * (index + 1)}
    assert list_backups(repo, "ghost") == []


def test_discovery_honours_patterns_and_never_takes_templates(pg, new_db):
    names = {}
    for kind in ("orders_eu", "orders_us", "orders_test", "billing"):
        url = new_db(f"disc_{kind}")
        names[kind] = url.rsplit("/", 1)[1]
    template = new_db("disc_template")
    closed = new_db("disc_closed")
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{template.rsplit("/", 1)[1]}" IS_TEMPLATE true')
        conn.execute(f'ALTER DATABASE "{closed.rsplit("/", 1)[1]}" ALLOW_CONNECTIONS false')
    try:
        everything = {m.database for m in fleet.discover(pg.url(), ["*"])}
        never = {"template0", "template1", template.rsplit("/", 1)[1], closed.rsplit("/", 1)[1]}
        assert never.isdisjoint(everything)
        assert set(names.values()) | {"postgres"} <= everything

        chosen = fleet.discover(pg.url(), ["disc_orders_*"], ["*_test_*"])
        assert sorted(m.database for m in chosen) == sorted([names["orders_eu"], names["orders_us"]])
        assert {m.host for m in chosen} == {f"127.0.0.1:{pg.port}"}
        assert [m.database for m in fleet.discover(pg.url(), [], ["*"])] == []
    finally:
        with psycopg.connect(pg.admin_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{template.rsplit("/", 1)[1]}" IS_TEMPLATE false')


def test_fleet_members_carry_no_password_and_servers_take_turns():
    member = fleet.Member.of("postgresql://app:s3cr%40t@db1.internal:6432/orders")
    assert "s3cr" not in member.url and member.database == "orders" and member.host == "db1.internal:6432"
    assert fleet.host_limit_name(member.url) == "pgdr-host:db1.internal:6432"
    members = [fleet.Member(f"postgresql://u@{h}/d{i}", f"d{i}", h) for i, h in enumerate("aaabc")]
    assert [m.host for m in fleet.interleave(members)] == list("abcaa")
    assert fleet.matches("orders_eu", ["orders_*"], ["*_test"])
    assert not fleet.matches("orders_test", ["orders_*"], ["*_test"])
    assert not fleet.matches("Orders", ["orders"], [])  # PostgreSQL names are case-sensitive


def test_an_unreachable_discovery_server_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, "fleet", "--local", "--server", "postgresql://postgres@127.0.0.1:1/x",
                           "--include", "nothing")
    assert code == 1
    assert "cannot connect to postgres@127.0.0.1:1" in error_line(err)


@pytest.fixture
def no_fleet_env(monkeypatch):
    for name in ("PGDR_FLEET_DATABASES", "PGDR_FLEET_SERVERS"):
        monkeypatch.delenv(name, raising=False)


def test_fleet_without_databases_or_servers_says_how_to_configure_it(capsys, no_fleet_env):
    code, _, err = run_cli(capsys, "fleet", "--local")
    assert code == 1
    assert "the fleet is empty" in error_line(err)


def test_fleet_verify_restore_tests_every_database_on_the_scratch_server(pg, new_db, file_repo, capsys):
    urls = [small_database(new_db, 300), small_database(new_db, 400)]
    listed = [arg for url in urls for arg in ("--db", url)]
    backed_up = cli_json(capsys, "fleet", "--local", "--repo", file_repo, "--tier", "manual", *listed)
    assert [row["status"] for row in backed_up["databases"]] == ["ok", "ok"]

    verified = cli_json(capsys, "fleet", "verify", "--local", "--repo", file_repo, "--verify-server",
                        pg.url(), *listed)
    assert [(row["database"], row["status"]) for row in verified["databases"]] == [
        (url.rsplit("/", 1)[1], "ok") for url in urls]
    # The restores are paced by the scratch server's limit, not the production servers'.
    assert set(verified["server_limits"]) == {f"127.0.0.1:{pg.port}"}
    repo = open_repository(file_repo)
    for url in urls:
        (stored,) = list_backups(repo, url.rsplit("/", 1)[1])
        assert verification.read_verification(repo, stored)["verified"] is True


def test_a_missing_deployment_is_refused_before_any_run(new_db, file_repo, capsys):
    url = small_database(new_db, 10)
    code, _, err = run_cli(capsys, "fleet", "--db", url, "--repo", file_repo,
                           "--deployment", "backup/nowhere")
    assert code == 1
    assert "deployment backup/nowhere not found" in error_line(err)
    assert list_backups(open_repository(file_repo)) == []
