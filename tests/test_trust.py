"""Which backup `latest` is, which backups are good, and what a failure says: on real
PostgreSQL, a local repository, real gpg."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import psycopg
import pytest

from pgdr.catalog import catalog, verification
from pgdr.catalog.index import resolve_backup
from pgdr.catalog.scan import find_backup, list_backups
from pgdr.ops.errors import NotFoundError
from pgdr.pipeline.process import CommandError, quoted_lines, run
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.db import table_fingerprints
from tests.test_prune import fake_backup


def make_live_database(new_db, rows: int = 300) -> str:
    url = new_db("live")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        conn.execute(f"INSERT INTO orders SELECT i, 'original' FROM generate_series(1, {rows}) i")
    return url


def damage_everything(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM orders WHERE id % 2 = 0")
        conn.execute("UPDATE orders SET note = 'damaged'")


# --- `latest`: the newest complete backup of the regular tiers -------------------------------


def test_latest_is_never_a_safety_copy_nor_a_damaged_backup(capsys, file_repo):
    repo = open_repository(file_repo)
    now = catalog.utcnow()
    daily = fake_backup(repo, "fleet", "daily", now - timedelta(hours=3))
    safety = fake_backup(repo, "fleet", "pre-restore", now - timedelta(hours=1))
    broken = fake_backup(repo, "fleet", "manual", now - timedelta(minutes=30))
    repo.put_bytes(broken.manifest_key, b'{"backup_id": "20260101T000000Z-manual-ab')  # cut short

    assert resolve_backup(repo, "latest").backup_id == daily.backup_id
    assert resolve_backup(repo, safety.backup_id).backup_id == safety.backup_id  # by id: yes
    with pytest.raises(catalog.ConfigError, match=broken.manifest_key):
        resolve_backup(repo, broken.backup_id)

    listed = cli_json(capsys, "list", "--repo", file_repo)
    assert [(b["backup_id"], b["safety_copy"]) for b in listed["backups"]] == [
        (daily.backup_id, False), (safety.backup_id, True)]
    (damaged,) = listed["damaged"]
    assert damaged["key"] == broken.manifest_key and damaged["backup_id"] == broken.backup_id
    code, out, _ = run_cli(capsys, "list", "--repo", file_repo)
    assert code == 0 and "safety copy" in out and f"DAMAGED {broken.backup_id}" in out

    (status,) = cli_json(capsys, "status", "--repo", file_repo)["databases"]
    assert status["last_backup"] == daily.backup_id
    assert [d["key"] for d in status["damaged"]] == [broken.manifest_key]

    only_safety = fake_backup(repo, "solo", "pre-restore", now)
    with pytest.raises(NotFoundError, match="other than safety copies"):
        resolve_backup(repo, "latest", "solo")
    assert resolve_backup(repo, only_safety.backup_id, "solo").tier == "pre-restore"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_after_a_restore_over_a_live_database_latest_is_the_restored_backup(how, capsys, pg, new_db,
                                                                           file_repo, gpg, monkeypatch):
    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    live = make_live_database(new_db)
    good = table_fingerprints(live)
    backup = cli_json(capsys, "backup", "--db", live, "--repo", file_repo, "--tier", "daily")
    damage_everything(live)
    encrypt = ["--encrypt-to", gpg.fingerprint] if how == "flag" else []
    if how == "environment":
        monkeypatch.setenv("PGDR_ENCRYPT_TO", gpg.fingerprint)

    restored = cli_json(capsys, "restore", backup["backup_id"], "--target", live, "--repo", file_repo,
                        *encrypt)
    try:
        repo = open_repository(file_repo)
        (safety,) = [m for m in list_backups(repo) if m.tier == "pre-restore"]
        # The safety copy holds production data: encrypted like the run asked.
        assert safety.encryption == {"type": "gpg", "recipient_fingerprint": gpg.fingerprint}

        again = new_db("again")
        pg.drop_database(again.rsplit("/", 1)[1])
        result = cli_json(capsys, "restore", "latest", "--target", again, "--repo", file_repo)
        assert result["backup_id"] == backup["backup_id"] != safety.backup_id
        assert table_fingerprints(again) == good
        temp = cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg.url())
        assert temp["backup_id"] == backup["backup_id"]
        checked = cli_json(capsys, "verify", "--repo", file_repo, "--server", pg.url())
        assert [d["backup_id"] for d in checked["databases"]] == [backup["backup_id"]]
    finally:
        pg.drop_database(restored["previous_database"])


def test_a_safety_copy_is_encrypted_like_the_backup_it_replaces_by_default(capsys, pg, new_db, file_repo,
                                                                           gpg, monkeypatch):
    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    monkeypatch.delenv("PGDR_ENCRYPT_TO", raising=False)
    live = make_live_database(new_db, rows=10)
    backup = cli_json(capsys, "backup", "--db", live, "--repo", file_repo, "--encrypt-to", gpg.fingerprint)
    restored = cli_json(capsys, "restore", backup["backup_id"], "--target", live, "--repo", file_repo)
    pg.drop_database(restored["previous_database"])
    (safety,) = [m for m in list_backups(open_repository(file_repo)) if m.tier == "pre-restore"]
    assert safety.encryption == {"type": "gpg", "recipient_fingerprint": gpg.fingerprint}


# --- verification is a fact of each backup ---------------------------------------------------


def test_a_failed_verification_is_recorded_and_counts_for_status_and_prune(capsys, pg, new_db, file_repo):
    from tests.test_restore import corrupt

    live = make_live_database(new_db, rows=50)
    older = cli_json(capsys, "backup", "--db", live, "--repo", file_repo, "--tier", "daily")
    newer = cli_json(capsys, "backup", "--db", live, "--repo", file_repo, "--tier", "daily")
    for each in (older, newer):
        cli_json(capsys, "restore-temp", each["backup_id"], "--repo", file_repo, "--server", pg.url())
    repo = open_repository(file_repo)
    manifest = find_backup(repo, newer["backup_id"])
    corrupt(file_repo, manifest, "flip")

    code, out, err = run_cli(capsys, "verify", "--repo", file_repo, "--server", pg.url(), "--json")
    assert code == 1 and "corrupt" in error_line(err) and json.loads(out)["ok"] is False
    history = verification.read_verification(repo, manifest)
    assert history["verified"] is False and "corrupt" in history["reason"]
    assert [r["success"] for r in history["results"]] == [True, False]

    (status,) = cli_json(capsys, "status", "--repo", file_repo)["databases"]
    assert status["last_backup"] == newer["backup_id"]
    assert (status["last_backup_state"], status["verified"]) == ("failed", False)
    assert "corrupt" in status["last_backup_reason"]
    assert status["verified_backup"] == older["backup_id"]  # the newest one that still passes
    code, text, _ = run_cli(capsys, "status", "--repo", file_repo)
    assert "FAILED" in text and older["backup_id"] in text

    rows = {r["backup_id"]: r for r in cli_json(capsys, "prune", "--repo", file_repo, "--dry-run")["backups"]}
    assert rows[newer["backup_id"]]["verified"] is False
    assert "verified #" not in rows[newer["backup_id"]]["reason"]
    assert "verified #1" in rows[older["backup_id"]]["reason"]


def test_a_damaged_manifest_fails_verify_naming_its_key_and_hides_nothing(capsys, pg, new_db, file_repo):
    live = make_live_database(new_db, rows=20)
    good = cli_json(capsys, "backup", "--db", live, "--repo", file_repo)
    bad = cli_json(capsys, "backup", "--db", live, "--repo", file_repo)
    repo = open_repository(file_repo)
    key = find_backup(repo, bad["backup_id"]).manifest_key
    repo.put_bytes(key, b"\x00not json")

    listed = cli_json(capsys, "list", "--repo", file_repo)
    assert [b["backup_id"] for b in listed["backups"]] == [good["backup_id"]]
    assert [d["key"] for d in listed["damaged"]] == [key]
    temp = cli_json(capsys, "restore-temp", "latest", "--repo", file_repo, "--server", pg.url())
    assert temp["backup_id"] == good["backup_id"]
    code, out, err = run_cli(capsys, "verify", "--repo", file_repo, "--server", pg.url(), "--json")
    assert code == 1 and key in error_line(err)
    (entry,) = json.loads(out)["databases"]
    assert entry["backup_id"] == good["backup_id"] and entry["damaged"] == [key]


# --- a failing child process says why ---------------------------------------------------------


def test_a_failure_quotes_every_distinct_error_line_without_secrets():
    script = ("echo 'gpg: encrypted with rsa3072 key' >&2; echo 'gpg: public key decryption failed: "
              "Bad passphrase (hunter22)' >&2; echo 'gpg: decryption failed: No secret key' >&2; "
              "echo 'gpg: decryption failed: No secret key' >&2; exit 2")
    with pytest.raises(CommandError) as caught:
        run(["sh", "-c", script], secrets=["hunter22"])
    message = str(caught.value)
    assert "Bad passphrase" in message and "No secret key" in message and "hunter22" not in message
    assert message.count("No secret key") == 1 and "\n" not in message

    noise = [f"progress line {i}" for i in range(40)]
    quoted = quoted_lines(["pg_restore: error: role \"ghost\" does not exist", *noise,
                           "pg_restore: error: a worker process died unexpectedly"])
    assert quoted == ["pg_restore: error: role \"ghost\" does not exist",
                      "pg_restore: error: a worker process died unexpectedly"]
    assert len(quoted_lines([f"error {i}" for i in range(50)])) == 10


def test_a_wrong_passphrase_is_named_as_such(capsys, new_db, file_repo, gpg, monkeypatch):
    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    live = make_live_database(new_db, rows=10)
    backup = cli_json(capsys, "backup", "--db", live, "--repo", file_repo,
                      "--encrypt-to", gpg.protected_fingerprint)
    monkeypatch.setenv("PGDR_GPG_PASSPHRASE", "not-the-passphrase")
    code, _out, err = run_cli(capsys, "restore", backup["backup_id"], "--target", live, "--repo", file_repo,
                              "--no-pre-restore-backup")
    line = error_line(err)
    assert code == 1 and "Bad passphrase" in line and "not-the-passphrase" not in err
    # A wrong passphrase says nothing about the backup: it is not recorded as failed.
    repo = open_repository(file_repo)
    assert verification.read_verification(repo, find_backup(repo, backup["backup_id"])) is None


# --- safety databases have a lifetime ---------------------------------------------------------


def set_aside(pg, of: str, role: str, days_ago: float) -> str:
    """A database as a restore (pre-restore) or a rollback (rolled-back) leaves it."""
    at = catalog.utcnow() - timedelta(days=days_ago)
    name = f"{of}_{role.replace('-', '_')}_{at:%Y%m%dT%H%M%S}"
    pg.create_database(name)
    tag_database(pg, name, {"pgdr": role, "of": of, "at": catalog.iso(at)})
    return name


def tag_database(pg, name: str, tag: dict) -> None:
    from psycopg import sql

    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(name), sql.Literal(json.dumps(tag))))


def test_prune_drops_old_safety_databases_but_the_newest_per_target(capsys, pg, new_db, file_repo,
                                                                     monkeypatch):
    monkeypatch.setenv("PGDR_KEEP_SAFETY_DATABASES_DAYS", "7")
    live = new_db("prod")
    of = live.rsplit("/", 1)[1]
    # After a rollback the live database carries the tag of the copy it was: never a candidate.
    tag_database(pg, of, {"pgdr": "pre-restore", "of": of, "at": "2020-01-01T00:00:00Z"})
    newest = set_aside(pg, of, "pre-restore", 20)
    old = set_aside(pg, of, "pre-restore", 30)
    recent = set_aside(pg, of, "rolled-back", 40)
    in_use = set_aside(pg, of, "rolled-back", 50)
    young = set_aside(pg, of, "rolled-back", 45)
    pg.drop_database(young)
    young = set_aside(pg, of, "pre-restore", 2)  # now the newest pre-restore copy
    reader = psycopg.connect(pg.url(in_use))
    try:
        dry = cli_json(capsys, "prune", "--repo", file_repo, "--db", of, "--server", pg.url(), "--dry-run")
        planned = {r["backup_id"]: r["action"] for r in dry["backups"] if r["area"] == "safety-database"}
        assert planned == {young: "keep", newest: "would drop", old: "would drop", recent: "keep",
                           in_use: "would drop"}
        assert all(datname in list_databases(pg) for datname in planned)

        code, out, _err = run_cli(capsys, "prune", "--repo", file_repo, "--db", of, "--server", pg.url(),
                                  "--json")
        done = {r["backup_id"]: r for r in json.loads(out)["backups"] if r["area"] == "safety-database"}
        assert code == 1  # one could not be dropped: it is in use
        assert {name: r["action"] for name, r in done.items()} == {
            young: "keep", newest: "dropped", old: "dropped", recent: "keep", in_use: "failed"}
        assert "past the 7 d" in done[old]["reason"] and "newest pre-restore" in done[young]["reason"]
    finally:
        reader.close()
    left = list_databases(pg)
    assert of in left and {young, recent, in_use} <= left and not {newest, old} & left
    repo = open_repository(file_repo)
    audits = [json.loads(repo.get_bytes(o.key)) for o in repo.list("audit/") if "-prune-" in o.key]
    assert sorted(audits[-1]["details"]["dropped_databases"]) == sorted([newest, old])

    status = cli_json(capsys, "status", "--repo", file_repo, "--db", of, "--server", pg.url())
    assert {d["name"] for d in status["safety_databases"]["databases"]} == {young, recent, in_use}
    # An unreachable server: the repository is still pruned, the report says what was not done.
    code, out, _err = run_cli(capsys, "prune", "--repo", file_repo, "--server",
                              "postgresql://postgres@127.0.0.1:1/postgres", "--json")
    (row,) = [r for r in json.loads(out)["backups"] if r["area"] == "safety-database"]
    assert code == 1 and row["action"] == "failed" and "not checked" in row["reason"]
    for name in (young, recent, in_use):
        pg.drop_database(name)


def list_databases(pg) -> set[str]:
    with psycopg.connect(pg.admin_url) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


# --- archive storage classes ------------------------------------------------------------------


def archive(repo_url: str, manifest: catalog.Manifest, storage_class: str) -> str:
    """Move a backup's dump to an archive class, as init-repo's lifecycle would."""
    import boto3

    repo = open_repository(repo_url)
    key = repo._key(f"{manifest.prefix}/{manifest.data_key}")
    boto3.client("s3").copy_object(Bucket=repo.bucket, Key=key, StorageClass=storage_class,
                                   CopySource={"Bucket": repo.bucket, "Key": key}, MetadataDirective="COPY")
    return key


def test_an_archived_dump_is_shown_requested_back_and_then_restored(capsys, pg, new_db, s3_repo):
    import boto3

    live = make_live_database(new_db, rows=30)
    backup = cli_json(capsys, "backup", "--db", live, "--repo", s3_repo, "--tier", "monthly")
    manifest = find_backup(open_repository(s3_repo), backup["backup_id"])
    key = archive(s3_repo, manifest, "DEEP_ARCHIVE")

    (listed,) = cli_json(capsys, "list", "--repo", s3_repo)["backups"]
    assert listed["storage_class"] == "DEEP_ARCHIVE"
    (status,) = cli_json(capsys, "status", "--repo", s3_repo)["databases"]
    assert status["storage_class"] == "DEEP_ARCHIVE"

    code, out, err = run_cli(capsys, "restore-temp", "latest", "--repo", s3_repo, "--server", pg.url(),
                             "--no-wait")
    assert code == 3 and out == "" and "run the same command again after" in error_line(err)
    bucket = s3_repo.split("/")[2]
    assert "Restore" in boto3.client("s3").head_object(Bucket=bucket, Key=key)  # S3 is bringing it back
    # Nothing was recorded against the backup: it is not damaged, only archived.
    assert verification.read_verification(open_repository(s3_repo), manifest) is None

    restored = cli_json(capsys, "restore-temp", "latest", "--repo", s3_repo, "--server", pg.url())
    assert restored["backup_id"] == backup["backup_id"] and restored["verified"] is True


def test_waiting_for_an_archived_object_reports_progress(s3, s3_repo):
    import httpx

    from pgdr.ops.errors import NotReadyYet
    from pgdr.restore import staging

    repo = open_repository(s3_repo)
    repo.put_bytes("fleet/x/archived", b"old bytes", storage_class="GLACIER")
    assert repo.archive_state("fleet/x/archived") == ("GLACIER", "archived")

    def transition(path: str, body: dict) -> None:
        httpx.post(f"{s3}/moto-api/state-manager/{path}", json=body).raise_for_status()

    # moto's restore takes one second from the first look after a second (before that first
    # look it reports the copy as there: give it that second).
    transition("set-transition", {"model_name": "s3::keyrestore",
                                  "transition": {"progression": "time", "seconds": 1}})
    time.sleep(1.1)
    try:
        with pytest.raises(NotReadyYet, match="typically 5 h"):
            staging.wait_until_readable(repo, "fleet/x/archived", wait_hours=1, wait=False, report=print)
        with pytest.raises(NotReadyYet, match="still being restored"):
            staging.wait_until_readable(repo, "fleet/x/archived", wait_hours=0, wait=True, report=print)
        seen: list[str] = []
        storage_class = staging.wait_until_readable(repo, "fleet/x/archived", wait_hours=1, wait=True,
                                                      report=seen.append, poll_seconds=0.01)
    finally:
        transition("unset-transition", {"model_name": "s3::keyrestore"})
    assert storage_class == "GLACIER" and repo.get_bytes("fleet/x/archived") == b"old bytes"
    assert any("so far" in line for line in seen) and "readable again" in seen[-1]


def test_init_repo_denies_non_tls_only_on_tls_endpoints():
    import boto3

    from pgdr.storage.bucket import is_plain_http, transitions
    from pgdr.storage.s3repo import S3Repository

    tls = S3Repository("b", "p", client=boto3.client("s3", endpoint_url="https://s3.example.test",
                                                     region_name="us-east-1"))
    plain = S3Repository("b", "p", client=boto3.client("s3", endpoint_url="http://minio.local:9000",
                                                       region_name="us-east-1"))
    assert (is_plain_http(tls), is_plain_http(plain)) == (False, True)
    assert transitions(None) == [{"Days": 30, "StorageClass": "STANDARD_IA"}]
    assert transitions(20) == [{"Days": 20, "StorageClass": "GLACIER"}]
