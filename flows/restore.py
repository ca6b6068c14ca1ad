"""Restore, restore-to-temp and rollback: the runbook's restore.sh as flows.

resolve backup -> stage (checksum verified, decrypted, decompressed to one local file)
-> pg_restore -j into a new database -> validate row counts (great-expectations)
-> [pre-restore backup, swap into place] -> audit, artifact.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypedDict

from prefect import flow, get_run_logger

from flows.backup import backup
from pgdr.catalog import catalog
from pgdr.catalog.locks import LockBusy, database_lock, lock_holder
from pgdr.ops.errors import ConfigError, FailedWithReport, IntegrityError, NotFoundError, PgdrError
from pgdr.ops.settings import Settings, load_settings
from pgdr.pipeline.process import CommandError
from pgdr.postgres import dsn, postgres
from pgdr.restore import quality, recovery, selective, staging, tags
from pgdr.restore import restore as restoring
from pgdr.storage.repository import Repository
from tasks.artifacts import Stopwatch
from tasks.records import audited, open_repo, publish_metrics
from tasks.restore import (
    apply_database_properties,
    bring_back_archived,
    check_roles,
    find_backup,
    record_failed_verification,
    record_verification,
    repair_target,
    restore_into_new_database,
    stage_backup,
    stop_writes,
    swap_into_place,
    validate_restore,
)
from tasks.runs import FLOW_HOOKS, run_name

RESTORE_LOCKS = "restores"


class VerificationFailed(FailedWithReport):
    """The restored database does not hold what the backup's manifest says."""


class Restored(TypedDict):
    """What every restore reports: the backup, where it went, the row count of each table
    as validated there."""

    backup_id: str
    database: str
    target: str
    verified: bool
    row_counts: dict[str, int]
    duration_seconds: float


class RestoreResult(Restored):
    """`pgdr restore --json`: also the replaced database, kept for rollback (None for a new
    database), what a killed run had left, and the rows written after the pre-restore
    backup began (None when none could be)."""

    previous_database: str | None
    repaired: list[str]
    written_after_pre_restore_backup: dict[str, Any] | None


class TempRestoreResult(Restored):
    """`pgdr restore-temp --json`: also the throwaway database, and whether it was kept."""

    temp_database: str
    kept: bool


class RollbackResult(TypedDict):
    """`pgdr rollback --json`."""

    target: str
    restored_from: str
    set_aside_as: str
    repaired: list[str]
    duration_seconds: float


class RepairResult(TypedDict):
    """`pgdr repair --json`: one line for each thing finished or cleaned up."""

    target: str
    repaired: list[str]


def is_backup_defect(exc: BaseException) -> bool:
    """A failure that says the backup itself is bad (checksum, missing dump, pg_restore), not
    the place it was restored to or the credentials of the run."""
    return isinstance(exc, IntegrityError | NotFoundError) or (
        isinstance(exc, CommandError) and exc.name == "pg_restore")


def restore_and_validate(repo: Repository, settings: Settings, manifest: catalog.Manifest, server_url: str,
                         dbname: str, jobs: int | None, no_owner: bool, by: str, *,
                         archive_wait_hours: float = 12.0, wait: bool = True,
                         of: str | None = None, properties: bool = False, no_acl: bool = False,
                         create_roles: bool = False,
                         tables: list[selective.Relation] | None = None) -> dict[str, Any]:
    """Stage, restore into the new database `dbname` (a scratch database for `of`, by
    default the backup's database; the whole backup, or only `tables`), validate, and (with
    `properties`) give it the backed-up database's own properties; the database is dropped
    and the local copy removed on any failure (the local copy always). Nothing starts unless
    the server has (or, with `create_roles`, was given) every role the backup needs; an
    archived dump is brought back first (bring_back_archived). Only a whole restore counts
    as a verification of the backup."""
    check_roles(server_url, dbname, manifest, no_owner, no_acl, create_roles)
    bring_back_archived(repo, manifest, archive_wait_hours, wait)
    loading = quality.preload()
    directory = staging.work_directory(settings.work_dir)
    try:
        archive = stage_backup(repo, settings, manifest, directory)
        if not quality.cores_spare(jobs or settings.restore_jobs):
            loading.join()  # overlap the download only: pg_restore gets the cores to itself
        restored = restore_into_new_database(server_url, settings, dbname, archive, jobs, no_owner,
                                             of or manifest.database, no_acl, tables)
    except PgdrError as exc:
        if is_backup_defect(exc):
            record_failed_verification(repo, manifest, str(exc), by)
        raise
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    try:
        if restored is None:
            result = validate_restore(server_url, dbname, manifest, jobs=jobs or settings.restore_jobs)
            record_verification(repo, manifest, result, by)
        else:
            result = validate_restore(server_url, dbname, manifest, selective.row_counts_of(
                manifest.row_counts, restored), jobs=jobs or settings.restore_jobs)
        if not result["success"]:
            raise VerificationFailed(
                f"restored {manifest.backup_id} does not match its manifest: "
                f"{quality.failure_summary(result)}", result)
        if properties:
            apply_database_properties(server_url, dbname, manifest, no_owner, no_acl)
    except BaseException:
        restoring.drop_quietly(server_url, dbname)
        raise
    return result


