"""The test infrastructure itself: the PostgreSQL helper, sample data, S3 and gpg fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import boto3
import psycopg
import pytest

from pgdr.demo.sample_data import TABLES, create_fleet_database
from pgdr.postgres.cluster import ClusterError, LocalCluster, free_port
from pgdr.storage.repository import open_repository
from tests.support.db import PgServer, table_fingerprints
from tests.support.gpg import GpgHome


def _db_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def test_cluster_accepts_connections_and_checks_the_password(pg: PgServer) -> None:
    with psycopg.connect(pg.admin_url) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW server_version_num").fetchone()[0] >= "150000"
    with psycopg.connect(pg.secret_url()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("pgdr_secret",)
    without_password = pg.cluster.url(user="pgdr_secret")
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(without_password, connect_timeout=5).close()
    wrong = pg.cluster.url(user="pgdr_secret", password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5).close()


def test_server_never_runs_as_root(pg: PgServer) -> None:
    pid = int((pg.cluster.datadir / "postmaster.pid").read_text().split()[0])
    assert os.stat(f"/proc/{pid}").st_uid != 0


def test_url_percent_encodes_every_part(pg: PgServer) -> None:
    url = pg.cluster.url("my db", user="a@b", password="p:w/d?#%")
    assert url == f"postgresql://a%40b:p%3Aw%2Fd%3F%23%25@127.0.0.1:{pg.port}/my%20db"


def test_cluster_settings_restart_and_reuse_of_a_data_directory(tmp_path: Path) -> None:
    # tmp_path sits below 0700 directories: the helper must still reach it as postgres.
    settings = {"wal_level": "replica", "archive_mode": "on",
                "archive_command": "test ! -f '/nonexistent/%f'"}
    with LocalCluster.create(tmp_path / "c", settings=settings) as cluster:
        with psycopg.connect(cluster.url()) as conn:
            assert conn.execute("SHOW archive_command").fetchone() == (settings["archive_command"],)
            conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
        cluster.stop()
        assert not cluster.is_running()
        cluster.stop()  # stopping a stopped server is a no-op

        # A copy of the data directory (owned by whoever copied it, root under CI), driven
        # as an existing one, as PITR does with a restored base backup.
        copy = tmp_path / "restored" / "data"
        shutil.copytree(cluster.datadir, copy)
        with LocalCluster(copy, free_port()) as restored:
            restored.start()
            with psycopg.connect(restored.url()) as conn:
                assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)
        assert not copy.exists()
    assert not (tmp_path / "c").exists()


def test_start_failure_reports_the_server_log(tmp_path: Path) -> None:
    with LocalCluster.create(tmp_path / "c") as cluster:
        cluster.stop()
        with (cluster.datadir / "postgresql.conf").open("a") as conf:
            conf.write("shared_buffers = 'lots'\n")
        with pytest.raises(ClusterError, match=r"could not start.*shared_buffers") as caught:
            cluster.start(timeout=20)
        assert "\n" not in str(caught.value)
        assert "shared_buffers" in caught.value.log_tail


def test_fleet_database_has_rows_in_every_table(fleet_db: str) -> None:
    with psycopg.connect(fleet_db) as conn:
        for table in TABLES:
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0, table
        orphans = conn.execute(
            "SELECT count(*) FROM gps_points g LEFT JOIN vehicles v ON v.id = g.vehicle_id"
            " WHERE v.id IS NULL"
        ).fetchone()[0]
        assert orphans == 0
        # Identity sequences continue after the generated ids (read, never advanced here).
        last_value, max_id = conn.execute(
            "SELECT s.last_value, (SELECT max(id) FROM vehicles) FROM pg_sequences s"
            " WHERE s.sequencename = 'vehicles_id_seq'"
        ).fetchone()
        assert last_value == max_id


def test_fleet_generator_is_deterministic(pg: PgServer, fleet_db: str, new_db) -> None:
    name = _db_name(new_db("fleet_again"))
    counts = create_fleet_database(pg.admin_url, name, 5, replace=True)
    assert table_fingerprints(pg.url(name)) == table_fingerprints(fleet_db)
    with psycopg.connect(pg.url(name)) as conn:
        for table, expected in counts.items():
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == expected


def test_fleet_database_is_roughly_the_requested_size(pg: PgServer, new_db) -> None:
    name = _db_name(new_db("fleet_sized"))
    create_fleet_database(pg.admin_url, name, 40, replace=True)
    with psycopg.connect(pg.url(name)) as conn:
        size_mb = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] / 2**20
    assert 32 <= size_mb <= 48


def test_fleet_database_refuses_to_overwrite_without_replace(pg: PgServer, fleet_db: str) -> None:
    with pytest.raises(psycopg.errors.DuplicateDatabase):
        create_fleet_database(pg.admin_url, "fleet", 5)


def test_tricky_database_has_every_awkward_object(tricky_db: str) -> None:
    prints = table_fingerprints(tricky_db)
    for key in ('"Sales Data"."Order Items"', 'public."user"', "public.measurements",
                "public.measurements_2025_01", "public.event_log", 'public."MixedCase"'):
        assert key in prints, key
    assert prints["sequence:inventory.invoice_no"] == "424242"
    assert sum(key.startswith("large_object:") for key in prints) == 3
    with psycopg.connect(tricky_db) as conn:
        assert conn.execute('SELECT count(*) FROM "Sales Data"."Order Items"').fetchone() == (300,)
        assert conn.execute('SELECT count(*) FROM "Sales Data"."Order Totals"').fetchone()[0] > 0


def test_fingerprints_survive_dump_and_restore_and_see_a_change(
    pg: PgServer, tricky_db: str, new_db, tmp_path: Path
) -> None:
    archive = tmp_path / "tricky.dump"
    bin_dir = pg.cluster.bin_dir
    subprocess.run([bin_dir / "pg_dump", "-Fc", "-f", archive, "-d", tricky_db], check=True)
    copy = new_db("tricky_copy")
    subprocess.run([bin_dir / "pg_restore", "--exit-on-error", "-d", copy, archive], check=True)
    assert table_fingerprints(copy) == table_fingerprints(tricky_db)
    with psycopg.connect(copy) as conn:
        conn.execute("""UPDATE public."user" SET "from" = 'changed' WHERE id = 1""")
    assert table_fingerprints(copy) != table_fingerprints(tricky_db)


def test_pagila_schema_loads(pagila_db: str) -> None:
    with psycopg.connect(pagila_db) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()[0]
        partitioned = conn.execute(
            "SELECT count(*) FROM pg_partitioned_table"
        ).fetchone()[0]
    assert tables >= 20
    assert partitioned >= 1


def test_s3_put_and_get_over_http(s3: str, s3_repo: str) -> None:
    assert s3.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ENDPOINT_URL"] == s3
    bucket, prefix = s3_repo.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key=f"{prefix}/hello.txt", Body=b"fleet")
    assert client.get_object(Bucket=bucket, Key=f"{prefix}/hello.txt")["Body"].read() == b"fleet"
    assert client.meta.endpoint_url == s3


def test_file_repo_url_opens_a_repository_in_the_test_directory(file_repo: str, tmp_path: Path) -> None:
    repo = open_repository(file_repo)
    repo.put_bytes("fleet/hello.txt", b"fleet")
    assert (tmp_path / "repo" / "fleet" / "hello.txt").read_bytes() == b"fleet"
    assert [info.key for info in repo.list()] == ["fleet/hello.txt"]


@pytest.mark.parametrize("protected", [False, True])
def test_gpg_encrypts_and_decrypts_with_each_key(
    gpg: GpgHome, tmp_path: Path, protected: bool
) -> None:
    recipient = gpg.protected_fingerprint if protected else gpg.fingerprint
    sealed = gpg.run("--trust-model", "always", "--encrypt", "--recipient", recipient,
                     input=b"fleet secrets").stdout
    assert b"fleet secrets" not in sealed
    if protected:
        refused = gpg.run("--pinentry-mode", "loopback", "--passphrase", "wrong",
                          "--decrypt", input=sealed, check=False)
        assert refused.returncode != 0
        (tmp_path / "sealed.gpg").write_bytes(sealed)
        opened = gpg.run("--pinentry-mode", "loopback", "--passphrase-fd", "0",
                         "--decrypt", str(tmp_path / "sealed.gpg"),
                         input=gpg.passphrase.encode())
    else:
        opened = gpg.run("--decrypt", input=sealed)
    assert opened.stdout == b"fleet secrets"


def test_secrets_lists_every_secret(secrets: tuple[str, ...], pg: PgServer, gpg: GpgHome) -> None:
    assert pg.secret_password in secrets
    assert gpg.passphrase in secrets
    assert "testing-Secret-Key-Do-Not-Leak" in secrets
    assert "S3cr3t-Pa55-word%21" in secrets
