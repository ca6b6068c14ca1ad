"""Storage snapshots end to end against a real HTTP S3 endpoint (moto)."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import boto3
import pytest

import flows.storage
import pgdr.storage.s3repo
from pgdr.catalog import catalog, locks, snapshot_retention
from pgdr.catalog.policy import Policy
from pgdr.storage import storage
from pgdr.storage.repository import MiB, open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.s3faults import fake_response, s3_error_body


@pytest.fixture
def s3_calls(s3, monkeypatch) -> Counter:
    """Counts the S3 operations of every client pgdr opens during the test."""
    calls: Counter = Counter()

    def register(client):
        client.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))

    monkeypatch.setattr(pgdr.storage.s3repo, "S3_CLIENT_HOOKS", [register])
    return calls


def new_bucket() -> str:
    name = f"pgdr-src-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def put_all(bucket: str, objects: dict[str, bytes]) -> None:
    client = boto3.client("s3")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=item[0], Body=item[1]),
                      objects.items()))


def contents(bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = boto3.client("s3")
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                     Prefix=prefix)
            for item in page.get("Contents", [])]
    with ThreadPoolExecutor(8) as pool:
        bodies = pool.map(lambda key: client.get_object(Bucket=bucket, Key=key)["Body"].read(), keys)
        return {key[len(prefix):]: body for key, body in zip(keys, bodies, strict=True)}


def test_second_snapshot_copies_only_changed_objects_and_restores_the_bucket(capsys, s3_repo, s3_calls):
    source = new_bucket()
    original = {f"uploads/{i // 100:02d}/photo {i:04d}.jpg": os.urandom(64 + i % 50) for i in range(1500)}
    put_all(source, original)

    first = cli_json(capsys, "storage-snapshot", "--source", f"s3://{source}", "--repo", s3_repo)
    assert (first["object_count"], first["copied_count"]) == (1500, 1500)
    assert first["total_bytes"] == sum(map(len, original.values()))
    assert s3_calls["CopyObject"] == 1500

    changed = dict(original)
    for key in sorted(original)[::150]:  # 10 keys; the same size, other bytes
        changed[key] = os.urandom(len(original[key]))
    assert sum(changed[k] != original[k] for k in original) == 10
    put_all(source, {k: v for k, v in changed.items() if v != original[k]})
    s3_calls.clear()

    second = cli_json(capsys, "storage-snapshot", "--source", f"s3://{source}", "--repo", s3_repo)
    assert s3_calls["CopyObject"] == 10
    assert (second["object_count"], second["copied_count"]) == (1500, 10)
    assert second["previous_snapshot"] == first["snapshot_id"]
    repo = open_repository(s3_repo)
    manifest = storage.find_snapshot(repo, second["snapshot_id"])
    own = {k for k, e in manifest.objects.items() if e["stored"].startswith(manifest.prefix + "/")}
    assert own == {k for k in original if changed[k] != original[k]}
    assert len(list(repo.list(f"{manifest.prefix}/"))) == 10 + 1  # the copies and the manifest

    restored_bucket = new_bucket()
    result = cli_json(capsys, "storage-restore", second["snapshot_id"], "--dest", f"s3://{restored_bucket}",
                      "--repo", s3_repo)
    assert result["object_count"] == 1500
    assert contents(restored_bucket) == changed

    # The first snapshot still restores the original bytes, into a prefix of another bucket.
    elsewhere = new_bucket()
    cli_json(capsys, "storage-restore", first["snapshot_id"], "--dest", f"s3://{elsewhere}/dr/2026",
             "--repo", s3_repo)
    assert contents(elsewhere, "dr/2026/") == original

    # A non-empty destination is only written with --overwrite.
    code, _, err = run_cli(capsys, "storage-restore", "latest", "--dest", f"s3://{elsewhere}/dr",
                           "--repo", s3_repo)
    assert code == 1 and error_line(err) == (f"pgdr: error: s3://{elsewhere}/dr/ is not empty: "
                                             "pass --overwrite to replace objects there")


def test_snapshot_of_a_prefix_restores_into_another_prefix(capsys, s3_repo):
    source = new_bucket()
    put_all(source, {"exports/a.csv": b"a,b\n1,2\n", "exports/sub/b.csv": b"x\n", "reports/r.pdf": b"%PDF"})
    snap = cli_json(capsys, "storage-snapshot", "--source", f"s3://{source}/exports", "--repo", s3_repo)
    assert snap["object_count"] == 2 and snap["source_prefix"] == "exports/"
    dest = new_bucket()
    cli_json(capsys, "storage-restore", "latest", "--bucket", source, "--dest", f"s3://{dest}/back",
             "--repo", s3_repo)
    assert contents(dest) == {"back/a.csv": b"a,b\n1,2\n", "back/sub/b.csv": b"x\n"}


def test_large_objects_are_copied_in_parts(s3, s3_calls, s3_repo):
    source = new_bucket()
    body = os.urandom(12 * MiB + 7)
    client = pgdr.storage.s3repo.s3_client()
    client.put_object(Bucket=source, Key="big/export.bin", Body=body, ContentType="application/x-test",
                      Metadata={"owner": "reports"})
    etag = client.head_object(Bucket=source, Key="big/export.bin")["ETag"]
    s3_calls.clear()

    open_repository(s3_repo).copy_object((source, "big/export.bin"), (source, "copy/export.bin"), etag=etag,
                                         limit=5 * MiB, part_size=5 * MiB)

    assert s3_calls["UploadPartCopy"] == 3 and s3_calls["CopyObject"] == 0
    copied = client.get_object(Bucket=source, Key="copy/export.bin")
    assert copied["Body"].read() == body
    assert copied["ContentType"] == "application/x-test" and copied["Metadata"] == {"owner": "reports"}


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_repository_copies_and_deletes_many_keys(kind, s3_calls, s3_repo, file_repo, monkeypatch):
    repo = open_repository(s3_repo if kind == "s3" else file_repo)
    keys = [f"area/{n}.bin" for n in range(5)]
    for key in keys:
        repo.put_bytes(key, key.encode())
    repo.copy(keys[0], "copies/0.bin", storage_class="STANDARD_IA")
    assert repo.get_bytes("copies/0.bin") == keys[0].encode()
    s3_calls.clear()
    monkeypatch.setattr(pgdr.storage.s3repo, "DELETE_BATCH", 2)

    assert repo.delete_many([*keys, "copies/0.bin", "area/absent.bin"]) == {}
    assert list(repo.list()) == []
    if kind == "s3":
        assert (s3_calls["DeleteObjects"], s3_calls["DeleteObject"]) == (4, 0)
        assert repo.head(keys[0]) is None


def test_s3_delete_many_reports_why_each_refused_key_stays(s3_repo, monkeypatch):
    repo = open_repository(s3_repo)
    refused = repo._key("area/refused.bin")

    def refuse_one(client):
        def before_send(request, **_kwargs):
            if refused.encode() in request.body:
                return fake_response(200, (
                    b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult><Error>'
                    b"<Key>" + refused.encode() + b"</Key><Code>AccessDenied</Code>"
                    b"<Message>Access Denied</Message></Error></DeleteResult>"))
            return None

        client.meta.events.register("before-send.s3.DeleteObjects", before_send)

    monkeypatch.setattr(pgdr.storage.s3repo, "S3_CLIENT_HOOKS", [refuse_one])
    repo = open_repository(s3_repo)
    failed = repo.delete_many(["area/kept.bin", "area/refused.bin"])
    assert failed == {"area/refused.bin": "S3 delete_objects failed: AccessDenied Access Denied"}


def test_snapshot_needs_an_s3_repository_and_refuses_to_copy_itself(capsys, s3, s3_repo, file_repo):
    source = new_bucket()
    code, _, err = run_cli(capsys, "storage-snapshot", "--source", f"s3://{source}", "--repo", file_repo)
    assert code == 1 and "must be s3://" in error_line(err)
    repo_bucket = s3_repo.removeprefix("s3://").split("/")[0]
    code, _, err = run_cli(capsys, "storage-snapshot", "--source", f"s3://{repo_bucket}", "--repo", s3_repo)
    assert code == 1 and "a snapshot would copy itself" in error_line(err)


def two_snapshots(capsys, s3_repo: str) -> tuple[str, dict[str, bytes], dict, dict]:
    """A bucket snapshotted twice (daily); between them 5 objects change, 3 go and 2 come."""
    source = new_bucket()
    original = {f"uploads/{i:03d}.jpg": os.urandom(100 + i) for i in range(60)}
    put_all(source, original)
    first = cli_json(capsys, "storage-snapshot", "--source", f"s3://{source}", "--repo", s3_repo,
                     "--tier", "daily")
    current = dict(original)
    for key in sorted(original)[:5]:
        current[key] = os.urandom(80)
    client = boto3.client("s3")
    for key in sorted(original)[-3:]:
        del current[key]
        client.delete_object(Bucket=source, Key=key)
    current.update({"uploads/new-1.jpg": b"new one", "uploads/new-2.jpg": b"new two"})
    put_all(source, {k: v for k, v in current.items() if original.get(k) != v})
    second = cli_json(capsys, "storage-snapshot", "--source", f"s3://{source}", "--repo", s3_repo,
                      "--tier", "daily")
    assert (second["copied_count"], second["previous_snapshot"]) == (7, first["snapshot_id"])
    assert second["pruned"] == {"keep": 2}  # the retention after each snapshot: both young
    return source, current, first, second


def test_an_expired_snapshot_goes_and_what_the_kept_one_refers_to_stays(capsys, s3_repo, monkeypatch):
    source, current, first, second = two_snapshots(capsys, s3_repo)
    repo = open_repository(s3_repo)
    older = storage.find_snapshot(repo, first["snapshot_id"])
    newer = storage.find_snapshot(repo, second["snapshot_id"])
    copies = {o.key for o in repo.list(f"{older.prefix}/{storage.OBJECTS}/")}
    still_referenced = copies & storage.referenced_keys([newer])
    assert (len(copies), len(still_referenced)) == (60, 52)  # 5 replaced and 3 deleted since
    stored_before = sorted(o.key for o in repo.list("storage/"))

    # Time travel by policy: a daily retention of 0 days keeps only the newest daily snapshot.
    monkeypatch.setenv("PGDR_RETENTION_DAILY_DAYS", "0")
    dry = cli_json(capsys, "prune", "--repo", s3_repo, "--dry-run")
    rows = {r["backup_id"]: r for r in dry["backups"]}
    assert {k: r["action"] for k, r in rows.items()} == {older.snapshot_id: "would delete",
                                                         newer.snapshot_id: "keep"}
    assert rows[older.snapshot_id]["area"] == "storage" and rows[older.snapshot_id]["database"] == source
    assert "8 objects to delete, 52 kept: a remaining snapshot refers to them" in rows[
        older.snapshot_id]["reason"]
    assert sorted(o.key for o in repo.list("storage/")) == stored_before

    result = cli_json(capsys, "prune", "--repo", s3_repo)
    assert result["ok"] and result["counts"] == {"keep": 1, "deleted": 1}
    assert not repo.head(older.manifest_key)
    assert {o.key for o in repo.list(f"{older.prefix}/")} == still_referenced
    assert [s.snapshot_id for s in storage.list_snapshots(repo)] == [newer.snapshot_id]
    assert not repo.head(locks.lock_key(source, "storage"))

    restored = new_bucket()
    cli_json(capsys, "storage-restore", "latest", "--dest", f"s3://{restored}", "--repo", s3_repo)
    assert contents(restored) == current
    # A second prune finds nothing more to do: the kept objects are still referred to.
    again = cli_json(capsys, "prune", "--repo", s3_repo, "--bucket", source)
    assert again["counts"] == {"keep": 1}
    assert {o.key for o in repo.list(f"{older.prefix}/")} == still_referenced


ACCESS_DENIED = s3_error_body("AccessDenied", "Access Denied")


def deny_object_deletes(client) -> None:
    """Every deletion of a snapshot's stored object fails (manifests still go)."""
    def before_send(request, **_kwargs):
        if f"/{storage.OBJECTS}/" in request.url:
            return fake_response(403, ACCESS_DENIED)
        return None

    def before_send_batch(request, **_kwargs):
        if f"/{storage.OBJECTS}/".encode() in request.body:
            return fake_response(403, ACCESS_DENIED)
        return None

    client.meta.events.register("before-send.s3.DeleteObject", before_send)
    client.meta.events.register("before-send.s3.DeleteObjects", before_send_batch)


