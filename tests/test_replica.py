"""The DR copy (PGDR_REPLICA_REPO) on two moto buckets: everything a region loss would
otherwise take with it, copied, checked and usable from the replica alone."""

from __future__ import annotations

import json
import uuid

import boto3
import psycopg
import pytest

from tests.support.cli import cli_json, error_line, run_cli
from tests.support.secrets import ALL_SECRETS
from tests.support.stored import audit_records

SEGMENT = "000000010000000000000007"


def new_bucket(prefix: str) -> str:
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def test_the_dr_copy_holds_dumps_base_backups_wal_files_and_snapshots(capsys, monkeypatch, new_db, s3_repo,
                                                                      tmp_path):
    source_db = new_db("prod")
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE vehicles AS SELECT g AS id FROM generate_series(1, 50) g")
    database = source_db.rsplit("/", 1)[1]
    uploads = new_bucket("pgdr-uploads")
    boto3.client("s3").put_object(Bucket=uploads, Key="photos/a.jpg", Body=b"jpeg bytes")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.yaml").write_bytes(b"replicas: 3\n")
    segment = tmp_path / SEGMENT
    segment.write_bytes(bytes(range(256)) * 32)

    # Made before the DR copy was configured: only the primary has them.
    dump = cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    base = cli_json(capsys, "basebackup", "--db", source_db, "--repo", s3_repo)
    cli_json(capsys, "wal-push", str(segment), "--repo", s3_repo, "--db", database)
    cli_json(capsys, "files", "--path", str(tmp_path / "conf"), "--name", "app-config", "--repo", s3_repo)
    cli_json(capsys, "storage-snapshot", "--source", f"s3://{uploads}", "--repo", s3_repo)

    replica = f"s3://{new_bucket('pgdr-dr')}/pgdr"
    monkeypatch.setenv("PGDR_REPLICA_REPO", replica)
    lag = cli_json(capsys, "status", "--repo", s3_repo)["replica"]
    (ours,) = [d for d in lag["databases"] if d["database"] == database]
    assert (ours["missing_backups"], ours["missing_wal_files"], ours["newest_replica_backup"]) == (1, 1, None)
    assert ours["lag_seconds"] > 0 and lag["lag_seconds"] >= ours["lag_seconds"]
    assert (lag["missing_files_backups"], lag["missing_storage_snapshots"]) == (1, 1)
    code, _, err = run_cli(capsys, "replicate", "--repo", s3_repo)
    assert code == 1 and "--all" in err

    copied = cli_json(capsys, "replicate", "--all", "--repo", s3_repo)["copied"]
    assert copied == {"backups": 1, "base_backups": 1, "wal_files": 1, "files_backups": 1,
                      "storage_snapshots": 1}
    lag = cli_json(capsys, "status", "--repo", s3_repo)["replica"]
    assert lag["lag_seconds"] == 0 and lag["missing_files_backups"] == lag["missing_storage_snapshots"] == 0

    # From now on backups are copied as they are made. A WAL push stays light (no second
    # repository per segment): the next `replicate --all` copies the WAL.
    later = tmp_path / SEGMENT.replace("07", "08")
    later.write_bytes(b"\1" * 8192)
    pushed = cli_json(capsys, "wal-push", str(later), "--repo", s3_repo, "--db", database)
    assert "replicated" not in pushed
    (ours,) = [d for d in cli_json(capsys, "status", "--repo", s3_repo)["replica"]["databases"]
               if d["database"] == database]
    assert ours["missing_wal_files"] == 1
    again = cli_json(capsys, "backup", "--db", source_db, "--repo", s3_repo)
    cli_json(capsys, "files", "--path", str(tmp_path / "conf"), "--name", "app-config", "--repo", s3_repo)
    assert cli_json(capsys, "replicate", "--all", "--repo", s3_repo)["copied"] == {**dict.fromkeys(copied, 0),
                                                                                  "wal_files": 1}

    # The replica alone restores each of them.
    listed = {b["backup_id"] for b in cli_json(capsys, "list", "--repo", replica)["backups"]}
    assert {dump["backup_id"], again["backup_id"]} <= listed
    for name, path in ((SEGMENT, segment), (later.name, later)):
        code, _, err = run_cli(capsys, "wal-fetch", name, str(tmp_path / "fetched"), "--repo", replica,
                               "--db", database)
        assert (code, err) == (0, "") and (tmp_path / "fetched").read_bytes() == path.read_bytes()
    restored = cli_json(capsys, "restore-files", "latest", "--name", "app-config", "--dest",
                        str(tmp_path / "restored"), "--repo", replica)
    assert restored["verified"]
    assert (tmp_path / "restored" / "conf" / "app.yaml").read_bytes() == b"replicas: 3\n"
    target = new_bucket("pgdr-restored")
    cli_json(capsys, "storage-restore", "latest", "--dest", f"s3://{target}", "--repo", replica)
    assert boto3.client("s3").get_object(Bucket=target, Key="photos/a.jpg")["Body"].read() == b"jpeg bytes"
    from pgdr.pitr.basebackup import list_base_backups
    from pgdr.storage.repository import open_repository

    (copy,) = list_base_backups(open_repository(replica), base["database"])
    assert copy.backup_id == base["backup_id"]
    open_repository(replica).verify(f"{copy.prefix}/{copy.data_key}", copy.size_bytes, copy.sha256)


