"""The catalog index (`<database>/index.json`): list, status and `latest` read it instead of
every manifest, and it never changes what they answer. Real moto S3 over HTTP and a local
repository."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest

import pgdr.storage.s3repo
from pgdr.catalog import catalog
from pgdr.catalog.index import index_key, read_index, refresh_index, resolve_backup
from pgdr.catalog.scan import find_backup, list_backups, scan_backups
from pgdr.storage.repository import Repository, open_repository
from tests.support.cli import cli_json
from tests.test_prune import fake_backup


@pytest.fixture
def gets(s3, monkeypatch) -> Counter:
    """The S3 GetObject calls of every client pgdr opens, by key."""
    calls: Counter = Counter()

    def register(client: Any) -> None:
        client.meta.events.register("provide-client-params.s3.GetObject",
                                    lambda params, **_: calls.update([params["Key"]]))

    monkeypatch.setattr(pgdr.storage.s3repo, "S3_CLIENT_HOOKS", [register])
    return calls


@pytest.fixture(params=["file", "s3"])
def repo_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_repo")


def make_fleet(repo: Repository, databases: int = 3, each: int = 6) -> list[catalog.Manifest]:
    now = catalog.utcnow()
    made = []
    for n in range(databases * each):
        tier = "pre-restore" if n % 7 == 3 else "daily"
        made.append(fake_backup(repo, f"db{n % databases}", tier, now - timedelta(hours=n + 1),
                                verified=True if n % 4 == 0 else None))
    for db in {m.database for m in made}:
        assert refresh_index(repo, db)
    return made


def full_scan(repo: Repository) -> dict[str, Any]:
    """What `pgdr list --json` showed before the index: every manifest read."""
    found = scan_backups(repo)
    return {"backups": [{**m.summary(), "safety_copy": catalog.is_safety_copy(m),
                         "storage_class": found.storage_classes.get(m.backup_id)} for m in found.backups],
            "damaged": [d.summary() for d in found.damaged]}


def listed(capsys, url: str) -> dict[str, Any]:
    shown = cli_json(capsys, "list", "--repo", url)
    return {"backups": shown["backups"], "damaged": shown["damaged"]}


def latest_by_full_scan(repo: Repository, database: str) -> str:
    return catalog.newest_regular_backup(list_backups(repo, database)).backup_id


def test_list_status_and_latest_read_the_index_not_every_manifest(capsys, s3_repo, gets):
    repo = open_repository(s3_repo)
    made = make_fleet(repo)
    verified = {m.verified_key for n, m in enumerate(made) if n % 4 == 0}
    expected = full_scan(repo)
    gets.clear()

    assert listed(capsys, s3_repo) == expected
    index_keys = {f"pgdr/{index_key(db)}" for db in ("db0", "db1", "db2")}
    assert set(gets) == index_keys and sum(gets.values()) == 3  # not one manifest

    gets.clear()
    status = cli_json(capsys, "status", "--repo", s3_repo)["databases"]
    manifests_read = [k for k in gets if k.endswith("/" + catalog.MANIFEST)]
    assert manifests_read == []
    # Verification records: only those the listing shows, of the backups status displays.
    assert {k for k in gets if k.endswith(catalog.VERIFIED)} <= {f"pgdr/{k}" for k in verified}
    for entry in status:
        assert entry["last_backup"] == latest_by_full_scan(repo, entry["database"])
        assert entry["verified_backup"]

    newest = latest_by_full_scan(repo, "db1")
    gets.clear()
    latest = resolve_backup(repo, "latest", "db1")
    assert latest.backup_id == newest
    assert sorted(gets) == sorted([f"pgdr/{index_key('db1')}", f"pgdr/{latest.manifest_key}"])


def test_a_backup_records_itself_in_its_database_index(capsys, fleet_db, file_repo):
    made = cli_json(capsys, "backup", "--db", fleet_db, "--repo", file_repo)
    repo = open_repository(file_repo)
    index = json.loads(repo.get_bytes(index_key("fleet")))
    (entry,) = index["backups"]
    manifest = find_backup(repo, made["backup_id"])
    assert entry["backup_id"] == made["backup_id"] and entry["snapshot_at"] == manifest.snapshot_at
    assert entry["manifest_sha256"] == hashlib.sha256(repo.get_bytes(manifest.manifest_key)).hexdigest()


def damage_index(repo: Repository, database: str) -> None:
    repo.put_bytes(index_key(database), b'{"format": "pgdr-catalog-index-1", "backups": [')


def forge_entry(repo: Repository, database: str, backup_id: str, **fields: Any) -> None:
    key = index_key(database)
    index = json.loads(repo.get_bytes(key))
    for entry in index["backups"]:
        if entry["backup_id"] == backup_id:
            entry.update(fields)
    repo.put_bytes(key, json.dumps(index).encode())


def test_a_missing_damaged_or_stale_index_changes_nothing(capsys, repo_url):
    repo = open_repository(repo_url)
    made = make_fleet(repo)
    by_db = {db: [m for m in made if m.database == db] for db in ("db0", "db1", "db2")}
    assert listed(capsys, repo_url) == full_scan(repo)

    # A backup whose manifest was written after the index.
    fake_backup(repo, "db0", "daily", catalog.utcnow())
    # A backup deleted (prune) after the index was written: its entry is ignored.
    gone = by_db["db1"][0]
    repo.delete(f"{gone.prefix}/{catalog.DUMP}")
    repo.delete(gone.manifest_key)
    # A manifest rewritten after the index (another size): the manifest, not the entry, counts.
    rewritten = by_db["db1"][1]
    smaller = {**json.loads(repo.get_bytes(rewritten.manifest_key)), "size_bytes": 7}
    repo.put_bytes(rewritten.manifest_key, json.dumps(smaller).encode())
    # A manifest damaged after the index: listed as damaged, never as a good backup.
    broken = by_db["db2"][0]
    repo.put_bytes(broken.manifest_key, b"\x00not json")

    expected = full_scan(repo)
    assert gone.backup_id not in {b["backup_id"] for b in expected["backups"]}
    assert [d["key"] for d in expected["damaged"]] == [broken.manifest_key]
    assert listed(capsys, repo_url) == expected
    for db in by_db:
        assert resolve_backup(repo, "latest", db).backup_id == latest_by_full_scan(repo, db)

    # A damaged index is ignored whole, a missing one too; the next write rebuilds them.
    damage_index(repo, "db0")
    repo.delete(index_key("db1"))
    assert listed(capsys, repo_url) == expected
    assert not read_index(repo, "db0").readable
    for db in by_db:
        assert refresh_index(repo, db)
    assert listed(capsys, repo_url) == expected
    for db in by_db:
        index = read_index(repo, db)
        assert index.readable
        assert sorted(e.backup_id for e in index.entries.values()) == sorted(
            b["backup_id"] for b in expected["backups"] if b["database"] == db)
    # The status of every database names the same latest backup as a full scan.
    for entry in cli_json(capsys, "status", "--repo", repo_url)["databases"]:
        assert entry["last_backup"] == latest_by_full_scan(repo, entry["database"])


def rebuild_index(repo: Repository, database: str) -> None:
    """A new index from the manifests (refresh_index keeps entries that match their
    manifest's version, forged ones included: only reads that matter check them)."""
    repo.delete(index_key(database))
    assert refresh_index(repo, database)
    assert len(read_index(repo, database).entries) == len(list_backups(repo, database))


def test_a_forged_entry_cannot_change_latest_nor_show_a_gone_backup(capsys, repo_url):
    repo = open_repository(repo_url)
    made = [m for m in make_fleet(repo, databases=1, each=6) if m.tier == "daily"]
    newest, older = made[0], made[-1]
    assert resolve_backup(repo, "latest", "db0").backup_id == newest.backup_id

    # An older backup made to look newest: its manifest says otherwise.
    forge_entry(repo, "db0", older.backup_id, snapshot_at=catalog.iso(catalog.utcnow() + timedelta(days=1)))
    assert resolve_backup(repo, "latest", "db0").backup_id == newest.backup_id
    # The newest made to look old: a backup started later by its id is read, and disagrees.
    rebuild_index(repo, "db0")
    forge_entry(repo, "db0", newest.backup_id, snapshot_at="2001-01-01T00:00:00Z")
    assert resolve_backup(repo, "latest", "db0").backup_id == newest.backup_id

    # An entry whose manifest is gone shows nothing.
    rebuild_index(repo, "db0")
    repo.delete(newest.manifest_key)
    ids = [b["backup_id"] for b in listed(capsys, repo_url)["backups"]]
    assert newest.backup_id not in ids and len(ids) == len(made) - 1 + 1  # + the pre-restore copy
    assert resolve_backup(repo, "latest", "db0").backup_id == made[1].backup_id


def test_concurrent_writers_lose_no_entry(repo_url):
    repo = open_repository(repo_url)
    now = catalog.utcnow()

    def backup(n: int) -> bool:
        fake_backup(repo, "busy", "daily", now - timedelta(minutes=n))
        return refresh_index(repo, "busy")

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(backup, range(12)))
    index = read_index(repo, "busy")
    assert len(index.entries) == 12
    assert sorted(e.backup_id for e in index.entries.values()) == sorted(
        m.backup_id for m in list_backups(repo, "busy"))