def safety_copy_recipient(encrypt_to: str | None, settings: Settings,
                           manifest: catalog.Manifest) -> str | None:
    """Who the pre-restore backup is encrypted to: the run's flag, the environment, or the
    recipient of the backup being restored (production data never lands in the repository
    less protected than the backup that replaces it)."""
    return encrypt_to or settings.encrypt_to or (manifest.encryption or {}).get("recipient_fingerprint")


def _restored(manifest: catalog.Manifest, result: dict[str, Any], target_url: str,
              clock: Stopwatch) -> Restored:
    """What every restore reports: backup, target, verification."""
    return {
        "backup_id": manifest.backup_id,
        "database": manifest.database,
        "target": dsn.display_dsn(target_url),
        "verified": result["success"],
        "row_counts": {t["table"]: t["observed"] for t in result["tables"]},
        "duration_seconds": round(clock.seconds, 3),
    }


@flow(name="restore", flow_run_name=run_name("restore-{db|target|$db}-into-{target|$db}"),
      log_prints=True, **FLOW_HOOKS)
def restore(backup_id: str = "latest", target: str | None = None, repo: str | None = None,
            db: str | None = None, jobs: int | None = None, no_owner: bool = False,
            pre_restore_backup: bool = True, encrypt_to: str | None = None,
            archive_wait_hours: float = 12.0, no_wait: bool = False, no_acl: bool = False,
            create_roles: bool = False, tables: list[str] | None = None,
            stop_writes_first: bool = False) -> RestoreResult:
    """Restore a backup into `target` (a database URL). A new database is restored
    directly; an existing one is replaced only after the restored copy validated, and is
    kept as `<db>_pre_restore_<ts>` (see rollback). The pre-restore backup is encrypted to
    `encrypt_to`, else PGDR_ENCRYPT_TO, else the restored backup's own recipient. A dump in
    an archive storage class is restored by S3 first, waited for up to archive_wait_hours
    (or, with no_wait, the run stops with when to retry). With `tables`, only those
    tables' rows are restored, and only into a new database. With stop_writes_first, an
    existing target refuses new connections (but pgdr's, a superuser's) and its sessions end
    before the pre-restore backup, until the swap or a failure: downtime rather than writes
    that only the old database holds."""
    settings = load_settings()
    target_url = target or settings.db_url
    if not target_url:
        raise ConfigError("no target given: pass --target URL")
    repo_url = repo or settings.repo_url
    repository = open_repo(repo_url, settings)
    target_db = dsn.database_name(target_url)
    clock = Stopwatch()
    with one_at_a_time(repository, target_url, "restore"):
        # The backup first: a wrong id or an empty repository is refused before the target
        # is touched; then what a killed run left on the target is repaired.
        manifest = find_backup(repository, backup_id, db, target_db)
        repaired = repair_target(target_url, target_db)
        with postgres.connect(target_url, dbname=restoring.admin_database(target_db)) as conn:
            exists = postgres.database_exists(conn, target_db)
        selected = None
        if tables:
            if exists:
                raise ConfigError(f"database {target_db} exists: --table restores into a new database only "
                                  "(use recover-table to bring tables back into an existing one)")
            selected = [(schema, table) for _key, schema, table
                        in recovery.requested_tables(tables, manifest.row_counts, manifest.partitioned)]
        kept_as = written = None
        with audited(repository, settings, "restore", type="full", source=manifest.backup_id,
                     destination=target_db, clock=clock) as step:
            try:
                incoming = restoring.derived_name(target_db, "restoring", catalog.utcnow())
                if not exists:
                    # Loaded under a scratch name: the real name appears only once validated.
                    result = restore_and_validate(repository, settings, manifest, target_url, incoming, jobs,
                                                  no_owner, by="restore",
                                                  archive_wait_hours=archive_wait_hours, wait=not no_wait,
                                                  of=target_db, properties=True, no_acl=no_acl,
                                                  create_roles=create_roles, tables=selected)
                else:
                    # Before the safety copy: a run that stops to wait for S3 leaves nothing behind.
                    bring_back_archived(repository, manifest, archive_wait_hours, not no_wait)
                    if stop_writes_first:
                        stop_writes(target_url, target_db)
                    before = restoring.rows_written(target_url, target_db)
                    if pre_restore_backup:
                        backup(db=dsn.strip_password(target_url), repo=repo_url, tier="pre-restore",
                               encrypt_to=safety_copy_recipient(encrypt_to, settings, manifest))
                    result = restore_and_validate(repository, settings, manifest, target_url, incoming, jobs,
                                                  no_owner, by="restore",
                                                  archive_wait_hours=archive_wait_hours, wait=not no_wait,
                                                  of=target_db, properties=True, no_acl=no_acl,
                                                  create_roles=create_roles)
                try:
                    kept_as = swap_into_place(target_url, target_db, incoming, manifest, replace=exists)
                except BaseException:
                    restoring.drop_quietly(target_url, incoming)  # not swapped in: the target is as it was
                    raise
                restoring.pause_point("swapped")
                if kept_as and pre_restore_backup:
                    written = writes_since_pre_restore_backup(target_url, target_db, kept_as, before)
                    if written is not None:
                        written["stopped_writes_first"] = stop_writes_first
            finally:
                if stop_writes_first and exists:
                    # Not swapped in (a failure, a SIGTERM): the old database takes connections again.
                    restoring.allow_writes_again(target_url, target_db)
            step.succeeded(size_bytes=manifest.size_bytes, previous_database=kept_as,
                           written_after_pre_restore_backup=written)
    publish_metrics(settings, manifest.database, RestoreDurationSeconds=clock.seconds)
    return {**_restored(manifest, result, target_url, clock), "previous_database": kept_as,
            "repaired": repaired, "written_after_pre_restore_backup": written}


