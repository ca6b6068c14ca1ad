"""Storage snapshots end to end against a real HTTP S3 endpoint (moto)."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest

import tasks.repository
from tasks import storage
from tasks.repository import MiB, open_repository
from tests.support.cli import cli_json, error_line, run_cli


@pytest.fixture
def s3_calls(s3, monkeypatch) -> Counter:
    """Counts the S3 operations of every client pgdr opens during the test."""
    calls: Counter = Counter()

    def register(client):
        client.meta.events.register("before-call.s3.*", lambda model, **_: calls.update([model.name]))

    monkeypatch.setattr(tasks.repository, "S3_CLIENT_HOOKS", [register])
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
    client = tasks.repository.s3_client()
    client.put_object(Bucket=source, Key="big/export.bin", Body=body, ContentType="application/x-test",
                      Metadata={"owner": "reports"})
    etag = client.head_object(Bucket=source, Key="big/export.bin")["ETag"]
    s3_calls.clear()

    storage.copy(client, (source, "big/export.bin"), (source, "copy/export.bin"), size=len(body), etag=etag,
                 extra={}, limit=5 * MiB, part_size=5 * MiB)

    assert s3_calls["UploadPartCopy"] == 3 and s3_calls["CopyObject"] == 0
    copied = client.get_object(Bucket=source, Key="copy/export.bin")
    assert copied["Body"].read() == body
    assert copied["ContentType"] == "application/x-test" and copied["Metadata"] == {"owner": "reports"}


def test_snapshot_needs_an_s3_repository_and_refuses_to_copy_itself(capsys, s3, s3_repo, file_repo):
    source = new_bucket()
    code, _, err = run_cli(capsys, "storage-snapshot", "--source", f"s3://{source}", "--repo", file_repo)
    assert code == 1 and "must be s3://" in error_line(err)
    repo_bucket = s3_repo.removeprefix("s3://").split("/")[0]
    code, _, err = run_cli(capsys, "storage-snapshot", "--source", f"s3://{repo_bucket}", "--repo", s3_repo)
    assert code == 1 and "a snapshot would copy itself" in error_line(err)
