"""Secrets stay secret where they could slip out sideways: flow-run parameters of subflows,
gpg-agent, the environment of child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

import boto3
import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterId, FlowRunFilter, FlowRunFilterStartTime

from flows.backup import backup
from flows.drill import drill
from flows.failover import failover
from flows.restore import restore
from pgdr.ops.errors import PgdrError
from pgdr.pipeline import crypto
from pgdr.postgres import dsn, postgres
from pgdr.storage import aws
from tests.support.cli import cli_json, error_line, run_cli
from tests.support.fake_pg_dump import broken_pg_bin
from tests.support.gpg import make_gpg_home
from tests.support.secrets import AWS_SECRET_ACCESS_KEY, PG_SECRET_PASSWORD, PG_SECRET_ROLE

NAME = "db.secrets-test.example.com"


def flow_runs_since(started: datetime) -> list[dict]:
    """Every flow run the Prefect server recorded since `started`, through its API
    (POST /api/flow_runs/filter), with its flow's name."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(
            after_=started)))
        flows = {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(
            any_=list({r.flow_id for r in runs}))))}
    return [{**r.model_dump(mode="json"), "flow_name": flows[r.flow_id]} for r in runs]


@pytest.fixture
def zone(s3) -> str:
    route53 = boto3.client("route53")
    zone_id = route53.create_hosted_zone(Name="secrets-test.example.com", CallerReference=uuid.uuid4().hex)[
        "HostedZone"]["Id"].split("/")[-1]
    aws.upsert_record(route53, aws.DnsRecord(zone_id, NAME, "CNAME", 300, "primary.example.com"), "primary")
    return zone_id


def test_no_password_reaches_any_flow_run_however_the_database_is_configured(
        pg, new_db, file_repo, zone, monkeypatch, secrets):
    source = new_db("secretsrc")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE vehicles AS SELECT g AS id FROM generate_series(1, 100) g")
    backup(db=source, repo=file_repo, tier="daily")
    dr_name, existing_name = f"dr_{uuid.uuid4().hex[:8]}", new_db("secretdst").rsplit("/", 1)[1]
    started = datetime.now(UTC)
    try:
        # DATABASE_URL with the password: failover -> restore; restore over an existing
        # database -> its pre-restore backup.
        monkeypatch.setenv("DATABASE_URL", pg.secret_url(dr_name))
        failover(zone_id=zone, record_name=NAME, record_value="localhost", repo=file_repo)
        # A password given in a parameter: the caller's own run holds it, its subflow (the
        # pre-restore backup of the database it replaces) does not.
        restore(target=pg.secret_url(existing_name), repo=file_repo)
        # The runbook's DB_* names: drill -> failover (dry run) -> restore.
        monkeypatch.delenv("DATABASE_URL")
        for name, value in {"DB_HOST": "127.0.0.1", "DB_PORT": str(pg.port), "DB_USER": PG_SECRET_ROLE,
                            "DB_PASSWORD": PG_SECRET_PASSWORD, "DB_NAME": "postgres"}.items():
            monkeypatch.setenv(name, value)
        database = source.rsplit("/", 1)[1]
        report = drill(repo=file_repo, db=database, failover={
            "zone_id": zone, "record_name": NAME, "record_value": "localhost", "db": database})
        assert report["ok"], report["problems"]
    finally:
        pg.drop_database(dr_name)

    runs = flow_runs_since(started)
    names = sorted(r["flow_name"] for r in runs)
    # The drill's failover is a dry run: it restores into a scratch database, not as a restore run.
    assert names == ["backup", "drill", "failover", "failover", "restore", "restore"], names
    assert all(r["state"]["type"] == "COMPLETED" for r in runs)
    [given] = [r for r in runs if r["flow_name"] == "restore" and r["parent_task_run_id"] is None]
    runs.remove(given)
    text = json.dumps(runs)
    assert PG_SECRET_ROLE in text  # the targets are there, as URLs without their password
    for secret in secrets:
        assert secret not in text, "a password reached a flow run's parameters"


# --- gpg-agent and the environment of children ----------------------------------------------


