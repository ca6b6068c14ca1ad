"""A throwaway local PostgreSQL server: initdb, start, stop, remove.

Used by the test suite, the demo and the benchmark to get a private server, and by the
PITR flow to start PostgreSQL on a restored data directory. It imports no Prefect so
that it stays usable from plain scripts and from `pgdr` commands that must start fast.

PostgreSQL refuses to run as root. When this process is root, every server binary
(initdb, pg_ctl, postgres) runs as the `postgres` OS user through `runuser`, and the
directories it needs are handed to that user.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import psycopg
from psycopg import sql

from pgdr.ops.errors import PgdrError
from pgdr.postgres.programs import PG_BIN_ENV, pg_bin

SERVER_USER = "postgres"
HOST = "127.0.0.1"
# The kernel limit on a Unix socket path (sun_path) is 108 bytes including the NUL.
_MAX_SOCKET_PATH = 107

# Small and quick, but durable: fsync stays on so crash/PITR behaviour is real.
DEFAULT_SETTINGS: dict[str, str] = {
    "max_connections": "100",
    "shared_buffers": "32MB",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}


class ClusterError(PgdrError):
    """A local PostgreSQL server could not be created, started or stopped.

    The message is one line that ends with the last lines of the server log;
    `log_tail` keeps them as they were, for a report or an artifact.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
        super().__init__(" | ".join([message, *lines[-5:]]))
        self.log_tail = log_tail


def find_bin_dir() -> Path:
    """The PostgreSQL server binaries: $PGDR_PG_BIN, else the newest /usr/lib/postgresql/N/bin."""
    pg_ctl = Path(pg_bin("pg_ctl"))
    if not pg_ctl.is_file():
        raise ClusterError(
            f"no PostgreSQL server binaries ({pg_ctl}): install the postgresql package "
            f"or set {PG_BIN_ENV}"
        )
    return pg_ctl.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _server_user_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(SERVER_USER)
    return entry.pw_uid, entry.pw_gid


def _hand_over(path: Path, *, recursive: bool = False) -> None:
    """Give `path` to the postgres OS user (root only) so the server can use it."""
    uid, gid = _server_user_ids()
    os.chown(path, uid, gid)
    if recursive and path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, gid)


def _make_traversable(path: Path) -> None:
    """Add search (not read) permission for others on each ancestor of `path`.

    mkdtemp and pytest create 0700 directories owned by root; the postgres user
    must still be able to reach the data directory below them.
    """
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def grant_to_server(path: Path, *, recursive: bool = True) -> None:
    """Let the server's OS user own `path` and reach it; a no-op unless we are root.

    Needed for anything the server itself touches: its data directory and log, and
    whatever its archive_command or restore_command writes to or reads from.
    """
    if _running_as_root():
        _make_traversable(path)
        _hand_over(path, recursive=recursive)


def _conf_value(value: str) -> str:
    # Quoting every value is valid for every setting type and keeps spaces and
    # quotes (archive_command) intact.
    return "'" + value.replace("'", "''") + "'"


def _hba_role(name: str) -> str:
    if '"' in name or "\n" in name:
        raise ClusterError(f"unsupported role name for pg_hba.conf: {name!r}")
    return f'"{name}"'


