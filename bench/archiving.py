"""Sustained WAL archiving: a write load that fills WAL as fast as this machine can, on the
bench's cluster with archive_command = pgdr's `wal-push`, and how far the archive lags.

The load is `cores` connections, each inserting batches of rows (random md5 text, about
170 bytes of WAL per row, a transaction per batch) into a table of a throwaway database
until the server has written `wal_mb` MB of WAL since the start. Meanwhile a sampler reads
pg_wal/archive_status every SAMPLE_SECONDS: the number of segments ready but not archived
(`*.ready`) and the age of the oldest of them (how many seconds the archive is behind).
When the load is done, the last segment is switched and the case waits until PostgreSQL
reports it archived (pg_stat_archiver): that moment ends the measurement.

What the archiver runs (wal-push, its shell, zstd) are children of PostgreSQL's archiver
process, not of the bench: their CPU seconds are the archiver's reaped-children time
(/proc/<pid>/stat cutime + cstime), their peak memory the archiver's process tree.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from bench.measure import MB, BenchError, Measurement, PeakSampler

SAMPLE_SECONDS = 0.2
SEGMENT_MB = 16
LOAD_DB = "bench_wal_load"
ROWS_PER_BATCH = 20_000
CATCH_UP_SECONDS = 900
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LAG_KEYS = ("archive_lag_max_segments", "archive_lag_max_seconds", "archive_lag_end_segments",
            "archive_lag_end_seconds")


@dataclass(frozen=True)
class LagSample:
    at: float  # seconds since the load started
    ready: int  # segments ready but not archived
    behind_seconds: float  # age of the oldest of them (0 when none)


def read_lag(wal_dir: Path, now: float) -> tuple[int, float]:
    """(segments marked ready, seconds since the oldest of them was marked) right now."""
    ages = []
    try:
        with os.scandir(wal_dir / "archive_status") as entries:
            for entry in entries:
                if entry.name.endswith(".ready"):
                    try:
                        ages.append(now - entry.stat().st_mtime)
                    except OSError:
                        continue  # archived while we looked
    except OSError:
        return 0, 0.0
    return len(ages), max(ages, default=0.0)


def lag_figures(samples: list[LagSample], load_seconds: float) -> dict[str, float]:
    """The largest lag during the run and the lag at the moment the load ended (the first
    sample at or after it; the last one if none)."""
    end = next((s for s in samples if s.at >= load_seconds), samples[-1] if samples else None)
    values = (max((s.ready for s in samples), default=0),
              round(max((s.behind_seconds for s in samples), default=0.0), 2),
              end.ready if end else 0,
              round(end.behind_seconds, 2) if end else 0.0)
    return dict(zip(LAG_KEYS, values, strict=True))


def throughput_figures(wal_bytes: int, archived_segments: int, load_seconds: float, total_seconds: float,
                       segment_mb: float = SEGMENT_MB) -> dict[str, float]:
    """WAL written per second of load, WAL archived per second until the archive caught up."""
    return {
        "wal_generated_mb": round(wal_bytes / MB, 1),
        "wal_generated_mb_s": round(wal_bytes / MB / load_seconds, 1),
        "wal_archived_mb_s": round(archived_segments * segment_mb / total_seconds, 1),
        "archived_segments": archived_segments,
        "load_seconds": round(load_seconds, 2),
        "catch_up_seconds": round(total_seconds - load_seconds, 2),
    }


class _LagSampler(threading.Thread):
    def __init__(self, wal_dir: Path, start: float) -> None:
        super().__init__(daemon=True)
        self.wal_dir = wal_dir
        self.start_time = start
        self.samples: list[LagSample] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            now = time.time()
            ready, behind = read_lag(self.wal_dir, now)
            self.samples.append(LagSample(time.monotonic() - self.start_time, ready, behind))
            self._done.wait(SAMPLE_SECONDS)

    def stop(self) -> list[LagSample]:
        self._done.set()
        self.join()
        return self.samples


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of the children a process has reaped so far."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        stat = handle.read()
    fields = stat[stat.rfind(b")") + 2:].split()
    # Fields 16 and 17 of stat (cutime, cstime), counted from the state field (3).
    return (int(fields[13]) + int(fields[14])) / _CLOCK_TICKS


def _archiver_pid(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'archiver'").fetchone()
    if row is None:
        raise BenchError("the cluster has no archiver process (archive_mode off?)")
    return int(row[0])


def _archived(conn: psycopg.Connection) -> tuple[int, str | None, int]:
    row = conn.execute("SELECT archived_count, last_archived_wal, failed_count "
                       "FROM pg_stat_archiver").fetchone()
    assert row is not None
    return int(row[0]), row[1], int(row[2])


def _write_until(url: str, start_lsn: str, wal_bytes: int) -> None:
    """One writer: batches of inserts until the server wrote wal_bytes since start_lsn."""
    insert = sql.SQL("INSERT INTO wal_load (payload) SELECT repeat(md5(random()::text), 4) "
                     "FROM generate_series(1, {})").format(sql.Literal(ROWS_PER_BATCH))
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            conn.execute(insert)
            if _written_since(conn, start_lsn) >= wal_bytes:
                return


def _written_since(conn: psycopg.Connection, start_lsn: str) -> int:
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (start_lsn,)).fetchone()
    assert row is not None
    return int(row[0])


def run_load(server_url: str, load_url: str, wal_dir: Path, wal_mb: int, writers: int
             ) -> tuple[Measurement, dict[str, float]]:
    """The write load with the archive_command in force; returns the measurement (wall
    time until every segment of the load is archived, the archiver's CPU and memory) and
    the throughput and lag figures."""
    archiver = _archiver_pid(server_url)
    with psycopg.connect(load_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS wal_load")
        conn.execute("CREATE TABLE wal_load (id bigserial PRIMARY KEY, payload text)")
        conn.execute("CHECKPOINT")  # the load starts at a checkpoint: its full-page writes count
        archived_before, _, failed_before = _archived(conn)
        start_lsn = str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]
    cpu_before = children_cpu_seconds(archiver)
    memory = PeakSampler(archiver)
    memory.start()
    start = time.monotonic()
    lag = _LagSampler(wal_dir, start)
    lag.start()
    try:
        with ThreadPoolExecutor(writers) as pool:
            for done in [pool.submit(_write_until, load_url, start_lsn, wal_mb * MB) for _ in range(writers)]:
                done.result()
        load_seconds = time.monotonic() - start
        with psycopg.connect(server_url, autocommit=True) as conn:
            wal_bytes = _written_since(conn, start_lsn)
            last = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])  # type: ignore[index]
            archived_after = _wait_archived(conn, last, failed_before)
        total_seconds = time.monotonic() - start
    finally:
        samples = lag.stop()
        peak = memory.stop()
    cpu = children_cpu_seconds(archiver) - cpu_before
    with psycopg.connect(load_url, autocommit=True) as conn:
        conn.execute("DROP TABLE wal_load")
    figures = {**throughput_figures(wal_bytes, archived_after - archived_before, load_seconds, total_seconds),
               **lag_figures(samples, load_seconds)}
    return Measurement(total_seconds, peak / MB, "", cpu), figures


def _wait_archived(conn: psycopg.Connection, segment: str, failed_before: int) -> int:
    """Wait until `segment` is archived; the archived count then. A failing archive_command
    stops the benchmark (with PostgreSQL's record of the failure)."""
    deadline = time.monotonic() + CATCH_UP_SECONDS
    while True:
        count, last, failed = _archived(conn)
        if last is not None and last[:24] >= segment:
            return count
        if failed > failed_before:
            row = conn.execute("SELECT last_failed_wal, last_failed_time FROM pg_stat_archiver").fetchone()
            raise BenchError(f"archive_command failed (pg_stat_archiver: {row}); see the cluster's log")
        if time.monotonic() > deadline:
            raise BenchError(f"{segment} was not archived within {CATCH_UP_SECONDS} s")
        time.sleep(0.05)