def prune_bucket(repo_url: str, bucket: str, now) -> dict[str, dict]:
    """Retention of the bucket's snapshots at the time now; the rows by snapshot id."""
    repo = open_repository(repo_url)
    plan = snapshot_retention.plan_storage_prune(repo, bucket, now, Policy())
    return {r["backup_id"]: r for r in snapshot_retention.apply_storage_plan(repo, plan, dry_run=False)}


def test_a_prune_cut_short_after_the_manifests_leaves_the_kept_snapshot_whole(capsys, s3_repo, monkeypatch):
    source, current, first, second = two_snapshots(capsys, s3_repo)
    repo = open_repository(s3_repo)
    older = storage.find_snapshot(repo, first["snapshot_id"])
    newer = storage.find_snapshot(repo, second["snapshot_id"])
    later = catalog.utcnow() + timedelta(days=31)  # past the daily retention

    # As if the prune died right after deleting the manifests: no object deletion succeeds.
    monkeypatch.setattr(pgdr.storage.s3repo, "S3_CLIENT_HOOKS", [deny_object_deletes])
    row = prune_bucket(s3_repo, source, later)[older.snapshot_id]
    assert row["action"] == "failed" and "8 objects not deleted" in row["reason"]
    assert not repo.head(older.manifest_key)
    assert len(list(repo.list(f"{older.prefix}/"))) == 60
    restored = new_bucket()
    cli_json(capsys, "storage-restore", newer.snapshot_id, "--dest", f"s3://{restored}", "--repo", s3_repo)
    assert contents(restored) == current

    # The next prune sweeps the leftovers that no snapshot refers to, and only those.
    monkeypatch.setattr(pgdr.storage.s3repo, "S3_CLIENT_HOOKS", [])
    row = prune_bucket(s3_repo, source, later)[older.snapshot_id]
    assert row["action"] == "deleted" and row["finished_at"] is None
    assert "no manifest" in row["reason"] and "8 objects deleted, 52 kept" in row["reason"]
    assert {o.key for o in repo.list(f"{older.prefix}/")} == storage.referenced_keys([newer]) & {
        e["stored"] for e in older.objects.values()}
    again = new_bucket()
    cli_json(capsys, "storage-restore", "latest", "--dest", f"s3://{again}", "--repo", s3_repo)
    assert contents(again) == current