class LocalCluster:
    """One PostgreSQL server on 127.0.0.1, owned by this process.

    `LocalCluster.create()` makes a new one; `LocalCluster(datadir, port)` drives an
    existing data directory (e.g. one restored by the PITR flow). Port, listen address
    and socket directory are given on the server's command line, so they override
    whatever the data directory's postgresql.conf says.
    """

    def __init__(
        self,
        datadir: Path,
        port: int,
        *,
        log_path: Path | None = None,
        socket_dir: Path | None = None,
        bin_dir: Path | None = None,
    ) -> None:
        self.datadir = Path(datadir)
        self.port = port
        self.log_path = log_path or self.datadir.with_name(self.datadir.name + ".log")
        # None: TCP only. A restored data directory has no socket directory of its own.
        self.socket_dir = socket_dir
        self.bin_dir = bin_dir or find_bin_dir()
        # Set by create(): the directory that holds everything and is removed by destroy().
        self.base_dir: Path | None = None

    @classmethod
    def create(
        cls,
        base_dir: Path,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        password_roles: dict[str, str] | None = None,
        bin_dir: Path | None = None,
    ) -> LocalCluster:
        """initdb a new cluster in `base_dir`, start it, and create `password_roles`.

        Roles in `password_roles` log in with scram-sha-256 over TCP; every other
        connection is trusted. `settings` are appended to postgresql.conf.
        """
        base_dir = Path(base_dir).resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        socket_dir = base_dir / "sock"
        socket_dir.mkdir(exist_ok=True)
        port = port or free_port()
        unix_socket: Path | None = socket_dir
        if len(f"{socket_dir}/.s.PGSQL.{port}") > _MAX_SOCKET_PATH:
            socket_dir.rmdir()
            unix_socket = None  # path too long for a Unix socket: TCP only
        cluster = cls(
            base_dir / "data", port, log_path=base_dir / "server.log", socket_dir=unix_socket,
            bin_dir=bin_dir,
        )
        cluster.base_dir = base_dir
        grant_to_server(base_dir)
        base_dir.chmod(0o700)
        try:
            cluster._initdb({**DEFAULT_SETTINGS, **(settings or {})}, password_roles or {})
            cluster.start()
            cluster._create_roles(password_roles or {})
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def url(
        self, dbname: str = "postgres", user: str = "postgres", password: str | None = None
    ) -> str:
        """A libpq URL for this server over TCP, with every part percent-encoded."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{HOST}:{self.port}/{quote(dbname, safe='')}"

    def is_running(self) -> bool:
        """True when a postmaster is running on this data directory."""
        result = self._run(["pg_ctl", "status", "-D", str(self.datadir)])
        return result.returncode == 0

    def start(self, timeout: int = 60) -> None:
        """Start the server and wait until it accepts connections."""
        if _running_as_root():
            # A restored data directory arrives owned by root: hand it over once.
            foreign = self.datadir.stat().st_uid != _server_user_ids()[0]
            grant_to_server(self.datadir, recursive=foreign)
            # pg_ctl appends to the log as postgres, whatever the parent dir's owner.
            self.log_path.touch()
            grant_to_server(self.log_path)
        # PostgreSQL refuses a data directory that group/others can enter.
        self.datadir.chmod(0o700)
        # pg_ctl passes -o through a shell, hence shlex.quote.
        options = [f"-p {self.port}", f"-c listen_addresses={HOST}"]
        socket_dir = str(self.socket_dir) if self.socket_dir else ""
        options.append(f"-c unix_socket_directories={shlex.quote(socket_dir)}")
        result = self._run(
            [
                "pg_ctl", "start", "-D", str(self.datadir), "-l", str(self.log_path),
                "-w", "-t", str(timeout), "-o", " ".join(options),
            ]
        )
        if result.returncode != 0:
            raise self._failure("could not start PostgreSQL", result)

    def stop(self, mode: str = "fast", timeout: int = 60) -> None:
        """Stop the server (`fast`, `smart` or `immediate`); a stopped server is left alone."""
        if not self.is_running():
            return
        result = self._run(
            ["pg_ctl", "stop", "-D", str(self.datadir), "-m", mode, "-w", "-t", str(timeout)]
        )
        if result.returncode != 0:
            raise self._failure("could not stop PostgreSQL", result)

    def destroy(self) -> None:
        """Stop the server and remove its files."""
        try:
            if self.datadir.exists():
                self.stop()
        finally:
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            else:
                shutil.rmtree(self.datadir, ignore_errors=True)
                self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"LocalCluster(datadir={str(self.datadir)!r}, port={self.port})"

    def _initdb(self, settings: dict[str, str], password_roles: dict[str, str]) -> None:
        result = self._run(
            [
                "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions",
            ]
        )
        if result.returncode != 0:
            raise ClusterError(f"initdb failed in {self.datadir}", result.stdout + result.stderr)
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# pgdr LocalCluster\n")
            for name, value in settings.items():
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
                    raise ClusterError(f"invalid setting name: {name!r}")
                conf.write(f"{name} = {_conf_value(value)}\n")
        # First match wins: password roles over TCP, then trust for the rest.
        hba = ["local all all trust", "local replication all trust"]
        for role in password_roles:
            for database in ("all", "replication"):
                hba.append(f"host {database} {_hba_role(role)} {HOST}/32 scram-sha-256")
        hba += [f"host all all {HOST}/32 trust", f"host replication all {HOST}/32 trust"]
        (self.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def _create_roles(self, password_roles: dict[str, str]) -> None:
        if not password_roles:
            return
        with psycopg.connect(self.url(), autocommit=True) as conn:
            # Keep the passwords out of the server log, whatever `settings` asked for.
            conn.execute("SET log_statement = 'none'")
            conn.execute("SET log_min_error_statement = 'panic'")
            for role, password in password_roles.items():
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN CREATEDB SUPERUSER PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(password)
                    )
                )

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run a server binary (as postgres when root); the caller checks the exit status."""
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        if _running_as_root():
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
        )

    def _failure(self, what: str, result: subprocess.CompletedProcess[str]) -> ClusterError:
        output = " ".join((result.stdout + result.stderr).split())
        return ClusterError(
            f"{what} on port {self.port} ({self.datadir}): {output}; server log {self.log_path}",
            self.log_tail(),
        )