def _parent_of(pid: str) -> int | None:
    try:
        stat = Path("/proc", pid, "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def pgdr_children() -> dict[int, tuple[str, bytes]]:
    """(cmdline, environ) of every live descendant of this process, and of every gpg-agent
    of a private pgdr home (an agent leaves its parent when it starts)."""
    parents = {int(e.name): _parent_of(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()}
    found = {}
    for pid in parents:
        ancestor, mine = parents.get(pid), False
        while ancestor and not mine:
            mine, ancestor = ancestor == os.getpid(), parents.get(ancestor)
        try:
            cmdline = Path("/proc", str(pid), "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if mine or (crypto.PRIVATE_HOME_PREFIX in cmdline and "gpg-agent" in cmdline):
                found[pid] = (cmdline, Path("/proc", str(pid), "environ").read_bytes())
        except OSError:
            continue
    return found


@contextmanager
def watching_children() -> Iterator[dict[int, tuple[str, bytes]]]:
    seen: dict[int, tuple[str, bytes]] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(pgdr_children())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join()


def gpg_agents(homedir: str) -> list[str]:
    """Running gpg-agents of pgdr's runs (private homes, or this process's children) or of
    the keyring `homedir`."""
    agents = [cmd for cmd, _ in pgdr_children().values() if "gpg-agent" in cmd]
    for entry in Path("/proc").iterdir():
        with suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if entry.name.isdigit() and "gpg-agent" in cmdline and homedir in cmdline:
                agents.append(cmdline)
    return agents


def test_children_get_no_secret_in_their_environment(capsys, pg, new_db, file_repo, gpg, secrets, tmp_path,
                                                     monkeypatch):
    db = new_db("childenv")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
    # Every secret pgdr may hold, in pgdr's environment.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET_ACCESS_KEY)
    monkeypatch.setenv("PGDR_GPG_PASSPHRASE", gpg.passphrase)
    monkeypatch.setenv("PGPASSWORD", PG_SECRET_PASSWORD)
    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    # pg_dump pauses after its first bytes: every child of the backup is alive meanwhile.
    monkeypatch.setenv("PGDR_PG_BIN", str(broken_pg_bin(tmp_path / "bin", limit=1, then="pause")))
    with watching_children() as seen:
        made = cli_json(capsys, "backup", "--db", pg.secret_url(db.rsplit("/", 1)[1]), "--repo", file_repo,
                        "--encrypt-to", gpg.protected_fingerprint)
        cli_json(capsys, "restore-temp", made["backup_id"], "--repo", file_repo, "--server", pg.admin_url)

    # pgdr's own child is the wrapper script standing for pg_dump (python <bin>/pg_dump ...):
    # its environment is the one pgdr chose; the real pg_dump below it may end at once.
    programs = {Path(cmd.split()[1] if Path(cmd.split()[0]).name.startswith("python") and len(cmd.split()) > 1
                     else cmd.split()[0]).name for cmd, _ in seen.values() if cmd}
    assert {"pg_dump", "zstd", "gpg"} <= programs, programs
    for cmdline, environ in seen.values():
        names = {line.split(b"=", 1)[0].decode() for line in environ.split(b"\0") if line}
        assert not names & {"AWS_SECRET_ACCESS_KEY", "PGDR_GPG_PASSPHRASE", "PGPASSWORD"}, cmdline
        for secret in secrets:
            assert secret.encode() not in environ, f"a secret in the environment of {cmdline}"


def test_only_the_given_passphrase_decrypts_and_no_agent_stays(capsys, pg, new_db, file_repo, monkeypatch):
    # An operator's keyring, with gpg-agent's default caching (10 minutes).
    keyring = make_gpg_home()
    try:
        Path(keyring.homedir, "gpg-agent.conf").write_text("allow-loopback-pinentry\n")
        subprocess.run(["gpgconf", "--homedir", keyring.homedir, "--kill", "all"], check=True)
        db = new_db("agent")
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) g")
        monkeypatch.setenv("PGDR_GNUPGHOME", keyring.homedir)
        made = cli_json(capsys, "backup", "--db", db, "--repo", file_repo, "--encrypt-to",
                        keyring.protected_fingerprint)
        restore_temp = ["restore-temp", made["backup_id"], "--repo", file_repo, "--server", pg.admin_url]

        monkeypatch.setenv("PGDR_GPG_PASSPHRASE", keyring.passphrase)
        assert cli_json(capsys, *restore_temp)["verified"] is True
        monkeypatch.setenv("PGDR_GPG_PASSPHRASE", "wrong-" + keyring.passphrase)
        code, _, err = run_cli(capsys, *restore_temp)
        assert code == 1 and "gpg" in error_line(err), err
        monkeypatch.delenv("PGDR_GPG_PASSPHRASE")
        code, _, err = run_cli(capsys, *restore_temp)
        assert code == 1 and "gpg" in error_line(err), err
        assert gpg_agents(keyring.homedir) == []
        assert not [home for home in Path("/tmp").glob(crypto.PRIVATE_HOME_PREFIX + "*") if home.is_dir()]
    finally:
        keyring.close()


def test_a_run_handed_a_url_without_password_finds_the_configured_one(pg, monkeypatch):
    """A subflow or a run on a worker gets the target without its password: it comes from
    DATABASE_URL (or DB_PASSWORD) where the connection is made."""
    bare = pg.cluster.url("postgres", user=PG_SECRET_ROLE)
    monkeypatch.setattr(dsn, "_PASSWORDS", {})  # nothing remembered from a URL in this process
    monkeypatch.delenv("DB_PASSWORD", raising=False)
    monkeypatch.setenv("DATABASE_URL", pg.secret_url("postgres"))
    with postgres.connect(bare) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (PG_SECRET_ROLE,)
    monkeypatch.setenv("DATABASE_URL", pg.cluster.url("postgres", user=PG_SECRET_ROLE, password="wrong"))
    with pytest.raises(PgdrError, match="password authentication failed"):
        postgres.connect(bare)
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("DB_PASSWORD", PG_SECRET_PASSWORD)
    with postgres.connect(bare) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (PG_SECRET_ROLE,)


def test_the_agent_of_a_killed_run_is_stopped_when_the_next_one_starts(gpg):
    started = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, time
from pgdr.pipeline import crypto
with crypto.private_home({gpg.homedir!r}) as home:
    subprocess.run(["gpg-connect-agent", "--homedir", home, "/bye"], check=True, capture_output=True)
    print(home, flush=True)
    time.sleep(120)
"""], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        home = started.stdout.readline().strip()
        assert home and gpg_agents(home), "the run's agent did not start"
    finally:
        started.kill()
        started.wait()
    assert Path(home).is_dir() and gpg_agents(home)  # what a kill leaves behind

    with crypto.private_home(gpg.homedir) as fresh:
        assert Path(fresh).is_dir()
    assert not Path(home).exists()
    deadline = time.monotonic() + 10
    while gpg_agents(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gpg_agents(home) == []


def test_fleet_children_get_urls_without_password(pg, secrets):
    from flows.fleet import _child_parameters
    from pgdr.dr.fleet import Member

    member = Member.of(pg.secret_url("fleet"))
    for action in ("backup", "verify"):
        parameters = json.dumps(_child_parameters(action, member, None, "daily", pg.secret_url("postgres")))
        assert PG_SECRET_ROLE in parameters
        assert not [secret for secret in secrets if secret in parameters], action
