"""The measured commands: the lower bound, the old scripts, and pgdr, as a user runs them.

Each returns a Measurement plus, for backups, the bytes stored. Commands run as real
processes (pgdr from the venv's `pgdr` script) so that their cost is what a user pays.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench import archiving, pgbackrest
from bench.environment import BUCKET, EMPTY_DB, SOURCE_DB, BenchEnvironment
from bench.measure import MB, BenchError, Measurement, measure
from pgdr.postgres.cluster import LocalCluster, grant_to_server
from pgdr.postgres.postgres import (
    DIGEST_SETTINGS,
    digest_select,
    table_columns,
    table_rows,
    user_tables,
)
from pgdr.postgres.programs import pg_bin

S3COPY = Path(__file__).with_name("s3copy.py")
OLD_KEY = "old/fleet.sql.gz"
OLD_RESTORE_DB = "bench_old_restore"
BARE_RESTORE_DB = "bench_bare_restore"
# The catalog case: a repository with many backups of a few databases.
CATALOG_BUCKET = "pgdr-bench-catalog"
CATALOG_DATABASES = 5
# The sample's small table recover-table brings back (1,668 rows at 1 GB).
RECOVER_TABLE = "public.drivers"

# The runbook's backup.sh: a plain-SQL dump through gzip into a file, then `aws s3 cp`.
_OLD_BACKUP = """set -euo pipefail
"$PG_DUMP" --dbname="$1" | gzip > "$2"
"$PYTHON" "$S3COPY" put "$2" "$BUCKET" "$3"
"""
# The runbook's restore.sh: `aws s3 cp` down, create the database, gunzip | psql.
_OLD_RESTORE = """set -euo pipefail
"$PYTHON" "$S3COPY" get "$BUCKET" "$1" "$2"
"$PSQL" -X -q --dbname="$3" -c "CREATE DATABASE $4"
gunzip -c "$2" | "$PSQL" -X -q -v ON_ERROR_STOP=1 --dbname="$5" > /dev/null
"""
# The plain pipe a user would write: pg_dump's archive through zstd into a file.
_PLAIN_PIPE = """set -euo pipefail
"$PG_DUMP" -Fc -Z0 --dbname="$1" | zstd -3 -T"$2" -q -c > "$3"
"""
_BARE_RESTORE = """set -euo pipefail
"$PSQL" -X -q --dbname="$1" -c "CREATE DATABASE $2"
"$PG_RESTORE" --exit-on-error --jobs="$3" --dbname="$4" "$5"
"""


@dataclass(frozen=True)
class Result:
    measurement: Measurement
    stored_bytes: int | None = None
    # pgdr's own duration_seconds (inside the flow): the rest of the wall time is start-up.
    reported_seconds: float | None = None
    # A case's own numbers beside the measurement (WAL archiving: throughput and lag).
    figures: dict[str, float] | None = None


class Cases:
    """One benchmark round's commands against one BenchEnvironment."""

    def __init__(self, bench: BenchEnvironment, jobs: int, cores: int, *, wal_mb: int = 64,
                 wal_jobs: int = 4) -> None:
        self.bench = bench
        self.jobs = jobs
        self.cores = cores
        self.wal_mb = wal_mb
        self.wal_jobs = wal_jobs
        self.pgdr = str(Path(sys.executable).with_name("pgdr"))
        self.local_dump = bench.work / "fleet.dump"
        self.old_file = bench.work / "fleet.sql.gz"
        self.download = bench.work / "fleet-downloaded.sql.gz"
        self.pipe_file = bench.work / "fleet.dump.zst"
        self.default_file = bench.work / "fleet-default.dump"
        self.catalog_backups = 0
        # The PITR cases' file repository, written by wal-push as the server's OS user.
        self.pitr_repo = bench.work / "pitr-repo"
        self.spool = bench.work / "wal-spool"
        self.physical_datadir = bench.work / "pgdr-physical-restore"
        self.segment_dir = bench.work / "segment"
        self.single_push_repo = bench.work / "wal-push-repo"

    def _shell_env(self, **extra: str) -> dict[str, str]:
        return {**self.bench.env(), "PG_DUMP": pg_bin("pg_dump"), "PSQL": pg_bin("psql"),
                "PG_RESTORE": pg_bin("pg_restore"), "PYTHON": sys.executable, "S3COPY": str(S3COPY),
                "BUCKET": BUCKET, **extra}

    def _run(self, label: str, argv: list[str], env: dict[str, str], stdout: Path | None = None
             ) -> Measurement:
        return measure(argv, env=env, cwd=self.bench.work, logs=self.bench.logs, label=label,
                       stdout=stdout)

    def prepare(self) -> int:
        """The plain `pg_dump -Fc -Z0` file that bare pg_restore reads (not measured)."""
        self._run("prepare-dump", [pg_bin("pg_dump"), "-Fc", "-Z0", f"--dbname={self.bench.url(SOURCE_DB)}",
                                   "-f", str(self.local_dump)], self.bench.env())
        return self.local_dump.stat().st_size

    def raw_dump(self) -> Result:
        argv = [pg_bin("pg_dump"), "-Fc", "-Z0", f"--dbname={self.bench.url(SOURCE_DB)}"]
        return Result(self._run("raw_dump", argv, self.bench.env(), stdout=Path(os.devnull)),
                      self.local_dump.stat().st_size)

    def old_backup(self) -> Result:
        argv = ["bash", "-c", _OLD_BACKUP, "old-backup", self.bench.url(SOURCE_DB), str(self.old_file),
                OLD_KEY]
        measurement = self._run("old_backup", argv, self._shell_env())
        return Result(measurement, self.old_file.stat().st_size)

    def plain_pipe(self) -> Result:
        argv = ["bash", "-c", _PLAIN_PIPE, "plain-pipe", self.bench.url(SOURCE_DB), str(self.cores),
                str(self.pipe_file)]
        measurement = self._run("plain_pipe", argv, self._shell_env())
        return Result(measurement, self.pipe_file.stat().st_size)

    def row_counts(self) -> Result:
        """What the snapshot's row counts cost, apart: pgdr's own count query for every table
        (one scan each), through psql. pgdr runs them while pg_dump streams the same snapshot."""
        return self._scan_tables("row_counts", lambda _columns: sql.SQL("count(*)"))

    def content_digests(self) -> Result:
        """The same scan with each table's content digest (pgdr's default): what the digest
        adds to the row counts, apart."""
        return self._scan_tables("content_digests", digest_select, DIGEST_SETTINGS)

    def _scan_tables(self, name: str, select: Any, settings: dict[str, str] | None = None) -> Result:
        with psycopg.connect(self.bench.url(SOURCE_DB)) as conn:
            columns = table_columns(conn)
            script = "".join(f"SET {setting} = '{value}';\n" for setting, value in (settings or {}).items())
            script += "".join(table_rows(schema, table, select(columns[key])).as_string(conn) + ";\n"
                              for key, schema, table in user_tables(conn))
        argv = [pg_bin("psql"), "-X", "-q", "-At", f"--dbname={self.bench.url(SOURCE_DB)}", "-c", script]
        return Result(self._run(name, argv, self.bench.env()))

    def pg_dump_default(self) -> Result:
        argv = [pg_bin("pg_dump"), "-Fc", f"--dbname={self.bench.url(SOURCE_DB)}", "-f",
                str(self.default_file)]
        measurement = self._run("pg_dump_default", argv, self.bench.env())
        return Result(measurement, self.default_file.stat().st_size)

    def pgbackrest_backup(self) -> Result:
        rest = self.bench.pgbackrest
        rest.set_archive_command(rest.archive_command)
        try:
            measurement = self._run("pgbackrest_backup", rest.command("--type=full", "backup"),
                                    self.bench.env())
        finally:
            rest.set_archive_command(pgbackrest.CLUSTER_SETTINGS["archive_command"])
        info = json.loads(subprocess.run(rest.command("--output=json", "info"), capture_output=True,
                                         check=True).stdout)
        stored = info[0]["backup"][-1]["info"]["repository"]["size"]
        return Result(measurement, int(stored))

    def pgbackrest_restore(self) -> Result:
        """pgBackRest's restore of its latest backup into a new directory, and the server
        started on it (until it accepts connections); stopped and removed afterwards."""
        rest = self.bench.pgbackrest
        restored = rest.restored_cluster()
        restored.datadir.mkdir()
        grant_to_server(restored.datadir)
        try:
            measurement = self._run("pgbackrest_restore", rest.command(
                f"--pg1-path={restored.datadir}", "--archive-mode=off", "restore"), self.bench.env())
            start = time.monotonic()
            restored.start()
            started = time.monotonic() - start
        finally:
            restored.destroy()
        return Result(Measurement(measurement.seconds + started, measurement.peak_rss_mb, "",
                                  measurement.cpu_seconds))

    def pgdr_backup(self, *, encrypted: bool = False, file_repo: bool = False
                    ) -> tuple[Result, dict[str, Any]]:
        repo = self.bench.file_repo_url if file_repo else self.bench.repo_url
        argv = [self.pgdr, "backup", "--db", self.bench.url(SOURCE_DB), "--repo", repo, "--json"]
        if encrypted:
            argv += ["--encrypt-to", self.bench.gpg.fingerprint]
        label = "pgdr_backup_file" if file_repo else "pgdr_backup_encrypted" if encrypted else "pgdr_backup"
        measurement = self._run(label, argv, self.bench.env(gpg=encrypted))
        summary = json.loads(measurement.stdout)
        return Result(measurement, int(summary["size_bytes"]), summary["duration_seconds"]), summary

    def empty_backup(self, *, prefect_server: bool) -> Result:
        argv = [self.pgdr, "backup", "--db", self.bench.url(EMPTY_DB), "--repo", self.bench.repo_url,
                "--json"]
        label = "empty_backup" if prefect_server else "empty_backup_no_server"
        measurement = self._run(label, argv, self.bench.env(prefect_server=prefect_server))
        return Result(measurement, reported_seconds=json.loads(measurement.stdout)["duration_seconds"])

    def old_restore(self) -> Result:
        argv = ["bash", "-c", _OLD_RESTORE, "old-restore", OLD_KEY, str(self.download),
                self.bench.url("postgres"), OLD_RESTORE_DB, self.bench.url(OLD_RESTORE_DB)]
        return Result(self._run("old_restore", argv, self._shell_env()))

    def bare_restore(self) -> Result:
        argv = ["bash", "-c", _BARE_RESTORE, "bare-restore", self.bench.url("postgres"), BARE_RESTORE_DB,
                str(self.jobs), self.bench.url(BARE_RESTORE_DB), str(self.local_dump)]
        return Result(self._run("bare_restore", argv, self._shell_env()))

    def pgdr_restore_temp(self, backup_id: str) -> Result:
        argv = [self.pgdr, "restore-temp", backup_id, "--repo", self.bench.repo_url, "--db", SOURCE_DB,
                "--server", self.bench.url("postgres"), "--jobs", str(self.jobs), "--json"]
        measurement = self._run("pgdr_restore_temp", argv, self.bench.env())
        summary = json.loads(measurement.stdout)
        if not summary.get("verified"):
            raise BenchError("pgdr restore-temp did not verify the restored database")
        return Result(measurement, reported_seconds=summary["duration_seconds"])

    def pgdr_recover_table(self, backup_id: str) -> Result:
        """recover-table of one small table (RECOVER_TABLE) from the whole backup, missing-rows
        mode into the source database (nothing is missing: the cost is the recovery's)."""
        argv = [self.pgdr, "recover-table", backup_id, "--target", self.bench.url(SOURCE_DB), "--table",
                RECOVER_TABLE, "--repo", self.bench.repo_url, "--db", SOURCE_DB, "--jobs", str(self.jobs),
                "--json"]
        measurement = self._run("pgdr_recover_table", argv, self.bench.env())
        summary = json.loads(measurement.stdout)
        return Result(measurement, reported_seconds=summary["duration_seconds"])

    @contextlib.contextmanager
    def archiving_to_pitr_repo(self, jobs: int = 1) -> Iterator[None]:
        """archive_command = pgdr wal-push into the PITR file repository (with jobs > 1,
        pushing ahead with a spool directory) while the block runs, /bin/true again after."""
        (self.pitr_repo / SOURCE_DB / "wal").mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(exist_ok=True)
        grant_to_server(self.pitr_repo)
        grant_to_server(self.spool)
        command = f"{self.pgdr} wal-push %p --repo {self.pitr_repo.as_uri()} --db {SOURCE_DB}"
        if jobs > 1:
            command += f" --jobs {jobs} --spool {self.spool}"
        rest = self.bench.pgbackrest
        rest.set_archive_command(command)
        try:
            yield
        finally:
            rest.set_archive_command(pgbackrest.CLUSTER_SETTINGS["archive_command"])

    def pgdr_basebackup(self) -> Result:
        """pgdr basebackup (pg_basebackup -Ft -X fetch | zstd) into the PITR file repository."""
        argv = [self.pgdr, "basebackup", "--db", self.bench.url(SOURCE_DB), "--repo", self.pitr_repo.as_uri(),
                "--json"]
        measurement = self._run("pgdr_basebackup", argv, self.bench.env())
        summary = json.loads(measurement.stdout)
        return Result(measurement, int(summary["size_bytes"]), summary["duration_seconds"])

    def pgdr_restore_physical(self) -> Result:
        """`pgdr restore latest --physical` into a new directory: the base backup, the WAL to
        the end of the archive, the server started and promoted (pgdr returns once it accepts
        connections); stopped and removed afterwards."""
        argv = [self.pgdr, "restore", "latest", "--physical", "--datadir", str(self.physical_datadir),
                "--repo", self.pitr_repo.as_uri(), "--db", SOURCE_DB, "--json"]
        try:
            measurement = self._run("pgdr_restore_physical", argv, self.bench.env())
        finally:
            LocalCluster(self.physical_datadir, 0).destroy()
        summary = json.loads(measurement.stdout)
        if not summary.get("running"):
            raise BenchError("pgdr restore --physical did not leave the server running")
        return Result(measurement, reported_seconds=summary["duration_seconds"])

    def wal_archiving(self, jobs: int) -> Result:
        """The write load (bench/archiving.py) with wal-push as archive_command."""
        with self.archiving_to_pitr_repo(jobs):
            measurement, figures = archiving.run_load(
                self.bench.url("postgres"), self.bench.url(archiving.LOAD_DB),
                self.bench.cluster.datadir / "pg_wal", self.wal_mb, self.cores)
        return Result(measurement, figures=figures)

    def wal_push_segment(self) -> Result:
        """One `pgdr wal-push` of a real 16 MB WAL segment (a copy of one in pg_wal) into an
        empty file repository, as archive_command runs it once per segment."""
        segment = self._segment_copy()
        shutil.rmtree(self.single_push_repo, ignore_errors=True)
        argv = [self.pgdr, "wal-push", str(segment), "--repo", self.single_push_repo.as_uri(), "--db",
                SOURCE_DB]
        return Result(self._run("wal_push_segment", argv, self.bench.env()))

    def _segment_copy(self) -> Path:
        existing = sorted(self.segment_dir.glob("*")) if self.segment_dir.exists() else []
        if existing:
            return existing[0]
        wal_dir = self.bench.cluster.datadir / "pg_wal"
        full = sorted(p for p in wal_dir.iterdir() if len(p.name) == 24 and p.stat().st_size == 16 * MB)
        if not full:
            raise BenchError(f"no 16 MB WAL segment in {wal_dir}")
        self.segment_dir.mkdir(exist_ok=True)
        return Path(shutil.copy(full[0], self.segment_dir / full[0].name))

    def prepare_catalog(self, backups: int) -> None:
        """A repository of `backups` backups of CATALOG_DATABASES databases (their manifests,
        an hour apart, and each database's catalog index), in a bucket of its own (not measured)."""
        from pgdr.catalog import catalog
        from pgdr.catalog.index import refresh_index
        from pgdr.storage.repository import open_repository

        env = self.bench.base_env
        self.bench.s3().create_bucket(Bucket=CATALOG_BUCKET)
        # pgdr's own repository code writes them, pointed at the bench's endpoint like the commands.
        os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                               "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        repo = open_repository(self.catalog_url)
        now = catalog.utcnow()
        row_counts = {f"public.{table}": 1000 * n for n, table in enumerate(
            ("vehicles", "drivers", "dispatches", "gps_points", "audit_logs"), 1)}

        def put(number: int) -> None:
            moment = catalog.iso(now - timedelta(hours=number))
            manifest = catalog.Manifest(
                backup_id=catalog.new_backup_id(now - timedelta(hours=number), "daily"),
                database=f"fleet{number % CATALOG_DATABASES}", tier="daily", started_at=moment,
                finished_at=moment, snapshot_at=moment, server_version="15.20", tool_version="pgdr bench",
                format="pg_dump-custom", compression="zstd-3", encryption=None, size_bytes=2**27,
                dump_bytes=2**29, sha256="0" * 64, row_counts=row_counts, wal_lsn_start="0/3000028",
                source="bench", data_key=catalog.DUMP)
            repo.put_bytes(manifest.manifest_key, manifest.to_json())

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, range(backups)))
        # Each database's index, by the call a backup makes after its manifest (here once for
        # all of them: the first backup after an upgrade indexes what came before it alike).
        for number in range(CATALOG_DATABASES):
            if not refresh_index(repo, f"fleet{number}"):
                raise BenchError(f"the catalog index of fleet{number} could not be written")
        self.catalog_backups = backups

    @property
    def catalog_url(self) -> str:
        return f"s3://{CATALOG_BUCKET}/pgdr"

    def catalog_list(self) -> Result:
        argv = [self.pgdr, "list", "--repo", self.catalog_url, "--json"]
        measurement = self._run("catalog_list", argv, self.bench.env())
        if len(json.loads(measurement.stdout)["backups"]) != self.catalog_backups:
            raise BenchError(f"pgdr list did not list the catalog's {self.catalog_backups} backups")
        return Result(measurement)

    def catalog_status(self) -> Result:
        """`status`: the latest backup of every database of the catalog."""
        argv = [self.pgdr, "status", "--repo", self.catalog_url, "--json"]
        return Result(self._run("catalog_status", argv, self.bench.env()))

    def clean_up(self) -> None:
        """Between rounds: drop restored databases, empty the bucket, remove downloads."""
        with psycopg.connect(self.bench.url("postgres"), autocommit=True) as conn:
            for name in (OLD_RESTORE_DB, BARE_RESTORE_DB):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        s3 = self.bench.s3()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for item in page.get("Contents", []):
                s3.delete_object(Bucket=BUCKET, Key=item["Key"])
        for path in (self.old_file, self.download, self.pipe_file, self.default_file):
            path.unlink(missing_ok=True)
        for directory in (self.bench.file_repo, self.pitr_repo, self.spool, self.single_push_repo):
            shutil.rmtree(directory, ignore_errors=True)


def database_mb(bench: BenchEnvironment) -> float:
    with psycopg.connect(bench.url(SOURCE_DB)) as conn:
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]  # type: ignore[index]
    return size / MB


def server_version(bench: BenchEnvironment) -> str:
    with psycopg.connect(bench.url("postgres")) as conn:
        return str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
