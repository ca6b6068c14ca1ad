"""Everything one benchmark run shares: a throwaway PostgreSQL cluster with the sample
fleet database, an S3 endpoint (moto over HTTP on 127.0.0.1), a gpg home with a key, a
local Prefect server, and the environment the measured commands run in."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench import pgbackrest
from bench.archiving import LOAD_DB
from pgdr.demo.sample_data import create_fleet_database
from pgdr.postgres.cluster import LocalCluster, free_port
from tests.support.gpg import GpgHome, make_gpg_home

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "pgdr-bench"
SOURCE_DB = "fleet"
EMPTY_DB = "empty"
PREFECT_START_SECONDS = 300
# Anything that could point a measured command at another account, server or config.
_LEAKS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
          "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_REGION", "PREFECT_API_URL",
          "PREFECT_API_KEY", "PREFECT_PROFILES_PATH", "DATABASE_URL", "PGDR_REPO", "PGDATABASE",
          "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "GNUPGHOME")


@dataclass
class BenchEnvironment:
    work: Path
    cluster: LocalCluster
    s3_endpoint: str
    gpg: GpgHome
    prefect_api_url: str
    pgbackrest: pgbackrest.PgBackRest
    base_env: dict[str, str] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def s3(self) -> Any:
        return admin_s3(self.s3_endpoint, self.base_env)

    def url(self, dbname: str) -> str:
        return self.cluster.url(dbname)

    @property
    def repo_url(self) -> str:
        return f"s3://{BUCKET}/pgdr"

    @property
    def file_repo(self) -> Path:
        return self.work / "file-repo"

    @property
    def file_repo_url(self) -> str:
        return self.file_repo.as_uri()

    def env(self, *, prefect_server: bool = True, gpg: bool = False) -> dict[str, str]:
        """The environment of a measured command. Without prefect_server, a pgdr command
        starts its own temporary Prefect server, as it would on a machine without one."""
        env = dict(self.base_env)
        if prefect_server:
            env["PREFECT_API_URL"] = self.prefect_api_url
        else:
            # Its own home: a temporary server must not share the running one's SQLite file.
            env["PREFECT_HOME"] = str(self.work / "prefect-ephemeral")
            # Its default (20 s) is too short on a busy machine: measure, do not fail.
            env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
        if gpg:
            env["PGDR_GNUPGHOME"] = self.gpg.homedir
        return env


def admin_s3(endpoint: str, env: dict[str, str]) -> Any:
    """An S3 client for the bench's own set-up and clean-up on its moto endpoint (not
    measured, so not pgdr's client)."""
    import boto3

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _base_env(work: Path, s3_endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LEAKS and not k.startswith("PGDR_")}
    env.update(
        AWS_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",  # noqa: S106 - moto accepts anything
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        PREFECT_HOME=str(work / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    return env


@contextlib.contextmanager
def _moto() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def _prefect_server(env: dict[str, str], logs: Path) -> Iterator[str]:
    """`prefect server start` on a free port; yields its API URL once it answers."""
    port = free_port()
    prefect = Path(sys.executable).with_name("prefect")
    with open(logs / "prefect-server.log", "wb") as log:
        proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + PREFECT_START_SECONDS
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}; see {logs}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{api}/health", timeout=5) as response:  # noqa: S310
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not answer within {PREFECT_START_SECONDS} s")
            time.sleep(1)
        yield api
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def bench_environment(size_mb: int, cores: int) -> Iterator[BenchEnvironment]:

    with contextlib.ExitStack() as stack:
        # Under /tmp and short: the cluster's Unix socket and gpg-agent's live inside it.
        work = Path(tempfile.mkdtemp(prefix="pgdr-bench-", dir="/tmp"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        (work / "logs").mkdir()
        say(f"work directory {work}")
        cluster = stack.enter_context(LocalCluster.create(work / "pg", settings=pgbackrest.CLUSTER_SETTINGS))
        say(f"building the {size_mb} MB sample fleet database (PostgreSQL on port {cluster.port})")
        create_fleet_database(cluster.url(), SOURCE_DB, size_mb)
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            for name in (EMPTY_DB, LOAD_DB):
                conn.execute(f"CREATE DATABASE {name}")
        endpoint = stack.enter_context(_moto())
        base_env = _base_env(work, endpoint)
        admin_s3(endpoint, base_env).create_bucket(Bucket=BUCKET)
        say("configuring a pgBackRest stanza on that cluster")
        rest = pgbackrest.configure(work, cluster, cores)
        gpg = make_gpg_home()
        stack.callback(gpg.close)
        # pgdr's bytecode, as an installation has it (pip compiles it): a wal-push run by the
        # archiver, which cannot write the checkout's __pycache__, would otherwise compile
        # pgdr's modules on every segment (~0.04 CPU s; also under PYTHONDONTWRITEBYTECODE).
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "flows"), str(ROOT / "tasks")],
                       check=True, stdout=subprocess.DEVNULL)
        say("starting a local Prefect server")
        api = stack.enter_context(_prefect_server(base_env, work / "logs"))
        yield BenchEnvironment(work, cluster, endpoint, gpg, api, rest, base_env)


def say(message: str) -> None:
    """A progress line on stderr: the benchmark takes minutes."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
