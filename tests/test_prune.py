"""Pruning a real repository (moto S3 over HTTP, local disk), init-repo, the lock, the DR copy."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import boto3
import pytest

import flows.backup
import tasks.backup
from pgdr.catalog import backup_retention, catalog, locks, verification
from pgdr.catalog.policy import Policy
from pgdr.catalog.scan import find_backup, list_backups
from pgdr.postgres import dsn
from pgdr.storage.repository import Repository, open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import table_fingerprints
from tests.support.secrets import ALL_SECRETS
from tests.support.stored import audit_records


def fake_backup(repo: Repository, database: str, tier: str, finished: datetime,
                verified: bool | None = None) -> catalog.Manifest:
    """A complete backup as pgdr writes it (data, manifest last, verified.json), without PostgreSQL."""
    backup_id = catalog.new_backup_id(finished - timedelta(minutes=5), tier)
    data = f"dump of {backup_id}".encode()
    manifest = catalog.Manifest(
        backup_id=backup_id, database=database, tier=tier,
        started_at=catalog.iso(finished - timedelta(minutes=5)), finished_at=catalog.iso(finished),
        snapshot_at=catalog.iso(finished - timedelta(minutes=5)), server_version="15", tool_version="test",
        format="pg_dump-custom", compression="zstd-3", encryption=None, size_bytes=len(data),
        dump_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), row_counts={}, wal_lsn_start=None,
        source=database, data_key=catalog.DUMP)
    repo.put_bytes(f"{manifest.prefix}/{catalog.DUMP}", data)
    repo.put_bytes(manifest.manifest_key, manifest.to_json())
    if verified is not None:
        verification.write_verification(repo, manifest, {"verified": verified, "results": []})
    return manifest


def ids(manifests: list[catalog.Manifest]) -> set[str]:
    return {m.backup_id for m in manifests}


def test_listing_and_pruning_see_more_than_1000_objects(capsys, s3_repo):
    repo = open_repository(s3_repo)
    now = catalog.utcnow()
    made = [fake_backup(repo, "fleet", "daily", now - timedelta(days=day, hours=1)) for day in range(450)]
    assert sum(1 for _ in repo.list("")) == 900  # more than one page together with what follows
    made += [fake_backup(repo, "fleet", "weekly", now - timedelta(days=7 * week, hours=2), verified=True)
             for week in range(60)]
    assert sum(1 for _ in repo.list("")) > 1000
    assert ids(list_backups(repo, "fleet")) == ids(made)

    dry = cli_json(capsys, "prune", "--repo", s3_repo, "--dry-run")
    assert dry["counts"] == {"keep": 30 + 13, "would delete": 420 + 47}
    assert ids(list_backups(repo, "fleet")) == ids(made)

    result = cli_json(capsys, "prune", "--repo", s3_repo)
    assert result["ok"] and result["counts"] == {"keep": 43, "deleted": 467}
    left = list_backups(repo, "fleet")
    assert ids(left) == {r["backup_id"] for r in result["backups"] if r["action"] == "keep"}
    assert all(now - m.finished < timedelta(days=30 if m.tier == "daily" else 90) for m in left)
    # Nothing of a deleted backup stays behind; an audit record says what happened.
    assert {o.key.rsplit("/", 2)[-2] for o in repo.list("fleet/")} == ids(left)
    audits = [json.loads(repo.get_bytes(o.key)) for o in repo.list("audit/") if "-prune-" in o.key]
    assert [a["details"]["counts"] for a in audits if a["status"] == "success"] == [
        {"keep": 43, "deleted": 467}]


def test_failed_and_corrupt_newest_backups_never_cost_the_good_ones(file_repo):
    repo = open_repository(file_repo)
    now = catalog.utcnow()
    good = [fake_backup(repo, "fleet", "daily", now - timedelta(days=50 + i), verified=True)
            for i in range(5)]
    corrupt = [fake_backup(repo, "fleet", "daily", now - timedelta(days=31 + i), verified=False)
               for i in range(3)]
    # A killed backup: data but no manifest; and an upload that never completed.
    interrupted = catalog.backup_prefix("fleet", catalog.new_backup_id(now, "daily"))
    repo.put_bytes(f"{interrupted}/{catalog.DUMP}", b"half a dump")
    partial = repo._path(f"{interrupted}/.dump.pgdr.partial-0000")
    partial.write_bytes(b"half an upload")
    assert list_backups(repo, "fleet")[-1].backup_id == corrupt[0].backup_id

    policy = Policy()
    plan = backup_retention.plan_prune(repo, "fleet", now, policy)
    assert not plan.incomplete and not plan.stale_uploads  # within the grace period: maybe still running
    rows = backup_retention.apply_plan(repo, plan, dry_run=False)
    kept = {r["backup_id"]: r["reason"] for r in rows if r["action"] == "keep"}
    assert set(kept) == {m.backup_id for m in good[:3]} | {corrupt[0].backup_id}
    assert "newest daily backup not known to be corrupt" in kept[good[0].backup_id]
    assert ids(list_backups(repo, "fleet")) == set(kept)

    later = now + timedelta(hours=25)
    plan = backup_retention.plan_prune(repo, "fleet", later, policy)
    rows = backup_retention.apply_plan(repo, plan, dry_run=False)
    assert {r["action"] for r in rows if r["finished_at"] is None} == {"deleted", "aborted"}
    assert not list(repo.list(interrupted)) and not partial.exists()
    assert ids(list_backups(repo, "fleet")) == set(kept)


@pytest.fixture
def locked_bucket_repo(s3):
    bucket = f"pgdr-lock-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    return f"s3://{bucket}/pgdr"


def test_object_lock_is_reported_and_prune_carries_on(capsys, locked_bucket_repo):
    repo = open_repository(locked_bucket_repo)
    now = catalog.utcnow()
    old = [fake_backup(repo, "fleet", "daily", now - timedelta(days=40 + i)) for i in range(4)]
    newest = fake_backup(repo, "fleet", "daily", now - timedelta(hours=1))
    until = now + timedelta(days=3)
    for manifest in old[:2]:
        repo.client.put_object_retention(
            Bucket=repo.bucket, Key=f"{repo.prefix}/{manifest.prefix}/{catalog.DUMP}",
            Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until})

    result = cli_json(capsys, "prune", "--repo", locked_bucket_repo)
    actions = {r["backup_id"]: r for r in result["backups"]}
    assert result["ok"] and result["counts"] == {"keep": 1, "locked": 2, "deleted": 2}
    assert all("COMPLIANCE until" in actions[m.backup_id]["reason"] for m in old[:2])
    # A locked backup stays whole and listed (its manifest was not touched).
    assert ids(list_backups(repo, "fleet")) == ids([newest, *old[:2]])
    code, out, _err = run_cli(capsys, "prune", "--repo", locked_bucket_repo)
    assert code == 0 and "2 locked" in out


@pytest.fixture
def read_only(tmp_path):
    """Makes a directory read-only (a bind mount of itself, so root is refused too): storage
    that refuses writes."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    mounted: list[Path] = []

    def make(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for argv in (["mount", "--bind", path, path], ["mount", "-o", "remount,ro,bind", path]):
            result = subprocess.run(argv, capture_output=True)
            if result.returncode != 0:
                pytest.skip(f"cannot mount here: {result.stderr.decode().strip()}")
            if path not in mounted:
                mounted.append(path)

    yield make
    for path in mounted:
        subprocess.run(["umount", path], check=False)


def test_a_prune_the_repository_refuses_leaves_a_failed_audit_record_with_the_error(capsys, file_repo,
                                                                                       read_only):
    repo = open_repository(file_repo)
    now = catalog.utcnow()
    old = fake_backup(repo, "fleet", "daily", now - timedelta(days=60))
    fake_backup(repo, "fleet", "daily", now - timedelta(hours=1))
    read_only(Path(file_repo.removeprefix("file://")) / locks.lock_key("fleet").rsplit("/", 1)[0])

    code, _out, err = run_cli(capsys, "prune", "--repo", file_repo, "--db", "fleet")
    assert code == 1 and "Read-only file system" in err
    assert old.backup_id in ids(list_backups(repo, "fleet"))  # nothing deleted without the lock
    [record] = audit_records(file_repo, "prune")
    assert (record["status"], record["source"], record["type"]) == ("failed", "fleet, pitr/fleet", "all")
    assert "Read-only file system" in record["details"]["error"]
    assert record["details"]["error"] in error_line(err)
    assert not [s for s in ALL_SECRETS if s in json.dumps(record)]


def test_init_repo_settings_read_back_and_a_second_run_is_fine(capsys, s3):
    bucket = f"pgdr-init-{uuid.uuid4().hex[:12]}"
    url = f"s3://{bucket}/pgdr"
    args = ["init-repo", "--repo", url, "--sse", "aws:kms", "--kms-key-id", "alias/pgdr",
            "--object-lock-mode", "GOVERNANCE", "--object-lock-days", "7"]
    first = cli_json(capsys, *args)
    assert first["created_bucket"] is True

    s3_client = boto3.client("s3")
    assert s3_client.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    rule = s3_client.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms",
                                                          "KMSMasterKeyID": "alias/pgdr"}
    assert all(s3_client.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"].values())
    # moto's endpoint is plain HTTP: a deny-non-TLS policy would refuse every request.
    assert first["deny_insecure_transport"] is False and "plain HTTP" in first["warnings"][0]
    rules = s3_client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    # Nothing a tier's retention may need moves to a class that must be restored first.
    assert [(t["Days"], t["StorageClass"]) for r in rules for t in r.get("Transitions", [])] == [
        (30, "STANDARD_IA")]
    assert not [r for r in rules if "Expiration" in r]  # no current object (WAL!) ever expires
    lock = s3_client.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    assert lock["ObjectLockEnabled"] == "Enabled"
    retention = lock["Rule"]["DefaultRetention"]
    assert (retention["Mode"], retention["Days"]) == ("GOVERNANCE", 7)

    # moto enforces bucket policies: the repository stays usable over this plain-HTTP endpoint.
    fake_backup(open_repository(url), "fleet", "daily", catalog.utcnow())
    second = cli_json(capsys, *args)
    assert second["created_bucket"] is False
    assert {k: v for k, v in second.items() if k != "created_bucket"} == {
        k: v for k, v in first.items() if k != "created_bucket"}
    code, out, _err = run_cli(capsys, "init-repo", "--repo", url, "--archive-after-days", "180")
    assert code == 0 and "non-TLS requests         NOT denied" in out and "GOVERNANCE 7 d" in out
    assert "warning:" in out and "tiers monthly" in out
    rules = s3_client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert [(t["Days"], t["StorageClass"]) for r in rules for t in r.get("Transitions", [])] == [
        (30, "STANDARD_IA"), (180, "GLACIER")]


def test_backup_and_prune_of_one_database_never_interleave(capsys, pg, new_db, file_repo, monkeypatch):
    db_url = new_db("locked")
    database = dsn.database_name(db_url)
    repo = open_repository(file_repo)
    now = catalog.utcnow()
    old = [fake_backup(repo, database, "manual", now - timedelta(days=60 + i)) for i in range(3)]

    dumping, go_on = threading.Event(), threading.Event()
    real_stream_dump = tasks.backup.stream_dump

    def held_stream_dump(*args, **kwargs):
        dumping.set()
        assert go_on.wait(120)
        return real_stream_dump(*args, **kwargs)

    monkeypatch.setattr(tasks.backup, "stream_dump", held_stream_dump)
    # Only the prune started below runs (not the one that follows every backup).
    monkeypatch.setattr(flows.backup, "prune_after_backup", lambda *args: None)
    results: dict[str, dict] = {}
    backup_thread = threading.Thread(target=lambda: results.update(
        backup=flows.backup.backup(db=db_url, repo=file_repo, tier="manual")))
    backup_thread.start()
    assert dumping.wait(120)
    with pytest.raises(locks.LockBusy, match="backup on"):
        locks.acquire(repo, database, "test", wait_seconds=0)

    from flows.prune import prune

    prune_thread = threading.Thread(target=lambda: results.update(prune=prune(repo=file_repo, db=database)))
    prune_thread.start()
    prune_thread.join(5)
    assert prune_thread.is_alive()  # waiting for the backup's lock
    assert ids(list_backups(repo, database)) == ids(old)  # and has deleted nothing meanwhile
    go_on.set()
    backup_thread.join(120)
    prune_thread.join(120)

    new_id = results["backup"]["backup_id"]
    decided = {r["backup_id"]: r["action"] for r in results["prune"]["backups"]}
    assert decided == {new_id: "keep", **{m.backup_id: "deleted" for m in old}}
    assert ids(list_backups(repo, database)) == {new_id}
    assert not repo.head(locks.lock_key(database))


@pytest.mark.parametrize("replica_kind", ["s3", "file"])
def test_the_dr_copy_restores_identical_content(replica_kind, capsys, s3, s3_repo, fleet_db, new_db,
                                                tmp_path, monkeypatch):
    if replica_kind == "s3":
        bucket = f"pgdr-dr-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", region_name="eu-west-1").create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        replica = f"s3://{bucket}/pgdr"
    else:
        replica = f"file://{tmp_path}/replica"
    monkeypatch.setenv("PGDR_REPLICA_REPO", replica)
    backup = cli_json(capsys, "backup", "--db", fleet_db, "--repo", s3_repo, "--tier", "daily")

    listed = cli_json(capsys, "list", "--repo", replica)["backups"]
    assert [b["backup_id"] for b in listed] == [backup["backup_id"]]
    copy = find_backup(open_repository(replica), backup["backup_id"])
    assert copy.sha256 == backup["sha256"]
    if replica_kind == "s3":
        head = boto3.client("s3").head_object(Bucket=bucket, Key=f"pgdr/{copy.prefix}/{catalog.DUMP}")
        assert head["StorageClass"] == "STANDARD_IA" and head["ServerSideEncryption"] == "AES256"

    target = new_db("from_replica")
    monkeypatch.delenv("PGDR_REPLICA_REPO")
    restored = cli_json(capsys, "restore", backup["backup_id"], "--target", target, "--repo", replica,
                        "--no-pre-restore-backup")
    assert restored["verified"]
    assert table_fingerprints(target) == table_fingerprints(fleet_db)
