"""Point-in-time recovery: configure a restored data directory, watch it recover.

Self-managed PostgreSQL: a base backup is unpacked into a new data directory, told to
fetch WAL with `pgdr wal-fetch` and to stop at the target and promote; then pgdr waits
until it did, or reports why it did not (a corrupt segment makes wal-fetch abort
recovery, see pgdr.pitr.wal). RDS has PITR built in: `restore_db_instance_to_point_in_time`.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from pgdr.catalog.catalog import iso, utcnow
from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.postgres.cluster import ClusterError, LocalCluster, _conf_value
from pgdr.storage.repository import Repository


class RecoveryFailed(PgdrError):
    """Recovery stopped before the target; the message quotes the server's reason."""


@dataclass(frozen=True)
class Target:
    """Where recovery stops: a time, an LSN, a restore point name, or (all None) the end
    of the archive."""

    time: datetime | None = None
    lsn: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.time, self.lsn, self.name)) > 1:
            raise ConfigError("give one recovery target: a time, an LSN or a restore point name")
        if self.lsn is not None and not re.fullmatch(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", self.lsn):
            raise ConfigError(f"{self.lsn!r} is not an LSN (like 0/3000060)")
        if self.time is not None and self.time.tzinfo is None:
            raise ConfigError("the recovery target time needs a time zone (e.g. 2026-01-28T02:00:00Z)")

    def describe(self) -> str:
        if self.time is not None:
            return f"time {self.time.astimezone(UTC).isoformat()}"
        if self.lsn is not None:
            return f"LSN {self.lsn}"
        if self.name is not None:
            return f"restore point {self.name!r}"
        return "the end of the WAL archive"


def restore_command(pgdr: str, repo_url: str, database: str) -> str:
    """The restore_command line (run by the server through /bin/sh)."""
    return " ".join([shlex.quote(pgdr), "wal-fetch", "%f", "%p", "--repo", shlex.quote(repo_url),
                     "--db", shlex.quote(database)])


def recovery_settings(command: str, target: Target, timeline: str | None = None) -> dict[str, str]:
    """postgresql.auto.conf settings for a PITR restore of a base backup."""
    settings = {
        "restore_command": command,
        # The restored server must never archive into the source's WAL area: its new
        # timeline would become the "latest" one a later recovery follows.
        "archive_mode": "off",
        "recovery_target_action": "promote",
    }
    if target.time is not None:
        settings["recovery_target_time"] = target.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
    elif target.lsn is not None:
        settings["recovery_target_lsn"] = target.lsn
    elif target.name is not None:
        settings["recovery_target_name"] = target.name
    if timeline:
        settings["recovery_target_timeline"] = timeline
    return settings


def configure_recovery(datadir: Path, settings: dict[str, str]) -> None:
    """Append the settings to postgresql.auto.conf (it overrides postgresql.conf) and ask
    for targeted archive recovery with recovery.signal."""
    with (datadir / "postgresql.auto.conf").open("a") as conf:
        conf.write("\n# pgdr point-in-time recovery\n")
        for name, value in settings.items():
            conf.write(f"{name} = {_conf_value(value)}\n")
    (datadir / "standby.signal").unlink(missing_ok=True)
    (datadir / "recovery.signal").touch()


_STOPPED = re.compile(r"recovery stopping (?:before|after) .*")


def recovery_failure(log: str) -> str:
    """The server's own words for why recovery stopped: its FATAL/PANIC lines and the
    restore command's error line."""
    lines = [line.strip() for line in log.splitlines()]
    reasons = [re.sub(r"^.*?(FATAL|PANIC):\s*", r"\1: ", line) for line in lines
               if "FATAL:" in line or "PANIC:" in line]
    reasons += [line for line in lines if line.startswith("pgdr: error:")]
    return "; ".join(dict.fromkeys(reasons[-4:])) or "the server stopped (see its log)"


def recover(cluster: LocalCluster, target: Target, timeout: float) -> dict[str, Any]:
    """Start the server on its restored data directory and wait until it reached the
    target and promoted; RecoveryFailed (server stopped) if it did not."""
    try:
        cluster.start(timeout=int(timeout))
    except ClusterError:
        raise RecoveryFailed(f"recovery to {target.describe()} failed: "
                             f"{recovery_failure(cluster.log_tail(60))}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(cluster.url(), connect_timeout=5, autocommit=True) as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore[index]
                    return _reached(conn, cluster)
        except psycopg.OperationalError:
            pass  # starting up, or stopping: is_running() tells which
        if not cluster.is_running():
            raise RecoveryFailed(f"recovery to {target.describe()} failed: "
                                 f"{recovery_failure(cluster.log_tail(60))}")
        if time.monotonic() > deadline:
            cluster.stop("immediate")
            raise RecoveryFailed(f"recovery to {target.describe()} did not finish within {timeout:.0f} s")
        time.sleep(0.5)


def _reached(conn: psycopg.Connection, cluster: LocalCluster) -> dict[str, Any]:
    replayed, lsn, wal_file = conn.execute(
        "SELECT pg_last_xact_replay_timestamp(), pg_current_wal_lsn()::text,"
        " pg_walfile_name(pg_current_wal_lsn())").fetchone()  # type: ignore[misc]
    stopped = _STOPPED.findall(cluster.log_tail(200))
    return {
        # To the microsecond, as the server says: cut to the second it could fall before the
        # base backup's own (second-precision) finish time and be taken for no replay at all.
        "last_replayed_transaction_at": replayed.astimezone(UTC).isoformat().replace("+00:00", "Z")
        if replayed else None,
        "end_lsn": lsn,
        "timeline": int(wal_file[:8], 16),
        "stopped": stopped[-1] if stopped else "at the end of the WAL archive",
    }


# --- RDS ------------------------------------------------------------------------------------


def rds_restore_to_point_in_time(client: Any, source: str, target: str, *,
                                 restore_time: datetime | None = None,
                                 instance_class: str | None = None,
                                 wait_seconds: float = 3600) -> dict[str, Any]:
    """RDS keeps its own WAL (up to its backup retention): restore `source` as the new
    instance `target` at restore_time, or at the latest restorable time when None, and wait
    until it is available."""
    from pgdr.storage import aws

    try:
        aws.restore_rds_instance(client, source, target, restore_time=restore_time,
                                 instance_class=instance_class)
        endpoint = aws.wait_until_available(client, target, wait_seconds, poll_seconds=5)
    except PgdrError as exc:
        raise PgdrError(f"RDS point-in-time restore of {source} failed: {exc}") from None
    return {
        "source_instance": source,
        "target_instance": target,
        "status": "available",
        "endpoint": f"{endpoint['Address']}:{endpoint['Port']}",
        "restore_time": iso(restore_time) if restore_time else "latest",
    }


# --- is archiving working? ------------------------------------------------------------------


def _archiver_failure(conn: psycopg.Connection, since: datetime) -> str | None:
    """The server's own report of archive_command failing since `since`, if it did."""
    failed_wal, failed_at, count = conn.execute(
        "SELECT last_failed_wal, last_failed_time, failed_count FROM pg_stat_archiver").fetchone()  # type: ignore[misc]
    if failed_at is None or failed_at < since:
        return None
    return (f"archive_command fails: pg_stat_archiver reports {count} failure(s), the last for "
            f"{failed_wal} at {iso(failed_at)} (see the server log)")


def check_archiving(db_url: str, repo: Repository, database: str, timeout: float = 60.0,
                    poll_seconds: float = 0.2, max_base_age_hours: float = 26.0) -> dict[str, Any]:
    """Prove WAL archiving works end to end, as recovery would need it now:
    1. archive_mode is on and an archive_command is set;
    2. a WAL switch (after a restore point, so there is something to switch) reaches the
       repository within `timeout`;
    3. every segment from the newest base backup's first one to that one is archived;
    4. the newest base backup is at most max_base_age_hours old (recovery replays all WAL
       since it: without new base backups it only grows longer).
    Returns the report; `ok` false with `problems` saying why otherwise."""
    from pgdr.pitr import wal, walarchive
    from pgdr.pitr.basebackup import list_base_backups
    from pgdr.postgres import dsn, postgres

    problems: list[str] = []
    report: dict[str, Any] = {"database": database, "repository": repo.url,
                              "server": dsn.display_dsn(db_url), "switched_segment": None,
                              "archived_within_seconds": None, "base_backup": None}
    with postgres.connect(db_url, autocommit=True) as conn:
        mode, command = conn.execute(
            "SELECT current_setting('archive_mode'), current_setting('archive_command')").fetchone()  # type: ignore[misc]
        if mode == "off" or not command.strip():
            problems.append(f"WAL archiving is off on {report['server']} (archive_mode {mode}, "
                            f"archive_command {'set' if command.strip() else 'empty'})")
        else:
            started = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            conn.execute("SELECT pg_create_restore_point('pgdr check')")
            segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]  # type: ignore[index]
            report["switched_segment"] = segment
            clock = time.monotonic()
            while repo.head(wal.sidecar_key(database, segment)) is None:
                if time.monotonic() - clock > timeout:
                    failure = _archiver_failure(conn, started)
                    problems.append(f"{segment} did not reach {repo.url} within {timeout:.0f} s"
                                    + (f": {failure}" if failure else ""))
                    break
                time.sleep(poll_seconds)
            else:
                report["archived_within_seconds"] = round(time.monotonic() - clock, 3)
    backups = list_base_backups(repo, database)
    newest = backups[-1] if backups else None
    if newest is None:
        problems.append(f"no base backup of {database} in {repo.url}: recovery has nothing to start from")
    else:
        report["base_backup"] = newest.backup_id
        age_hours = (utcnow() - newest.finished).total_seconds() / 3600
        report["base_backup_age_hours"] = round(age_hours, 3)
        if age_hours > max_base_age_hours:
            problems.append(f"the newest base backup {newest.backup_id} finished {age_hours:.1f} h ago, "
                            f"more than {max_base_age_hours:g} h: are base backups still being taken?")
    status = walarchive.archive_status(repo, database, chain_start=newest.start_wal_file if newest else None,
                                       segment_size=newest.wal_segment_size if newest else 16 * 1024 * 1024)
    if status["missing_segments"]:
        problems.append(f"{status['missing_segments']} WAL segment(s) missing since base backup "
                        f"{newest.backup_id} ({', '.join(status['gaps'][:3])}"  # type: ignore[union-attr]
                        f"{', …' if status['missing_segments'] > 3 else ''}): recovery cannot pass "
                        f"{status['gaps'][0]}")
    return {**report, **{k: status[k] for k in ("chain_start", "missing_segments", "gaps", "last_segment",
                                                 "last_archived_at", "age_seconds")},
            "problems": problems, "ok": not problems}