def test_snapshot_and_prune_of_one_bucket_never_interleave(capsys, s3_repo, monkeypatch):
    source = new_bucket()
    put_all(source, {"a.txt": b"a", "b.txt": b"b"})
    first = cli_json(capsys, "storage-snapshot", "--source", f"s3://{source}", "--repo", s3_repo,
                     "--tier", "daily")
    monkeypatch.setenv("PGDR_RETENTION_DAILY_DAYS", "0")
    copying, go_on = threading.Event(), threading.Event()
    real_take_snapshot = storage.take_snapshot

    def held_take_snapshot(*args, **kwargs):
        copying.set()
        assert go_on.wait(120)
        return real_take_snapshot(*args, **kwargs)

    monkeypatch.setattr(storage, "take_snapshot", held_take_snapshot)
    # Only the prune started below runs (not the one that follows every snapshot).
    monkeypatch.setattr(flows.storage, "prune_after_backup", lambda *args, **kwargs: None)
    results: dict[str, dict] = {}
    snapshot_thread = threading.Thread(target=lambda: results.update(snapshot=flows.storage.storage_snapshot(
        source=f"s3://{source}", repo=s3_repo, tier="daily")))
    snapshot_thread.start()
    assert copying.wait(120)
    repo = open_repository(s3_repo)
    with pytest.raises(locks.LockBusy, match=f"storage {source} is locked by storage-snapshot on"):
        locks.acquire(repo, source, "test", wait_seconds=0, area="storage")

    from flows.prune import prune

    prune_thread = threading.Thread(target=lambda: results.update(prune=prune(repo=s3_repo, bucket=source)))
    prune_thread.start()
    prune_thread.join(5)
    assert prune_thread.is_alive()  # waiting for the snapshot's lock
    assert [s.snapshot_id for s in storage.list_snapshots(repo)] == [first["snapshot_id"]]
    go_on.set()
    snapshot_thread.join(120)
    prune_thread.join(120)

    new_id = results["snapshot"]["snapshot_id"]
    decided = {r["backup_id"]: r["action"] for r in results["prune"]["backups"]}
    assert decided == {new_id: "keep", first["snapshot_id"]: "deleted"}
    restored = new_bucket()
    cli_json(capsys, "storage-restore", "latest", "--dest", f"s3://{restored}", "--repo", s3_repo)
    assert contents(restored) == {"a.txt": b"a", "b.txt": b"b"}


