"""What pgdr trusts in a repository, and by whose clock: manifests bound to where they live,
verification that cannot pass on an emptied manifest, backups ordered and aged by the
database server's clock whatever the backing-up host's clock said."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta

import psycopg
import pytest

from pgdr.catalog import catalog, verification
from pgdr.catalog.scan import find_backup, list_backups
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli


def small_db(new_db, rows: int, prefix: str = "trust") -> str:
    url = new_db(prefix)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
        conn.execute("INSERT INTO items SELECT generate_series(1, %s)", (rows,))
    return url


def stored_manifest(repo_url: str, backup_id: str) -> catalog.Manifest:
    return find_backup(open_repository(repo_url), backup_id)


@pytest.mark.parametrize("repo_kind", ["file", "s3"])
def test_a_manifest_moved_over_another_backup_or_database_is_refused(repo_kind, request, capsys, pg, new_db):
    repo_url = request.getfixturevalue(f"{repo_kind}_repo")
    one = small_db(new_db, 10)
    a = cli_json(capsys, "backup", "--db", one, "--repo", repo_url)
    with psycopg.connect(one, autocommit=True) as conn:
        conn.execute("INSERT INTO items SELECT generate_series(11, 20)")
    b = cli_json(capsys, "backup", "--db", one, "--repo", repo_url)
    other = cli_json(capsys, "backup", "--db", small_db(new_db, 5, "other"), "--repo", repo_url)
    repo = open_repository(repo_url)
    key_a = stored_manifest(repo_url, a["backup_id"]).manifest_key
    for intruder in (b, other):  # another backup of the same database, another database's backup
        source = catalog.backup_prefix(intruder["database"], intruder["backup_id"]) + "/" + catalog.MANIFEST
        repo.put_bytes(key_a, repo.get_bytes(source))
        code, _out, err = run_cli(capsys, "restore-temp", a["backup_id"], "--db", a["database"], "--repo",
                                  repo_url, "--server", pg.url())
        line = error_line(err)
        assert code == 1 and "does not belong there" in line and intruder["backup_id"] in line
    # A manifest that names the right place but a data file elsewhere is refused too.
    tampered = json.loads(repo.get_bytes(source))
    repo.put_bytes(key_a, json.dumps({**tampered, "backup_id": a["backup_id"], "database": a["database"],
                                      "data_key": "../" + b["backup_id"] + "/dump.pgdr"}).encode())
    code, _out, err = run_cli(capsys, "restore-temp", a["backup_id"], "--db", a["database"], "--repo",
                              repo_url, "--server", pg.url())
    assert code == 1 and "does not belong there" in error_line(err)


def test_an_emptied_row_counts_fails_verification_and_a_verification_names_its_manifest(capsys, pg, new_db,
                                                                                       file_repo):
    backup = cli_json(capsys, "backup", "--db", small_db(new_db, 10), "--repo", file_repo)
    repo = open_repository(file_repo)
    manifest = stored_manifest(file_repo, backup["backup_id"])
    cli_json(capsys, "restore-temp", backup["backup_id"], "--repo", file_repo, "--server", pg.url())
    history = verification.read_verification(repo, manifest)
    import hashlib

    assert history["manifest_sha256"] == hashlib.sha256(repo.get_bytes(manifest.manifest_key)).hexdigest()

    repo.put_bytes(manifest.manifest_key, dataclasses.replace(manifest, row_counts={}).to_json())
    code, _out, err = run_cli(capsys, "restore-temp", backup["backup_id"], "--repo", file_repo,
                              "--server", pg.url())
    line = error_line(err)
    assert code == 1 and "public.items" in line and "not in the manifest" in line
    assert verification.read_verification(repo, manifest)["verified"] is False


def skewed_copy(repo_url: str, manifest: catalog.Manifest, client_offset: timedelta, tag: str) -> str:
    """The same backup, as a host whose clock was `client_offset` off would have filed it: its
    id and client times shifted, its server snapshot time the true one."""
    repo = open_repository(repo_url)
    started = catalog.parse_iso(manifest.started_at) + client_offset
    backup_id = f"{started:%Y%m%dT%H%M%SZ}-{manifest.tier}-{tag}"
    finished = catalog.parse_iso(manifest.finished_at) + client_offset
    copy = dataclasses.replace(manifest, backup_id=backup_id, started_at=catalog.iso(started),
                               finished_at=catalog.iso(finished))
    repo.put_bytes(f"{copy.prefix}/{copy.data_key}", repo.get_bytes(f"{manifest.prefix}/{manifest.data_key}"))
    repo.put_bytes(copy.manifest_key, copy.to_json())
    return backup_id


@pytest.mark.parametrize("repo_kind", ["file", "s3"])
def test_backups_are_ordered_and_aged_by_the_servers_clock(repo_kind, request, capsys, pg, new_db):
    repo_url = request.getfixturevalue(f"{repo_kind}_repo")
    url = small_db(new_db, 10)
    first = cli_json(capsys, "backup", "--db", url, "--repo", repo_url)
    assert first["warnings"] == []
    middle = cli_json(capsys, "backup", "--db", url, "--repo", repo_url)
    newest = cli_json(capsys, "backup", "--db", url, "--repo", repo_url)
    database = first["database"]
    # The first backup as a host 2 days ahead would have filed it; the middle one as a host
    # 40 days behind. Only the server's time is right.
    ahead = skewed_copy(repo_url, stored_manifest(repo_url, first["backup_id"]), timedelta(days=2), "aaaa")
    behind = skewed_copy(repo_url, stored_manifest(repo_url, middle["backup_id"]), -timedelta(days=40),
                         "bbbb")
    repo = open_repository(repo_url)
    for original in (first, middle):
        for key in [o.key for o in repo.list(catalog.backup_prefix(database, original["backup_id"]) + "/")]:
            repo.delete(key)

    assert [m.backup_id for m in list_backups(repo, database)] == [ahead, behind, newest["backup_id"]]
    status = cli_json(capsys, "status", "--repo", repo_url)["databases"][0]
    assert status["last_backup"] == newest["backup_id"] and 0 <= status["age_hours"] < 1
    warning = catalog.clock_warning(find_backup(repo, behind, database), 300)
    assert warning and "behind" in warning
    assert catalog.clock_warning(find_backup(repo, newest["backup_id"], database), 300) is None

    pruned = cli_json(capsys, "prune", "--repo", repo_url, "--dry-run")
    deleted = {r["backup_id"] for r in pruned["backups"] if r["action"] == "delete"}
    assert behind not in deleted and ahead not in deleted  # all three are minutes old by the server


def test_clock_skew_in_the_manifest_is_a_warning():
    now = catalog.utcnow()
    manifest = catalog.Manifest(
        backup_id=f"{now:%Y%m%dT%H%M%SZ}-manual-abcd", database="d", tier="manual",
        started_at=catalog.iso(now + timedelta(hours=48)), finished_at=catalog.iso(now + timedelta(hours=48)),
        snapshot_at=catalog.iso(now), server_version="15", tool_version="t", format="f", compression="c",
        encryption=None, size_bytes=1, dump_bytes=1, sha256="0", row_counts={}, wal_lsn_start=None,
        source="s", data_key=catalog.DUMP)
    assert catalog.clock_skew_seconds(manifest) == 48 * 3600
    assert "ahead of" in catalog.clock_warning(manifest, 300)
    assert catalog.clock_warning(dataclasses.replace(manifest, started_at=catalog.iso(now)), 300) is None

    # A manifest read from storage knows the sha256 of its bytes (what a verification names);
    # one built in memory does not, and the digest is never part of the manifest itself.
    assert manifest.read_sha256 is None
    stored = manifest.to_json()
    read = catalog.Manifest.from_json(stored)
    import hashlib

    assert read.read_sha256 == hashlib.sha256(stored).hexdigest()
    assert read == manifest and read.to_json() == stored


@pytest.mark.parametrize("repo_kind", ["file", "s3"])
def test_a_non_ascii_database_name_works_end_to_end(repo_kind, request, capsys, pg):
    from tests.support.db import table_fingerprints

    repo_url = request.getfixturevalue(f"{repo_kind}_repo")
    name = "Zürich Flotte ✓ 東京"
    url = pg.create_database(name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
            conn.execute("INSERT INTO items SELECT generate_series(1, 10)")
        backup = cli_json(capsys, "backup", "--db", url, "--repo", repo_url)
        assert backup["database"] == name
        temp = cli_json(capsys, "restore-temp", "latest", "--repo", repo_url, "--server", pg.url())
        assert temp["verified"] and temp["row_counts"] == {"public.items": 10}
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM items WHERE id > 5")
        recovered = cli_json(capsys, "recover-table", "latest", "--target", url, "--table", "public.items",
                             "--repo", repo_url)
        assert recovered["tables"][0]["rows_inserted"] == 5
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM items WHERE id > 3")
        restored = cli_json(capsys, "restore", backup["backup_id"], "--target", url, "--repo", repo_url,
                            "--no-pre-restore-backup")
        assert restored["verified"] and table_fingerprints(url)["public.items"]
        pg.drop_database(restored["previous_database"])
    finally:
        pg.drop_database(name)
