"""Restore, restore-to-temp, rollback and verify on real PostgreSQL, S3 (moto) and gpg."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgdr.catalog import catalog, verification
from pgdr.catalog.scan import find_backup, list_backups
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import counts_in, table_fingerprints
from tests.support.secrets import ALL_SECRETS
from tests.support.stored import audit_records


def databases(pg) -> set[str]:
    with psycopg.connect(pg.admin_url) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def corrupt(repo_url: str, manifest: catalog.Manifest, how: str) -> None:
    repo = open_repository(repo_url)
    key = f"{manifest.prefix}/{manifest.data_key}"
    data = bytearray(repo.get_bytes(key))
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "truncate":
        del data[len(data) * 2 // 3:]
    repo.put_bytes(key, bytes(data))


@pytest.fixture
def work_dir(tmp_path, monkeypatch) -> Path:
    """Where restores stage their local copy (checked for leftovers)."""
    path = tmp_path / "work"
    path.mkdir()
    monkeypatch.setenv("PGDR_WORK_DIR", str(path))
    return path


def leftovers(work_dir: Path) -> list[Path]:
    return [p for p in work_dir.rglob("*") if p.is_file()]


@pytest.mark.parametrize("repo_kind, key", [("file", None), ("s3", None), ("file", "protected"),
                                            ("s3", "plain")])
def test_round_trip_restores_identical_content(repo_kind, key, request, capsys, tricky_db, new_db,
                                              gpg, pg, monkeypatch, work_dir):
    repo_url = request.getfixturevalue("file_repo" if repo_kind == "file" else "s3_repo")
    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    extra = []
    if key == "protected":
        extra = ["--encrypt-to", gpg.protected_fingerprint]
        monkeypatch.setenv("PGDR_GPG_PASSPHRASE", gpg.passphrase)
    elif key == "plain":
        extra = ["--encrypt-to", gpg.fingerprint]
    source = table_fingerprints(tricky_db)
    backup = cli_json(capsys, "backup", "--db", tricky_db, "--repo", repo_url, *extra)
    target = new_db("restored")
    pg.drop_database(target.rsplit("/", 1)[1])  # a new database: restored directly

    result = cli_json(capsys, "restore", "latest", "--target", target, "--repo", repo_url)
    assert result["backup_id"] == backup["backup_id"] and result["verified"] is True
    assert result["row_counts"] == backup["row_counts"]
    assert table_fingerprints(target) == source
    assert leftovers(work_dir) == []
    verified = verification.read_verification(open_repository(repo_url),
                                         find_backup(open_repository(repo_url), backup["backup_id"]))
    assert verified["verified"] is True and verified["results"][-1]["by"] == "restore"


def test_restore_over_a_busy_database_swaps_and_rollback_brings_it_back(capsys, pg, new_db, file_repo,
                                                                         work_dir):
    target = new_db("live")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO orders SELECT i, 'original' FROM generate_series(1, 1000) i")
    backup = cli_json(capsys, "backup", "--db", target, "--repo", file_repo)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM orders WHERE id <= 100")
        conn.execute("UPDATE orders SET note = 'changed after the backup'")
    changed = table_fingerprints(target)

    # An idle session holding the database, and a client that keeps reconnecting.
    idle = psycopg.connect(target, autocommit=True)
    stop = threading.Event()
    seen = []

    def reconnecting_client():
        while not stop.is_set():
            try:
                with psycopg.connect(target, connect_timeout=2) as conn:
                    seen.append(conn.execute("SELECT count(*) FROM orders").fetchone()[0])
            except psycopg.Error:
                time.sleep(0.01)

    client = threading.Thread(target=reconnecting_client)
    client.start()
    try:
        result = cli_json(capsys, "restore", backup["backup_id"], "--target", target, "--repo", file_repo)
    finally:
        stop.set()
        client.join()
        idle.close()
    assert result["verified"] and result["previous_database"]
    assert counts_in(target) == backup["row_counts"] == {"public.orders": 1000}
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM orders WHERE note = 'original'").fetchone()[0] == 1000
    # Clients only ever saw a whole database: the old one (900 rows) or the restored one.
    assert set(seen) <= {900, 1000}
    assert table_fingerprints(pg.url(result["previous_database"])) == changed
    tiers = {m.tier for m in list_backups(open_repository(file_repo))}
    assert tiers == {"manual", "pre-restore"}  # the runbook's backup before a restore

    undone = cli_json(capsys, "rollback", "--target", target, "--repo", file_repo)
    assert undone["restored_from"] == result["previous_database"]
    assert table_fingerprints(target) == changed
    for name in (result["previous_database"], undone["set_aside_as"]):
        pg.drop_database(name)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "wrong key", "wrong passphrase"])
def test_damaged_backups_are_refused_before_restore(damage, capsys, pg, new_db, file_repo, gpg, monkeypatch,
                                                   work_dir, tmp_path):
    from tests.support.gpg import make_gpg_home

    target = new_db("keep")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT i FROM generate_series(1, 50000) i")
    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    recipient = gpg.protected_fingerprint if damage == "wrong passphrase" else gpg.fingerprint
    backup = cli_json(capsys, "backup", "--db", target, "--repo", file_repo, "--encrypt-to", recipient)
    manifest = find_backup(open_repository(file_repo), backup["backup_id"])
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (-1)")
    before = table_fingerprints(target)
    before_dbs = databases(pg)
    other_home = None
    if damage in ("flip", "truncate"):
        corrupt(file_repo, manifest, damage)
    elif damage == "missing":
        open_repository(file_repo).delete(f"{manifest.prefix}/{manifest.data_key}")
    elif damage == "wrong key":
        other_home = make_gpg_home()  # has keys, but not the one the backup was encrypted to
        monkeypatch.setenv("PGDR_GNUPGHOME", other_home.homedir)
    else:
        monkeypatch.setenv("PGDR_GPG_PASSPHRASE", "not-the-passphrase")
    try:
        code, _out, err = run_cli(capsys, "restore", backup["backup_id"], "--target", target, "--repo",
                                  file_repo, "--no-pre-restore-backup")
    finally:
        if other_home:
            other_home.close()
    line = error_line(err)
    assert code == 1
    expected = {"flip": "corrupt", "truncate": "corrupt", "missing": "not in the repository",
                "wrong key": "gpg", "wrong passphrase": "gpg"}[damage]
    assert expected in line
    assert "not-the-passphrase" not in err
    assert leftovers(work_dir) == []  # no plaintext left on disk
    assert table_fingerprints(target) == before  # untouched and still accepting connections
    assert databases(pg) == before_dbs


def test_a_pg_restore_failing_halfway_leaves_the_target_untouched(capsys, pg, new_db, file_repo, work_dir):
    target = new_db("halfway")
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS ghost")
        conn.execute("CREATE ROLE ghost")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE a AS SELECT i FROM generate_series(1, 1000) i")
        conn.execute("CREATE TABLE z (id int)")
        conn.execute("ALTER TABLE z OWNER TO ghost")
    backup = cli_json(capsys, "backup", "--db", target, "--repo", file_repo)
    # A backup without its roles (older pgdr): the role check cannot stop it, pg_restore fails.
    repo = open_repository(file_repo)
    manifest = find_backup(repo, backup["backup_id"])
    manifest.globals = None
    repo.put_bytes(manifest.manifest_key, manifest.to_json())
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("ALTER TABLE z OWNER TO postgres")
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute("DROP ROLE ghost")  # the restore will meet ALTER TABLE z OWNER TO ghost
    before, before_dbs = table_fingerprints(target), databases(pg)
    code, _out, err = run_cli(capsys, "restore", backup["backup_id"], "--target", target, "--repo", file_repo)
    # The cause, not only the last line ("a worker process died unexpectedly").
    assert code == 1 and "pg_restore" in error_line(err) and 'role "ghost" does not exist' in error_line(err)
    assert table_fingerprints(target) == before
    assert databases(pg) == before_dbs
    assert leftovers(work_dir) == []


def test_restore_to_temp_validates_and_drops_the_database(capsys, pg, fleet_db, file_repo):
    cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo)
    before = databases(pg)
    result = cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg.url())
    assert result["verified"] and result["row_counts"] == counts_in(fleet_db)
    assert result["temp_database"] not in databases(pg) and databases(pg) == before

    kept = cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg.url(), "--keep")
    assert table_fingerprints(pg.url(kept["temp_database"])) == table_fingerprints(fleet_db)
    pg.drop_database(kept["temp_database"])


def test_the_flow_adds_no_copy_beyond_one_local_file(capsys, pg, fleet_db, file_repo, work_dir):
    backup = cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo)
    manifest = find_backup(open_repository(file_repo), backup["backup_id"])
    peak_files, peak_bytes = 0, 0
    stop = threading.Event()

    def watch():
        nonlocal peak_files, peak_bytes
        while not stop.is_set():
            files = leftovers(work_dir)
            sizes = []
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    sizes.append(f.stat().st_size)
            peak_files, peak_bytes = max(peak_files, len(files)), max(peak_bytes, sum(sizes))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        cli_json(capsys, "restore-temp", backup["backup_id"], "--repo", file_repo, "--server", pg.url())
    finally:
        stop.set()
        watcher.join()
    assert peak_files == 1
    assert manifest.dump_bytes * 0.5 < peak_bytes <= manifest.dump_bytes


class TestVerify:
    def test_passes_on_a_fresh_backup(self, capsys, pg, fleet_db, file_repo):
        cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo)
        result = cli_json(capsys, "verify", "--repo", file_repo, "--server", pg.url())
        assert result["ok"] and [d["database"] for d in result["databases"]] == ["fleet"]

    def test_fails_without_a_backup(self, capsys, pg, file_repo):
        code, _out, err = run_cli(capsys, "verify", "--repo", file_repo, "--server", pg.url())
        assert code == 1 and "no backups" in error_line(err)

    def test_fails_when_the_backup_is_too_old(self, capsys, pg, fleet_db, file_repo):
        cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo)
        code, out, err = run_cli(capsys, "verify", "--repo", file_repo, "--server", pg.url(),
                                 "--max-age-hours", "0.00001", "--json")
        assert code == 1 and "old" in error_line(err)
        assert json.loads(out)["ok"] is False

    def test_fails_on_a_corrupted_backup(self, capsys, pg, fleet_db, file_repo, monkeypatch):
        backup = cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo)
        corrupt(file_repo, find_backup(open_repository(file_repo), backup["backup_id"]), "flip")
        monkeypatch.setenv("DATABASE_URL", pg.secret_url())  # a secret the record must not carry
        code, _out, err = run_cli(capsys, "verify", "--repo", file_repo, "--server", pg.url())
        assert code == 1 and "corrupt" in error_line(err)
        [record] = audit_records(file_repo, "verify")
        assert (record["status"], record["source"]) == ("failed", backup["backup_id"])
        assert record["details"] == {"error": error_line(err).removeprefix("pgdr: error: ")}
        assert not [s for s in ALL_SECRETS if s in json.dumps(record)]

    def test_fails_when_restored_counts_differ_from_the_manifest(self, capsys, pg, fleet_db, file_repo):
        backup = cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo)
        repo = open_repository(file_repo)
        manifest = find_backup(repo, backup["backup_id"])
        manifest.row_counts["public.vehicles"] += 1
        repo.put_bytes(manifest.manifest_key, manifest.to_json())
        before = databases(pg)
        code, _out, err = run_cli(capsys, "verify", "--repo", file_repo, "--server", pg.url())
        line = error_line(err)
        assert code == 1 and "public.vehicles" in line and "expected" in line
        assert databases(pg) == before
