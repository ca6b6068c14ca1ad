"""Backups end to end on a real PostgreSQL, a real HTTP S3 endpoint and real gpg."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from pgdr.catalog.scan import find_backup, list_backups
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import counts_in
from tests.support.fake_pg_dump import broken_pg_bin
from tests.support.secrets import PG_SECRET_PASSWORD
from tests.support.stored import archive_tables, decode_backup, restore_archive


def backup_json(capsys, *argv: str) -> dict:
    return cli_json(capsys, "backup", *argv)


@pytest.mark.parametrize("repo_kind", ["file", "s3"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "gpg"])
def test_backup_decodes_to_an_archive_with_every_table(repo_kind, encrypted, request, capsys,
                                                       fleet_db, gpg, tmp_path, monkeypatch):
    repo_url = request.getfixturevalue("file_repo" if repo_kind == "file" else "s3_repo")
    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    extra = ["--encrypt-to", gpg.fingerprint] if encrypted else []
    result = backup_json(capsys, "--db", fleet_db, "--repo", repo_url, "--tier", "daily", *extra)

    assert result["database"] == "fleet" and result["tier"] == "daily"
    assert result["location"].startswith(repo_url)
    assert result["row_counts"] == counts_in(fleet_db)
    assert set(result["row_counts"]) == {f"public.{t}" for t in
                                         ("vehicles", "drivers", "dispatches", "gps_points", "audit_logs")}
    manifest = find_backup(open_repository(repo_url), result["backup_id"])
    assert manifest.sha256 == result["sha256"] and manifest.size_bytes == result["size_bytes"]
    assert (manifest.encryption is not None) == encrypted
    if encrypted:
        assert manifest.encryption["recipient_fingerprint"] == gpg.fingerprint

    archive = decode_backup(repo_url, manifest, tmp_path / "dump", gpg.homedir)
    assert archive_tables(archive) == set(result["row_counts"])

    code, out, _ = run_cli(capsys, "list", "--repo", repo_url, "--json")
    listed = json.loads(out)["backups"]
    assert code == 0 and [b["backup_id"] for b in listed] == [result["backup_id"]]
    assert set(listed[0]) >= {"backup_id", "database", "tier", "finished_at", "size_bytes"}


def test_s3_objects_carry_the_tier_storage_class_and_encryption(capsys, fleet_db, s3_repo):
    result = backup_json(capsys, "--db", fleet_db, "--repo", s3_repo, "--tier", "weekly")
    repo = open_repository(s3_repo)
    manifest = find_backup(repo, result["backup_id"])
    head = repo.client.head_object(Bucket=repo.bucket, Key=f"{repo.prefix}/{manifest.prefix}/dump.pgdr")
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["ServerSideEncryption"] == "AES256"


@pytest.fixture(scope="module")
def big_db(pg):
    """About 24 MB of incompressible rows: several multipart parts, a dump that takes a while."""
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS big WITH (FORCE)")
        conn.execute("CREATE DATABASE big")
    url = pg.url("big")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE blobs (id bigint PRIMARY KEY, payload bytea)")
        conn.execute(
            "INSERT INTO blobs SELECT i, decode(string_agg(md5(i::text || ':' || j::text), ''), 'hex')"
            " FROM generate_series(1, 6000) i, generate_series(1, 256) j GROUP BY i")
        conn.execute("CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
    return url


def test_counts_match_the_dump_while_rows_are_inserted(capsys, big_db, file_repo, tmp_path, new_db):
    stop = threading.Event()
    inserted = 0

    def writer():
        nonlocal inserted
        with psycopg.connect(big_db, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO events DEFAULT VALUES")
                inserted += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        result = backup_json(capsys, "--db", big_db, "--repo", file_repo)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    manifest = find_backup(open_repository(file_repo), result["backup_id"])
    target = new_db("counted")
    restore_archive(decode_backup(file_repo, manifest, tmp_path / "dump"), target)
    assert counts_in(target) == result["row_counts"]
    # Rows kept arriving around the snapshot: the live table has moved on.
    assert counts_in(big_db)["public.events"] > result["row_counts"]["public.events"] > 0
    assert inserted > 0


def assert_nothing_left(repo_url: str) -> None:
    repo = open_repository(repo_url)
    assert list_backups(repo) == []
    assert not [o for o in repo.list("") if not o.key.startswith("audit/")]
    assert repo.incomplete_uploads("") == []


def test_missing_database_fails_with_one_line_and_leaves_nothing(capsys, pg, s3_repo):
    code, out, err = run_cli(capsys, "backup", "--db", pg.url("no_such_db"), "--repo", s3_repo, "--json")
    assert code == 1 and out == ""
    assert "no_such_db" in error_line(err)
    assert_nothing_left(s3_repo)


@pytest.fixture
def pg_dump_killed_midstream(tmp_path, monkeypatch):
    monkeypatch.setenv("PGDR_PG_BIN", str(broken_pg_bin(tmp_path / "bin", limit=20 * 2**20, then="kill")))


@pytest.mark.parametrize("repo_kind", ["file", "s3"])
def test_pg_dump_killed_midstream_leaves_no_backup_and_no_upload(
        repo_kind, request, capsys, big_db, pg_dump_killed_midstream, monkeypatch):
    repo_url = request.getfixturevalue("file_repo" if repo_kind == "file" else "s3_repo")
    code, _out, err = run_cli(capsys, "backup", "--db", big_db, "--repo", repo_url)
    assert code == 1
    assert "pg_dump was killed by signal SIGKILL" in err
    assert "Traceback" not in err
    assert_nothing_left(repo_url)
    monkeypatch.delenv("PGDR_PG_BIN")
    code, _, err = run_cli(capsys, "backup", "--db", big_db, "--repo", repo_url)
    assert code == 0, err
    assert len(list_backups(open_repository(repo_url))) == 1


def test_password_never_reaches_argv_logs_artifacts_or_the_repository(
        capsys, caplog, pg, file_repo, secrets, tmp_path):
    from prefect.client.orchestration import get_client

    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS secretive WITH (FORCE)")
        conn.execute("CREATE DATABASE secretive OWNER pgdr_secret")
    with psycopg.connect(pg.secret_url("secretive")) as conn:
        conn.execute("CREATE TABLE t AS SELECT i FROM generate_series(1, 200000) i")

    seen_argv: list[str] = []
    stop = threading.Event()

    def watch_processes():
        while not stop.is_set():
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    with contextlib.suppress(OSError):
                        seen_argv.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch_processes)
    watcher.start()
    try:
        code, out, err = run_cli(capsys, "backup", "--db", pg.secret_url("secretive"), "--repo",
                                 file_repo, "--json")
    finally:
        stop.set()
        watcher.join()
    assert code == 0, err
    assert any("pg_dump" in argv for argv in seen_argv), "the watcher never saw pg_dump"
    password = PG_SECRET_PASSWORD
    stored = b"".join(p.read_bytes() for p in Path(file_repo.removeprefix("file://")).rglob("*.json"))
    with get_client(sync_client=True) as client:
        artifacts = json.dumps([a.model_dump(mode="json") for a in client.read_artifacts()])
        runs = json.dumps([r.model_dump(mode="json") for r in client.read_flow_runs()])
    for place, text in [("argv", "\n".join(seen_argv)), ("stdout", out), ("stderr", err),
                        ("logs", caplog.text), ("manifest/audit", stored.decode()),
                        ("artifacts", artifacts), ("flow runs", runs)]:
        assert password not in text, f"password found in {place}"
    assert json.loads(out)["row_counts"] == {"public.t": 200000}


def test_wrong_password_is_one_clear_line_without_the_password(capsys, pg, file_repo):
    url = pg.secret_url("postgres").replace(quote(PG_SECRET_PASSWORD, safe=""), "Wrong-Pa55-Guess")
    code, _out, err = run_cli(capsys, "backup", "--db", url, "--repo", file_repo)
    assert code == 1
    assert "password authentication failed" in err and "Wrong-Pa55-Guess" not in err


@pytest.mark.parametrize("argv, message", [
    (["--tier", "hourly"], "unknown tier 'hourly'"),
    (["--repo", "ftp://nowhere/x"], "unsupported repository URL"),
    (["--encrypt-to", "nobody@example.invalid"], "no gpg public key"),
])
def test_bad_configuration_is_one_line_and_no_traceback(capsys, fleet_db, file_repo, argv, message,
                                                        gpg, monkeypatch):
    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    args = ["backup", "--db", fleet_db, "--repo", file_repo, *argv]
    if "--repo" in argv:
        args = ["backup", "--db", fleet_db, *argv]
    code, _out, err = run_cli(capsys, *args)
    assert code == 1 and message in error_line(err)


def test_a_tricky_schema_round_trips_with_identical_content(capsys, tricky_db, file_repo, new_db, tmp_path):
    from tests.support.db import table_fingerprints

    result = backup_json(capsys, "--db", tricky_db, "--repo", file_repo)
    assert '"Sales Data"."Order Items"' in result["row_counts"]
    assert 'public."user"' in result["row_counts"]
    manifest = find_backup(open_repository(file_repo), result["backup_id"])
    target = new_db("tricky_copy")
    restore_archive(decode_backup(file_repo, manifest, tmp_path / "dump"), target)
    assert table_fingerprints(target) == table_fingerprints(tricky_db)


def test_pagila_schema_round_trips_exactly(capsys, pagila_db, file_repo, new_db, tmp_path):
    import subprocess

    result = backup_json(capsys, "--db", pagila_db, "--repo", file_repo)
    manifest = find_backup(open_repository(file_repo), result["backup_id"])
    target = new_db("pagila_copy")
    restore_archive(decode_backup(file_repo, manifest, tmp_path / "dump"), target)

    def schema(url: str) -> list[str]:
        text = subprocess.run(["pg_dump", "--schema-only", "-d", url], capture_output=True, text=True,
                              check=True).stdout
        # \restrict lines carry a random key per dump run.
        return [line for line in text.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))]

    assert schema(target) == schema(pagila_db)


def test_runbook_environment_names_configure_a_backup(capsys, pg, fleet_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        f"DB_HOST=127.0.0.1\nDB_PORT={pg.port}\nDB_NAME=fleet\nDB_USER=postgres\n"
        f"BACKUP_DIR={tmp_path / 'backups'}\n")
    for name in ("DATABASE_URL", "PGDR_REPO", "S3_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    result = backup_json(capsys)
    assert result["database"] == "fleet"
    assert result["location"].startswith((tmp_path / "backups").as_uri())
    assert os.path.exists(tmp_path / "backups")


def test_a_backup_shows_its_progress_and_its_tables_as_prefect_artifacts(fleet_db, file_repo):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.backup import backup

    state = backup(db=fleet_db, repo=file_repo, return_state=True)
    assert state.is_completed()
    summary = state.result()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (progress,) = [artifact for artifact in artifacts if artifact.type == "progress"]
    assert progress.data == 100.0 and progress.description == "backup of fleet"
    (tables,) = [artifact for artifact in artifacts if artifact.key == "backup-fleet"]
    table = json.loads(tables.data)
    assert {row["table"]: row["rows"] for row in table} == {**summary["row_counts"],
                                                             "TOTAL": sum(summary["row_counts"].values())}
