"""Staging a backup for a restore: a private local copy, archived objects made readable, pg_restore.

The local copy lives in a 0700 directory named after the run, so that the next run
removes it (decrypted dumps included) once this one is gone.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pgdr.ops.errors import NotReadyYet, PgdrError
from pgdr.pipeline.process import run
from pgdr.pipeline.runs import private_directory, sweep_dead_runs
from pgdr.postgres import postgres, programs
from pgdr.storage.repository import ARCHIVED, READABLE, Repository

STAGING_PREFIX = "restore-"


def staging_root(base: str | None) -> Path:
    return Path(base or tempfile.gettempdir()) / "pgdr"


def work_directory(base: str | None) -> Path:
    """A private (0700) directory for one restore's local copy, named after this run: the
    staging directories of runs that are gone are removed first."""
    root = staging_root(base)
    root.mkdir(parents=True, exist_ok=True)
    sweep_dead_runs(root, STAGING_PREFIX)
    return private_directory(STAGING_PREFIX, root)


def check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed and free < needed * 1.05:
        raise PgdrError(
            f"not enough space in {directory} to stage the backup: need {needed // 2**20} MiB, "
            f"{free // 2**20} MiB free (set PGDR_WORK_DIR to a larger disk)"
        )


# How long S3's Standard retrieval typically takes, to say when to try again.
TYPICAL_RETRIEVAL_HOURS = {"GLACIER": 5, "DEEP_ARCHIVE": 12}
# Days the restored copy of an archived object stays readable (time for a retry, a drill).
RESTORED_COPY_DAYS = 7


def wait_until_readable(repo: Repository, key: str, *, wait_hours: float, wait: bool,
                        report: Callable[[str], None], poll_seconds: float = 60.0) -> str | None:
    """Make an archived object readable: start S3's restore and wait for it (reporting
    progress) up to wait_hours, or with wait=False raise NotReadyYet saying when to retry.
    Returns the object's storage class."""
    storage_class, state = repo.archive_state(key)
    if state == READABLE:
        return storage_class
    if state == ARCHIVED:
        repo.request_restore(key, RESTORED_COPY_DAYS)
        report(f"{key} is in {storage_class}: S3 restore requested")
    typical = TYPICAL_RETRIEVAL_HOURS.get(storage_class or "", 12)
    retry_at = datetime.now(UTC) + timedelta(hours=typical)
    if not wait:
        raise NotReadyYet(f"{key} is in {storage_class} and S3 is restoring it (typically {typical} h): "
                          f"run the same command again after {retry_at:%Y-%m-%d %H:%M} UTC")
    started = time.monotonic()
    while True:
        storage_class, state = repo.archive_state(key)
        if state == READABLE:
            report(f"{key} is readable again ({(time.monotonic() - started) / 60:.0f} min)")
            return storage_class
        waited = time.monotonic() - started
        if waited >= wait_hours * 3600:
            raise NotReadyYet(f"{key} is still being restored from {storage_class} after {wait_hours:g} h: "
                              f"run the same command again later (typically {typical} h in all)")
        report(f"S3 is restoring {key} from {storage_class}: {waited / 60:.0f} min so far "
               f"(typically {typical} h; waiting up to {wait_hours:g} h)")
        time.sleep(poll_seconds)


def pg_restore(server_url: str, dbname: str, archive: Path, *, jobs: int, no_owner: bool = False,
               no_acl: bool = False, secrets: list[str] | None = None, options: Sequence[str] = ()) -> None:
    """pg_restore -j into dbname; any error, including "errors ignored on restore", fails.
    `options` choose what to restore (--section, --use-list)."""
    with postgres.connect(server_url, dbname=dbname) as conn:
        major = postgres.server_major(conn)  # pg_restore of the server's version (or newer)
    argv = [programs.pg_bin("pg_restore", major), "--exit-on-error", "--no-password",
            f"--jobs={max(1, jobs)}", f"--dbname={dbname}"]
    if no_owner:
        argv.append("--no-owner")
    if no_acl:
        argv.append("--no-acl")
    argv += [*options, str(archive)]
    with postgres.libpq_env(server_url, dbname=dbname) as env:
        # --dbname is a name, not a connection string: the server comes from PGHOST/PGPORT.
        output = run(argv, env=env, secrets=secrets or [])
    if "errors ignored on restore" in output:
        raise PgdrError(f"pg_restore reported errors into {dbname}")


def sweep_local_leftovers(work_dir: str | None) -> list[str]:
    """Remove the staging directories (decrypted dumps) and passfile directories of runs of
    this host that are gone; one line for each."""
    removed = sweep_dead_runs(staging_root(work_dir), STAGING_PREFIX) + sweep_dead_runs(
        None, postgres.PASSFILE_PREFIX)
    return [f"removed {path}, left by a killed run" for path in removed]