@contextmanager
def one_at_a_time(repo: Repository, target_url: str, operation: str) -> Iterator[None]:
    """One restore or rollback of a target at a time, through the repository lock."""
    name = f"{dsn.host_key(target_url)}/{dsn.database_name(target_url)}"
    try:
        with database_lock(repo, name, operation, wait_seconds=0, area=RESTORE_LOCKS):
            yield
    except LockBusy:
        holder = lock_holder(repo, name, RESTORE_LOCKS) or {}
        raise PgdrError(
            f"a {holder.get('operation', 'restore')} of {dsn.display_dsn(target_url)} is running since "
            f"{holder.get('acquired_at', '?')} (on {holder.get('host', '?')}, pid {holder.get('pid', '?')}): "
            "wait for it to finish") from None


def writes_since_pre_restore_backup(target_url: str, target_db: str, kept_as: str,
                                    before: int | None) -> dict[str, Any] | None:
    """Rows written to the old database after its pre-restore backup began: they are in
    neither the backup nor the restored database, only in kept_as."""
    after = restoring.rows_written(target_url, kept_as)
    if before is None or after is None:
        return None
    rows = max(0, after - before)
    if rows:
        get_run_logger().warning("%d rows were written to %s after its pre-restore backup began: they are "
                                 "only in %s", rows, target_db, kept_as)
    return {"rows": rows, "only_in": kept_as}


