"""pgBackRest, the peer a user would pick instead of pgdr: a stanza on the bench's own
cluster, its repository on local disk, zstd, process-max = cores, full backups.

pgBackRest needs WAL archiving through its `archive-push` to finish a backup (it waits for
the backup's last WAL segment to reach its repository). The cluster runs with
archive_mode = on and archive_command = /bin/true; the archive_command is switched to
pgBackRest's only while its backup runs, so that no other case pays for WAL archiving.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from bench.measure import BenchError
from pgdr.postgres.cluster import SERVER_USER, LocalCluster, free_port, grant_to_server

STANZA = "bench"
# What the cluster needs from the start (archive_mode takes a restart to change).
CLUSTER_SETTINGS = {"archive_mode": "on", "archive_command": "/bin/true"}


def ensure_installed() -> str:
    """The pgbackrest binary; installed from the Debian package when missing and root."""
    found = shutil.which("pgbackrest")
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchError("pgbackrest is not installed (apt-get install pgbackrest) and this is not root")
    result = subprocess.run(["apt-get", "install", "-y", "pgbackrest"], capture_output=True, text=True,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=False)
    found = shutil.which("pgbackrest")
    if result.returncode != 0 or not found:
        raise BenchError(f"could not install pgbackrest: {result.stderr.strip()[-300:]}")
    return found


def as_server_user(argv: list[str]) -> list[str]:
    """pgBackRest reads the data directory: it runs as the cluster's OS user."""
    return ["runuser", "-u", SERVER_USER, "--", *argv] if os.geteuid() == 0 else argv


@dataclass(frozen=True)
class PgBackRest:
    binary: str
    config: Path
    cluster: LocalCluster
    restore_dir: Path

    def command(self, *args: str) -> list[str]:
        return as_server_user([self.binary, f"--config={self.config}", f"--stanza={STANZA}", *args])

    @property
    def archive_command(self) -> str:
        return f"{self.binary} --config={self.config} --stanza={STANZA} archive-push %p"

    def set_archive_command(self, command: str) -> None:
        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(sql.Literal(command)))
            conn.execute("SELECT pg_reload_conf()")

    def restored_cluster(self) -> LocalCluster:
        """The server on the restored data directory (TCP only, a free port)."""
        return LocalCluster(self.restore_dir, free_port(), log_path=self.restore_dir.with_suffix(".log"))


def configure(work: Path, cluster: LocalCluster, process_max: int) -> PgBackRest:
    """Write pgbackrest.conf for the cluster and create the stanza."""
    binary = ensure_installed()
    root = work / "pgbackrest"
    for name in ("repo", "log", "lock", "spool"):
        (root / name).mkdir(parents=True, exist_ok=True)
    socket = f"pg1-socket-path={cluster.socket_dir}\n" if cluster.socket_dir else "pg1-host-type=tcp\n"
    config = root / "pgbackrest.conf"
    config.write_text(
        "[global]\n"
        f"repo1-path={root / 'repo'}\n"
        "repo1-retention-full=1\n"
        "compress-type=zst\n"
        "compress-level=3\n"
        f"process-max={process_max}\n"
        "start-fast=y\n"
        f"log-path={root / 'log'}\n"
        f"lock-path={root / 'lock'}\n"
        f"spool-path={root / 'spool'}\n"
        "log-level-console=warn\n"
        "log-level-file=info\n"
        f"\n[{STANZA}]\n"
        f"pg1-path={cluster.datadir}\n"
        f"pg1-port={cluster.port}\n"
        + socket
    )
    grant_to_server(root)
    rest = PgBackRest(binary, config, cluster, work / "pgbackrest-restore")
    result = subprocess.run(rest.command("stanza-create"), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"pgbackrest stanza-create failed: {(result.stdout + result.stderr).strip()[-500:]}")
    return rest
