"""Retries retry what may succeed when tried again, and nothing else.

Faults in real components: a real HTTP S3 endpoint answering 503 or 403 (botocore event
hooks), a real PostgreSQL whose backend serving pg_dump is terminated mid-dump.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from pgdr.catalog.scan import list_backups
from pgdr.ops.errors import (
    PgdrError,
    TransientError,
    is_transient,
    transient_pg_message,
    transient_s3_error,
)
from pgdr.pipeline.process import CommandError
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.s3faults import S3Faults, fake_response, install_s3_faults, s3_error_body
from tests.test_backup import assert_nothing_left

UNAVAILABLE = s3_error_body("ServiceUnavailable", "Service is unable to handle request.")
ACCESS_DENIED = s3_error_body("AccessDenied", "Access Denied")


def dump_write(operation: str, url: str) -> bool:
    """An S3 request writing a dump.pgdr."""
    return operation in ("PutObject", "CreateMultipartUpload") and "/dump.pgdr" in url


@pytest.fixture
def s3_faults(monkeypatch) -> S3Faults:
    """Faults planted in every S3 client pgdr creates, each request tried once."""
    # One HTTP attempt per request: what botocore's own retries would hide is the task's to retry.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return install_s3_faults(monkeypatch)


def test_a_backup_whose_s3_put_fails_twice_with_503_completes_through_a_retry(
        capsys, fleet_db, s3_repo, s3_faults):
    s3_faults.plant(dump_write, lambda: fake_response(503, UNAVAILABLE), times=2)
    backup = cli_json(capsys, "backup", "--db", fleet_db, "--repo", s3_repo)
    assert s3_faults.count(dump_write) == 3
    repo = open_repository(s3_repo)
    backups = list_backups(repo)
    assert [b.backup_id for b in backups] == [backup["backup_id"]]  # one backup, not three
    manifest = backups[0]
    repo.verify(f"{manifest.prefix}/{manifest.data_key}", manifest.size_bytes, manifest.sha256)
    assert [o.key for o in repo.list("fleet/") if o.key.endswith("dump.pgdr")] == \
        [f"{manifest.prefix}/{manifest.data_key}"]
    assert repo.incomplete_uploads("") == []


def test_a_permanent_s3_error_is_not_retried(capsys, fleet_db, s3_repo, s3_faults):
    s3_faults.plant(dump_write, lambda: fake_response(403, ACCESS_DENIED))
    code, out, err = run_cli(capsys, "backup", "--db", fleet_db, "--repo", s3_repo, "--json")
    assert code == 1 and out == ""
    assert "AccessDenied" in error_line(err)
    assert s3_faults.count(dump_write) == 1
    assert_nothing_left(s3_repo)


def test_a_dump_whose_server_connection_is_terminated_is_retried_into_one_backup(
        capsys, pg, new_db, file_repo):
    url = new_db("retry")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE readings (id int PRIMARY KEY, value text)")
        conn.execute("INSERT INTO readings SELECT i, md5(i::text) FROM generate_series(1, 5000) i")
    database = url.rsplit("/", 1)[1]
    terminated: list[int] = []

    def terminate_pg_dump_once_it_waits(holder: psycopg.Connection) -> None:
        # pg_dump waits on the lock held below: terminate its backend, then let the retry run.
        with psycopg.connect(pg.admin_url, autocommit=True) as admin:
            deadline = time.monotonic() + 120
            while not terminated and time.monotonic() < deadline:
                row = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
                    " AND query LIKE 'LOCK TABLE%%'", (database,)).fetchone()
                if row:
                    admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    terminated.append(row[0])
                else:
                    time.sleep(0.05)
        holder.rollback()

    holder = psycopg.connect(url)
    holder.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
    killer = threading.Thread(target=terminate_pg_dump_once_it_waits, args=(holder,))
    killer.start()
    try:
        backup = cli_json(capsys, "backup", "--db", url, "--repo", file_repo)
    finally:
        killer.join()
        holder.close()
    assert len(terminated) == 1
    assert backup["row_counts"] == {"public.readings": 5000}
    repo = open_repository(file_repo)
    assert [b.backup_id for b in list_backups(repo)] == [backup["backup_id"]]
    assert len([o for o in repo.list(f"{database}/") if o.key.endswith("dump.pgdr")]) == 1
    assert repo.incomplete_uploads("") == []


# --- what is transient: plain functions -----------------------------------------------------


def test_pg_dump_that_lost_its_server_is_transient_and_one_that_was_refused_is_not():
    lost = CommandError("pg_dump", 1, [
        'pg_dump: error: Dumping the contents of table "readings" failed: PQgetCopyData() failed.',
        "pg_dump: detail: Error message from server: FATAL:  terminating connection due to "
        "administrator command",
        "pg_dump: detail: Command was: COPY public.readings (id, value) TO stdout;"])
    denied = CommandError("pg_dump", 1, [
        "pg_dump: error: query failed: ERROR:  permission denied for table readings"])
    assert is_transient(lost) and not is_transient(denied)


def test_library_errors_are_judged_by_what_they_are_and_bugs_are_never_retried():
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    assert is_transient(TransientError("x")) and not is_transient(PgdrError("x"))
    assert not is_transient(KeyError("manifest"))
    assert is_transient(psycopg.errors.AdminShutdown("terminating connection"))
    assert is_transient(psycopg.OperationalError("consuming input failed: server closed the "
                                                 "connection unexpectedly"))
    assert not is_transient(psycopg.errors.InsufficientPrivilege("permission denied"))
    assert not is_transient(psycopg.OperationalError(
        'connection failed: FATAL:  password authentication failed for user "x"'))
    assert is_transient(EndpointConnectionError(endpoint_url="http://s3"))
    assert not is_transient(NoCredentialsError())
    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}},
                       "PutObject")
    bucket = ClientError({"Error": {"Code": "NoSuchBucket"},
                          "ResponseMetadata": {"HTTPStatusCode": 404}}, "PutObject")
    assert is_transient(slow) and not is_transient(bucket)
    assert transient_s3_error("", 500) and not transient_s3_error("InvalidArgument", 400)
    assert not transient_pg_message('FATAL:  database "nope" does not exist')


def test_a_step_given_an_s3_repository_computes_no_cache_key(capfd, s3_repo):
    """Flows hand their open Repository (a boto3 client inside) to their steps: Prefect
    must not try to hash it into a cache key (it cannot, and logs an error each time)."""
    from tasks.drill import write_report

    repo = open_repository(s3_repo)
    assert write_report(repo, "drills/x.json", {"ok": True}) == "drills/x.json"
    assert repo.get_bytes("drills/x.json")
    assert "cache key" not in capfd.readouterr().err