@flow(name="repair", flow_run_name=run_name("repair-{target|$db}"), log_prints=True, **FLOW_HOOKS)
def repair(target: str | None = None) -> RepairResult:
    """Finish or clean up what a killed restore or rollback left on `target`'s server."""
    settings = load_settings()
    target_url = target or settings.db_url
    if not target_url:
        raise ConfigError("no target given: pass --target URL")
    target_db = dsn.database_name(target_url)
    done = repair_target(target_url, target_db)
    return {"target": dsn.display_dsn(target_url), "repaired": done}


@flow(name="restore-to-temp", flow_run_name=run_name("restore-to-temp-{db|backup_id}"),
      log_prints=True, **FLOW_HOOKS)
def restore_to_temp(backup_id: str = "latest", repo: str | None = None, db: str | None = None,
                    server: str | None = None, keep: bool = False, jobs: int | None = None,
                    no_owner: bool = False, archive_wait_hours: float = 12.0,
                    no_wait: bool = False, no_acl: bool = False,
                    create_roles: bool = False) -> TempRestoreResult:
    """Restore into a throwaway database on `server`, validate it, drop it unless kept
    (an archived dump: as restore)."""
    settings = load_settings()
    server_url = server or settings.db_url
    if not server_url:
        raise ConfigError("no server given: pass --server URL or set DATABASE_URL")
    repository = open_repo(repo or settings.repo_url, settings)
    clock = Stopwatch()
    manifest = find_backup(repository, backup_id, db)
    temp_db = restoring.derived_name(manifest.database, "temp", catalog.utcnow())
    with audited(repository, settings, "restore", type="temp", source=manifest.backup_id, destination=temp_db,
                 clock=clock) as step:
        result = restore_and_validate(repository, settings, manifest, server_url, temp_db, jobs, no_owner,
                                      by="restore-to-temp", archive_wait_hours=archive_wait_hours,
                                      wait=not no_wait, properties=True, no_acl=no_acl,
                                      create_roles=create_roles)
        if not keep:
            restoring.drop_quietly(server_url, temp_db)
        else:
            with postgres.connect(server_url, dbname=restoring.admin_database(temp_db),
                                  autocommit=True) as conn:
                tags.untag(conn, temp_db)  # kept on purpose: not a leftover
        step.succeeded(size_bytes=manifest.size_bytes, kept=keep)
    publish_metrics(settings, manifest.database, RestoreDurationSeconds=clock.seconds)
    return {**_restored(manifest, result, dsn.with_database(server_url, temp_db), clock),
            "temp_database": temp_db, "kept": keep}


@flow(name="rollback", flow_run_name=run_name("rollback-{target|$db}"), log_prints=True, **FLOW_HOOKS)
def rollback(target: str | None = None, repo: str | None = None) -> RollbackResult:
    """Undo the last restore of `target`: its pre-restore database takes the name back."""
    settings = load_settings()
    target_url = target or settings.db_url
    if not target_url:
        raise ConfigError("no target given: pass --target URL")
    target_db = dsn.database_name(target_url)
    clock = Stopwatch()
    repository = open_repo(repo or settings.repo_url, settings)
    with one_at_a_time(repository, target_url, "rollback"), \
            audited(repository, settings, "rollback", type="full", source="-", destination=target_db,
                    clock=clock) as step:
        repaired = repair_target(target_url, target_db)
        admin = restoring.admin_database(target_db)
        with postgres.connect(target_url, dbname=admin, autocommit=True) as conn:
            kept = tags.tagged_databases(conn, tags.PRE_RESTORE, target_db)
            undone = tags.tagged_databases(conn, "rolled-back", target_db)
        if not kept:
            already = (f" (the last restore was already rolled back: its database is kept as {undone[0][0]})"
                       if undone else "")
            raise PgdrError(f"no pre-restore copy of {target_db} to roll back to{already}")
        previous, tag = kept[0]
        step.source = previous
        now = catalog.utcnow()
        aside = restoring.derived_name(target_db, "rolled_back", now)
        restoring.swap_databases(target_url, target_db, previous, aside, {
            "pgdr": "rolled-back", "of": target_db, "at": catalog.iso(now),
            "restored": tag.get("replaced_by")})
    return {"target": dsn.display_dsn(target_url), "restored_from": previous, "set_aside_as": aside,
            "repaired": repaired, "duration_seconds": round(clock.seconds, 3)}