def test_an_unreachable_replica_never_stalls_wal_archiving_and_the_gap_is_filled_later(capsys, monkeypatch,
                                                                                       s3_repo, tmp_path):
    missing = f"pgdr-dr-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("PGDR_REPLICA_REPO", f"s3://{missing}/pgdr")
    segment = tmp_path / SEGMENT
    segment.write_bytes(b"\2" * 8192)
    code, out, err = run_cli(capsys, "wal-push", str(segment), "--repo", s3_repo, "--db", "ledger", "--json")
    # Archived (PostgreSQL may recycle the segment): the push never waits for the DR copy,
    # and status says out loud that the replica cannot be reached.
    assert (code, err) == (0, "") and json.loads(out)["stored"] is True
    assert "NoSuchBucket" in cli_json(capsys, "status", "--repo", s3_repo)["replica"]["error"]
    # Catching up fails too meanwhile, and its audit record says why (no secret in it).
    code, _, err = run_cli(capsys, "replicate", "--all", "--repo", s3_repo)
    assert code == 1 and "NoSuchBucket" in err
    [failed] = audit_records(s3_repo, "replicate")
    assert (failed["status"], failed["source"], failed["destination"]) == (
        "failed", s3_repo, f"s3://{missing}/pgdr")
    assert failed["details"] == {"error": error_line(err).removeprefix("pgdr: error: ")}
    assert not [s for s in ALL_SECRETS if s in json.dumps(failed)]

    boto3.client("s3").create_bucket(Bucket=missing)
    assert cli_json(capsys, "status", "--repo", s3_repo)["replica"]["databases"][0]["missing_wal_files"] == 1
    assert cli_json(capsys, "replicate", "--all", "--repo", s3_repo)["copied"]["wal_files"] == 1
    assert [r["status"] for r in audit_records(s3_repo, "replicate")] == ["failed", "success"]
    code, _, err = run_cli(capsys, "wal-fetch", SEGMENT, str(tmp_path / "fetched"), "--repo",
                           f"s3://{missing}/pgdr", "--db", "ledger")
    assert (code, err) == (0, "") and (tmp_path / "fetched").read_bytes() == segment.read_bytes()


def test_the_scheduled_replicate_copies_nothing_and_succeeds_until_a_replica_is_configured(
        monkeypatch, s3_repo):
    from flows.replicate import replicate
    from pgdr.ops.errors import ConfigError

    monkeypatch.delenv("PGDR_REPLICA_REPO", raising=False)
    # The deployment runs every five minutes: without a replica each run is a quiet success...
    assert replicate(repo=s3_repo, only_when_configured=True)["replica"] is None
    # ...while asking for a copy by hand with nowhere to copy to is an error.
    with pytest.raises(ConfigError, match="no DR copy configured"):
        replicate(repo=s3_repo)