def test_snapshots_leave_an_audit_record_of_each_success_and_failure(capsys, s3_repo):
    source = new_bucket()
    put_all(source, {"a.txt": b"a", "b.txt": b"bb"})
    snap = cli_json(capsys, "storage-snapshot", "--source", f"s3://{source}", "--repo", s3_repo)
    missing = f"pgdr-src-{uuid.uuid4().hex[:12]}"
    code, _, err = run_cli(capsys, "storage-snapshot", "--source", f"s3://{missing}", "--repo", s3_repo)
    assert code == 1

    repo = open_repository(s3_repo)
    records = [json.loads(repo.get_bytes(o.key)) for o in repo.list("audit/")]
    by_status = {r["status"]: r for r in records if r["operation"] == "storage-snapshot"}
    success, failed = by_status["success"], by_status["failed"]
    assert (success["source"], success["destination"], success["size_bytes"]) == (
        f"s3://{source}/", f"{s3_repo}/storage/{source}/{snap['snapshot_id']}", 3)
    assert success["details"] == {"backup_id": snap["snapshot_id"], "objects": 2, "copied": 2}
    assert (failed["source"], failed["destination"], failed["size_bytes"]) == (f"s3://{missing}/", s3_repo, 0)
    assert failed["details"]["error"] == error_line(err).removeprefix("pgdr: error: ")
    assert set(failed["details"]) == {"backup_id", "error"} and failed["duration_seconds"] >= 0