def test_a_writer_that_lost_the_race_reads_again_and_keeps_the_winners_entry(repo_url, monkeypatch):
    first, second = open_repository(repo_url), open_repository(repo_url)
    now = catalog.utcnow()
    mine = fake_backup(first, "busy", "daily", now - timedelta(hours=1))
    write = first.put_if_tag
    theirs = []

    def another_backup_meanwhile(key: str, data: bytes, tag: str | None) -> bool:
        # Between this writer's read of the index and its write, another backup lands and
        # writes the index first.
        if not theirs:
            theirs.append(fake_backup(second, "busy", "daily", now))
            assert refresh_index(second, "busy")
        return write(key, data, tag)

    monkeypatch.setattr(first, "put_if_tag", another_backup_meanwhile)
    assert refresh_index(first, "busy")
    assert sorted(e.backup_id for e in read_index(first, "busy").entries.values()) == sorted(
        [mine.backup_id, theirs[0].backup_id])


def test_a_conditional_write_refuses_a_replaced_version(repo_url):
    repo = open_repository(repo_url)
    assert repo.put_if_tag("x/index.json", b"one", None)
    assert not repo.put_if_tag("x/index.json", b"two", None)  # exists now
    data, tag = repo.get_tagged("x/index.json")
    assert data == b"one"
    repo.put_bytes("x/index.json", b"other writer")
    assert not repo.put_if_tag("x/index.json", b"three", tag)
    _, tag = repo.get_tagged("x/index.json")
    assert repo.put_if_tag("x/index.json", b"three", tag)
    assert repo.get_bytes("x/index.json") == b"three"
