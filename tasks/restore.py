"""The Prefect tasks of flows/restore.py: its steps, with their retries, timeouts and tags."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from pgdr.catalog import catalog, verification
from pgdr.catalog.index import resolve_backup
from pgdr.ops.errors import ConfigError
from pgdr.ops.settings import Settings
from pgdr.pipeline.crypto import resolve_passphrase
from pgdr.pipeline.dump import fetch_dump
from pgdr.postgres import database as whole_database
from pgdr.postgres import dsn, postgres
from pgdr.restore import quality, selective, staging, tags
from pgdr.restore import restore as restoring
from pgdr.storage.repository import Repository
from tasks.artifacts import Progress, artifact_key, human_bytes, publish_markdown
from tasks.policy import retrying


@task(name="find backup", **retrying(2, 5))
def find_backup(repo: Repository, selector: str, database: str | None,
                target_database: str | None = None) -> catalog.Manifest:
    manifest = resolve_backup(repo, selector, database, target_database)
    get_run_logger().info("backup %s of %s (%s, %s)", manifest.backup_id, manifest.database,
                          manifest.finished_at, human_bytes(manifest.size_bytes))
    return manifest


@task(name="bring back archived dump", cache_policy=NONE)  # a Repository is no cache key
def bring_back_archived(repo: Repository, manifest: catalog.Manifest, wait_hours: float,
                        wait: bool) -> str | None:
    """A dump that lifecycle moved to GLACIER or DEEP_ARCHIVE is restored by S3 first:
    waited for (with progress), or NotReadyYet (exit 3) saying when to retry."""
    return staging.wait_until_readable(
        repo, f"{manifest.prefix}/{manifest.data_key}", wait_hours=wait_hours,
        wait=wait, report=get_run_logger().warning)


@task(name="stage backup", **retrying(2, 5))
def stage_backup(repo: Repository, settings: Settings, manifest: catalog.Manifest, directory: Path) -> Path:
    """Verify the stored bytes' checksum while decoding them into one local file; nothing
    reaches PostgreSQL unless the checksum matched."""
    staging.check_free_space(directory, manifest.dump_bytes)
    archive = directory / f"{manifest.backup_id}.dump"
    with Progress(f"fetch {manifest.backup_id}", manifest.size_bytes) as progress:
        fetch_dump(
            repo, f"{manifest.prefix}/{manifest.data_key}", archive,
            size=manifest.size_bytes, sha256=manifest.sha256, encrypted=manifest.encryption is not None,
            gpg_homedir=settings.gpg_homedir,
            passphrase=resolve_passphrase(settings.gpg_passphrase, settings.gpg_passphrase_block),
            secrets=settings.secrets(), progress=lambda received, _decoded: progress.update(received),
        )
    return archive


# Tagged so that operators can cap concurrent restores: `prefect concurrency-limit create pg_restore 2`.
@task(name="restore into new database", tags=["pg_restore"], timeout_seconds=24 * 3600)
def restore_into_new_database(server_url: str, settings: Settings, dbname: str, archive: Path,
                              jobs: int | None, no_owner: bool, of: str | None = None,
                              no_acl: bool = False, tables: list[selective.Relation] | None = None
                              ) -> set[selective.Relation] | None:
    """CREATE DATABASE (closed to PUBLIC) + pg_restore -j; the new database is dropped if
    anything fails, and tagged as this run's (for `of`), so that the next run drops it if
    this one is killed. With `tables`, only their rows (and their partitions'), in the
    backup's schema: returns the tables whose rows were restored (None: the whole backup)."""
    with postgres.connect(server_url, dbname=restoring.admin_database(dbname), autocommit=True) as conn:
        if postgres.database_exists(conn, dbname):
            raise ConfigError(f"database {dbname} already exists")
        postgres.create_database(conn, dbname)
        tags.tag_as_restoring(conn, dbname, of or dbname)
        whole_database.close_to_public(conn, dbname)
    try:
        if tables:
            return selective.restore_tables(server_url, dbname, archive, tables,
                                            jobs=jobs or settings.restore_jobs, no_owner=no_owner,
                                            secrets=settings.secrets())
        staging.pg_restore(server_url, dbname, archive, jobs=jobs or settings.restore_jobs,
                             no_owner=no_owner, no_acl=no_acl, secrets=settings.secrets())
    except BaseException:
        restoring.drop_quietly(server_url, dbname)
        raise
    return None


@task(name="validate restore")
def validate_restore(server_url: str, dbname: str, manifest: catalog.Manifest,
                     row_counts: dict[str, int] | None = None, jobs: int = 1) -> dict[str, Any]:
    """great-expectations: every table's row count equals the manifest's (or, for a restore
    of some tables, `row_counts`: the manifest's for those); and so does its content digest
    (computed on `jobs` connections)."""
    expected = manifest.row_counts if row_counts is None else row_counts
    result = quality.validate_row_counts(dsn.with_database(server_url, dbname), expected,
                                         manifest.digests, known_tables=manifest.row_counts, jobs=jobs)
    result.update(backup_id=manifest.backup_id, database=dbname, verified_at=catalog.iso(catalog.utcnow()))
    rows = [[t["table"], t["expected"], t["observed"], "ok" if t["success"] else "FAILED"]
            for t in result["tables"]]
    from tasks.artifacts import markdown_table

    publish_markdown(
        artifact_key("validation", manifest.database),
        f"## Restore validation of {manifest.backup_id}\n\n"
        f"**{'passed' if result['success'] else 'FAILED'}** "
        f"({result['statistics']['evaluated']} tables, {result['engine']})\n\n"
        + markdown_table(["table", "expected rows", "restored rows", "result"], rows),
        f"Row counts of {dbname} against the manifest of {manifest.backup_id}",
    )
    return result


@task(name="apply database properties")
def apply_database_properties(server_url: str, dbname: str, manifest: catalog.Manifest, no_owner: bool,
                              no_acl: bool) -> None:
    """The backed-up database's owner, ACL, connection limit, settings and comment, given to
    the restored database while it still has a name of its own (before any swap)."""
    if manifest.database_properties is None:
        get_run_logger().warning("backup %s predates database properties: %s gets PostgreSQL's defaults",
                                 manifest.backup_id, dbname)
        with postgres.connect(server_url, dbname=restoring.admin_database(dbname), autocommit=True) as conn:
            whole_database.open_to_public(conn, dbname)
        return
    with postgres.connect(server_url, dbname=restoring.admin_database(dbname), autocommit=True) as conn:
        skipped = whole_database.apply_properties(conn, dbname, manifest.database_properties,
                                                  owner=not no_owner, acl=not no_acl, comment=False)
        # The comment goes into pgdr's tag: the swap (or keeping a temp database) puts it in place.
        tags.remember_comment(conn, dbname, manifest.database_properties["comment"])
    for what in skipped:
        get_run_logger().warning("setting %s not applied: the role does not exist on this server", what)


@task(name="check roles")
def check_roles(server_url: str, dbname: str, manifest: catalog.Manifest, no_owner: bool, no_acl: bool,
                create_roles: bool) -> list[str]:
    """Before anything changes: the server must have every tablespace the backup uses and
    every role it needs (owners, grantees, policy roles), or create the roles with
    `create_roles`. Returns the roles created."""
    if manifest.globals is None:
        return []
    needed = whole_database.needed_roles(manifest.globals["roles"], no_owner=no_owner, no_acl=no_acl)
    with postgres.connect(server_url, dbname=restoring.admin_database(dbname), autocommit=True) as conn:
        spaces = whole_database.missing_tablespaces(conn, manifest.globals.get("tablespaces", []))
        if spaces:
            raise ConfigError(f"{dsn.host_key(server_url)} lacks the tablespace(s) {', '.join(spaces)} "
                              f"that backup {manifest.backup_id} uses: create them first (CREATE TABLESPACE)")
        missing = needed - whole_database.existing_roles(conn, sorted(needed))
        if not missing:
            return []
        if not create_roles:
            raise ConfigError(
                f"{dsn.host_key(server_url)} lacks the role(s) {', '.join(sorted(missing))} that backup "
                f"{manifest.backup_id} needs: pass --create-roles to create them from the backup (without "
                "passwords), or --no-owner --no-acl to restore without owners and grants")
        created = whole_database.create_roles(conn, manifest.globals["role_statements"], missing)
    get_run_logger().info("created role(s) %s from backup %s", ", ".join(created), manifest.backup_id)
    return created


@task(name="record verification", **retrying(3, 2))
def record_verification(repo: Repository, manifest: catalog.Manifest,
                        result: dict[str, Any], by: str) -> None:
    """Append the result to verified.json beside the manifest (never rewriting the manifest)."""
    # Which manifest was verified, byte for byte (the bytes this run read and restored from):
    # a manifest replaced later is not this one.
    manifest_sha256 = (manifest.read_sha256
                       or hashlib.sha256(repo.get_bytes(manifest.manifest_key)).hexdigest())
    entry = {"by": by, "success": result["success"], "at": result["verified_at"],
             "statistics": result["statistics"], "tables": result["tables"],
             "manifest_sha256": manifest_sha256}
    if not result["success"]:
        entry["reason"] = f"row counts differ: {quality.failure_summary(result)}"
    verification.append_verification(repo, manifest, entry)


@task(name="record failed verification", **retrying(3, 2))
def record_failed_verification(repo: Repository, manifest: catalog.Manifest,
                               reason: str, by: str) -> None:
    """A backup whose bytes or restore failed is recorded as failed, with the reason, exactly
    like one that passed: status, prune and failover then stop counting it as good."""
    verification.append_verification(repo, manifest, {
        "by": by, "success": False, "at": catalog.iso(catalog.utcnow()), "reason": reason})


@task(name="swap into place")
def swap_into_place(server_url: str, target: str, incoming: str, manifest: catalog.Manifest,
                    replace: bool = True) -> str | None:
    """The validated database takes the target's name; the old one (when there is one,
    `replace`) is kept as `<target>_pre_restore_<ts>`, which is returned."""
    restoring.pause_point("validated")
    now = catalog.utcnow()
    keep_as = restoring.derived_name(target, "pre_restore", now) if replace else None
    restoring.swap_databases(server_url, target, incoming, keep_as, {
        "pgdr": "pre-restore", "of": target, "at": catalog.iso(now), "replaced_by": manifest.backup_id})
    get_run_logger().info("%s now holds backup %s; the previous database is kept as %s",
                          target, manifest.backup_id, keep_as or "(none: it is new)")
    return keep_as


@task(name="stop writes")
def stop_writes(target_url: str, target_db: str) -> None:
    """--stop-writes-first: new connections refused, sessions ended, before the pre-restore
    backup (the restore's end, a failure or the next pgdr opens the target again)."""
    restoring.stop_writes(target_url, target_db)
    get_run_logger().warning("%s refuses new connections until the restore ends", target_db)
    restoring.pause_point("writes-stopped")


@task(name="repair target")
def repair_target(target_url: str, target_db: str) -> list[str]:
    """What a killed pgdr left on the target's server: an interrupted swap is finished,
    scratch databases of runs that are gone are dropped (one line each in the report)."""
    done = restoring.repair_target(target_url, target_db)
    for line in done:
        get_run_logger().warning("%s", line)
    return done
