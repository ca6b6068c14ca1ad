"""`pgdr`: the command line.

Commands that change something run their Prefect flow (recorded in the Prefect server
when PREFECT_API_URL is set); commands that only read, and the WAL commands, call plain
functions and never import Prefect. `--json` prints one JSON object on stdout and nothing
else there; errors are one line on stderr; the exit status is 0 only on success.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from tasks.errors import PgdrError, first_line, redact

Handler = Callable[[argparse.Namespace], dict[str, Any]]


# --- commands ---------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> dict[str, Any]:
    from flows.backup import backup

    return backup(db=_db(args), repo=args.repo, tier=args.tier, encrypt_to=args.encrypt_to)


def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    from tasks import catalog
    from tasks.repository import open_repository

    settings = _settings()
    repo = open_repository(args.repo or settings.repo_url, region=settings.aws_region)
    found = catalog.scan_backups(repo, args.db)
    backups = [{**m.summary(), "safety_copy": catalog.is_safety_copy(m),
                "storage_class": found.storage_classes.get(m.backup_id)} for m in found.backups]
    return {"repository": repo.url, "backups": backups, "damaged": [d.summary() for d in found.damaged]}


def cmd_restore(args: argparse.Namespace) -> dict[str, Any]:
    if args.physical:
        return _restore_physical(args)
    if not args.target:
        from tasks.errors import ConfigError

        raise ConfigError("--target URL is required (or --physical --datadir DIR for a whole server)")
    from flows.restore import restore

    return restore(backup_id=args.backup, target=_url(args.target), repo=args.repo, db=args.db,
                   jobs=args.jobs, no_owner=args.no_owner, pre_restore_backup=not args.no_pre_restore_backup,
                   encrypt_to=args.encrypt_to, archive_wait_hours=args.archive_wait_hours,
                   no_wait=args.no_wait, no_acl=args.no_acl, create_roles=args.create_roles,
                   tables=args.table, stop_writes_first=args.stop_writes_first)


def _restore_physical(args: argparse.Namespace) -> dict[str, Any]:
    """`restore --physical`: the whole server from a base backup and all its WAL (pitr
    without a target) into a new data directory."""
    from tasks.errors import ConfigError

    if not args.datadir:
        raise ConfigError("--physical needs --datadir DIR (a new directory for the restored server)")
    from flows.pitr import pitr

    args.show = show_pitr
    return pitr(datadir=str(Path(args.datadir).resolve()), repo=args.repo, db=args.db,
                backup_id=None if args.backup == "latest" else args.backup)


def cmd_restore_temp(args: argparse.Namespace) -> dict[str, Any]:
    from flows.restore import restore_to_temp

    return restore_to_temp(backup_id=args.backup, repo=args.repo, db=args.db, server=_url(args.server),
                           keep=args.keep, jobs=args.jobs, no_owner=args.no_owner,
                           archive_wait_hours=args.archive_wait_hours, no_wait=args.no_wait,
                           no_acl=args.no_acl, create_roles=args.create_roles)


def cmd_rollback(args: argparse.Namespace) -> dict[str, Any]:
    from flows.restore import rollback

    return rollback(target=_url(args.target), repo=args.repo)


def cmd_repair(args: argparse.Namespace) -> dict[str, Any]:
    from flows.restore import repair

    return repair(target=_url(args.target))


def show_repair(result: dict[str, Any]) -> None:
    for line in result["repaired"]:
        print(f"  {line}")
    print(f"{result['target']}: {'repaired' if result['repaired'] else 'nothing to repair'}")


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from flows.verify import verify

    return verify(repo=args.repo, db=args.db, max_age_hours=args.max_age_hours, server=_url(args.server))


def show_restore(result: dict[str, Any]) -> None:
    for line in result.get("repaired") or []:
        print(f"  first repaired: {line}")
    rows = sum(v or 0 for v in result["row_counts"].values())
    where = result.get("temp_database") or result["target"]
    print(f"Restored {result['backup_id']} into {where}: {len(result['row_counts'])} tables, {rows} rows, "
          f"verified: {'yes' if result['verified'] else 'NO'} ({result['duration_seconds']:.1f} s)")
    if result.get("previous_database"):
        print(f"  previous database kept as {result['previous_database']} (pgdr rollback undoes this)")
    written = result.get("written_after_pre_restore_backup")
    if written and written.get("stopped_writes_first"):
        print(f"  writes were stopped before the pre-restore backup: {written['rows']} rows written after it")
    elif written and written["rows"]:
        print(f"  {written['rows']} rows were written to the old database after its pre-restore backup "
              f"began: they are only in {written['only_in']}")
    if result.get("temp_database") and not result.get("kept"):
        print(f"  temporary database {result['temp_database']} dropped")


def show_rollback(result: dict[str, Any]) -> None:
    for line in result.get("repaired") or []:
        print(f"  first repaired: {line}")
    print(f"Rolled back {result['target']} to {result['restored_from']}; "
          f"the restored database is kept as {result['set_aside_as']}")


def show_verify(result: dict[str, Any]) -> None:
    _print_table(["DATABASE", "BACKUP", "AGE (H)", "RESULT"],
                 [[e["database"], e["backup_id"] or "-", e["age_hours"], "ok" if e["ok"] else e.get("reason")]
                  for e in result["databases"]])


def show_list(result: dict[str, Any]) -> None:
    backups, damaged = result["backups"], result["damaged"]
    if not backups and not damaged:
        print(f"No backups in {result['repository']}.")
        return
    _print_table(
        ["BACKUP", "DATABASE", "TIER", "FINISHED (UTC)", "SIZE", "ENCRYPTED", "STORAGE", "NOTE"],
        [[b["backup_id"], b["database"], b["tier"], b["finished_at"], _size(b["size_bytes"]),
          "yes" if b["encrypted"] else "no", b["storage_class"] or "-",
          "safety copy (restore by id)" if b["safety_copy"] else ""] for b in backups],
    )
    for entry in damaged:
        print(f"DAMAGED {entry['backup_id']} of {entry['database']}: {entry['reason']}")
    print(f"{len(backups)} backup(s) in {result['repository']}"
          + (f", {len(damaged)} DAMAGED (never restored, never latest)" if damaged else ""))


def show_backup(result: dict[str, Any]) -> None:
    rows = sum(result["row_counts"].values())
    print(f"Backup {result['backup_id']} of {result['database']} ({result['tier']}): "
          f"{_size(result['size_bytes'])}, {len(result['row_counts'])} tables, {rows} rows, "
          f"{result['duration_seconds']:.1f} s")
    print(f"  stored at {result['location']}")
    print(f"  sha256    {result['sha256']}")
    for warning in result.get("warnings") or []:
        print(f"  warning: {warning}")


def cmd_failover(args: argparse.Namespace) -> dict[str, Any]:
    from flows.failover import failover

    return failover(
        zone_id=args.zone_id, record_name=args.record_name, record_value=args.record_value,
        record_type=args.record_type, ttl=args.ttl, repo=args.repo, target=_url(args.target), db=args.db,
        health_urls=args.health_url, health_sql=args.health_sql, health_timeout_seconds=args.health_timeout,
        dry_run=args.dry_run, region=args.region, rds_source_instance=args.rds_source_instance,
        rds_target_instance=args.rds_target_instance, rds_from_snapshot=args.rds_from_snapshot,
        rds_instance_class=args.rds_instance_class, rds_subnet_group=args.rds_subnet_group,
        rds_timeout_minutes=args.rds_timeout_minutes, rds_poll_seconds=args.rds_poll_seconds,
        no_owner=args.no_owner, no_acl=args.no_acl, create_roles=args.create_roles,
        backup_id=args.backup, max_backup_age_hours=args.max_backup_age_hours, accept_stale=args.accept_stale,
        force_record_value=args.force_record_value)


def cmd_drill(args: argparse.Namespace) -> dict[str, Any]:
    from flows.drill import drill, process_started_at

    failover = None
    if args.with_failover_dry_run:
        if not (args.zone_id and args.record_name and args.record_value):
            from tasks.errors import ConfigError

            raise ConfigError("--with-failover-dry-run needs --zone-id, --record-name and --record-value")
        failover = {"zone_id": args.zone_id, "record_name": args.record_name,
                    "record_value": args.record_value, "record_type": args.record_type, "ttl": args.ttl,
                    "health_urls": args.health_url, "region": args.region}
        if args.failover_repo:
            failover["repo"] = args.failover_repo
    return drill(repo=args.repo, db=args.db, server=_url(args.server), scenario=args.scenario,
                 rto_target_minutes=args.rto_target_minutes, rpo_target_minutes=args.rpo_target_minutes,
                 health_sql=args.health_sql, failover=failover, backup_id=args.backup,
                 max_backup_age_hours=args.max_backup_age_hours, pitr=args.pitr,
                 started_at=process_started_at(), no_acl=args.no_acl, create_roles=args.create_roles)


def show_failover(result: dict[str, Any]) -> None:
    print(f"Failover{' (dry run)' if result['dry_run'] else ''} from {result['source']} "
          f"({result['selection']}) to {result['target']}: {result['rto_seconds']:.1f} s in total")
    for phase in result["phases"]:
        print(f"  {phase['name']:<24} {phase['duration_seconds']:>8.1f} s  {phase['detail']}")


def show_drill(result: dict[str, Any]) -> None:
    def minutes(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds / 60:.1f} min"

    targets = result["targets"]
    print(f"DR drill ({result['scenario']}) of {result['database']}, backup {result['backup_id']}: "
          f"{'all targets met' if result['ok'] else 'NEEDS ATTENTION'}")
    print(f"  RTO {minutes(result['rto_seconds'])} (target {targets['rto_minutes']:g} min), "
          f"RPO {minutes(result['rpo_seconds'])} (target {targets['rpo_minutes']:g} min)")
    for item in result["checklist"]:
        print(f"  [{ {True: 'x', False: '!', None: ' '}[item['done']] }] {item['label']}")
    for problem in result["missed"] + result["problems"]:
        print(f"  ! {problem}")
    print(f"  report: {result['report_key']} in {result['repository']}")


def cmd_files(args: argparse.Namespace) -> dict[str, Any]:
    from flows.files import files

    return files(paths=args.path, name=args.name, repo=args.repo, tier=args.tier,
                 encrypt_to=args.encrypt_to)


def cmd_restore_files(args: argparse.Namespace) -> dict[str, Any]:
    from flows.files import restore_files

    return restore_files(backup_id=args.backup, name=args.name, dest=args.dest, repo=args.repo,
                         overwrite=args.overwrite)


def show_files(result: dict[str, Any]) -> None:
    print(f"Files backup {result['backup_id']} of {result['name']} ({result['tier']}): "
          f"{result['files']} files, {_size(result['size_bytes'])} stored, "
          f"encrypted: {'yes' if result['encrypted'] else 'no'}, {result['duration_seconds']:.1f} s")
    print(f"  stored at {result['location']}")
    if result["skipped"]:
        print(f"  skipped {len(result['skipped'])} special files: {', '.join(result['skipped'][:5])}")


def show_restore_files(result: dict[str, Any]) -> None:
    print(f"Restored {result['backup_id']} of {result['name']} into {result['dest']}: "
          f"{result['files']} files ({_size(result['bytes'])}), {result['dirs']} directories, "
          f"{result['symlinks']} symlinks, every checksum verified")


def cmd_storage_snapshot(args: argparse.Namespace) -> dict[str, Any]:
    from flows.storage import storage_snapshot

    return storage_snapshot(source=args.source, repo=args.repo, tier=args.tier)


def cmd_storage_restore(args: argparse.Namespace) -> dict[str, Any]:
    from flows.storage import storage_restore

    return storage_restore(snapshot=args.snapshot, dest=args.dest, bucket=args.bucket, repo=args.repo,
                           overwrite=args.overwrite)


def show_storage_snapshot(result: dict[str, Any]) -> None:
    print(f"Snapshot {result['snapshot_id']} of s3://{result['bucket']}/{result['source_prefix']}: "
          f"{result['object_count']} objects ({_size(result['total_bytes'])}), {result['copied_count']} "
          f"copied ({_size(result['copied_bytes'])}), {result['duration_seconds']:.1f} s")
    print(f"  stored at {result['location']}")


def show_storage_restore(result: dict[str, Any]) -> None:
    print(f"Restored snapshot {result['snapshot_id']} of {result['bucket']} into {result['dest']}: "
          f"{result['object_count']} objects, {_size(result['bytes'])}")

def cmd_fleet(args: argparse.Namespace) -> dict[str, Any]:
    from flows.fleet import fleet
    from tasks.postgres import strip_password

    return fleet(action=args.action, databases=[strip_password(u) for u in args.db or []],
                 servers=[strip_password(u) for u in args.server or []], include=args.include,
                 exclude=args.exclude,
                 tier=args.tier, repo=args.repo, host_limit=args.host_limit, max_parallel=args.max_parallel,
                 deployment=args.deployment, local=args.local, verify_server=_url(args.verify_server))


def show_fleet(result: dict[str, Any]) -> None:
    rows = result["databases"]
    _print_table(["DATABASE", "SERVER", "STATUS", "SIZE", "SECONDS", "REASON"],
                 [[r["database"], r["server"], r["status"],
                   "-" if r["size_bytes"] is None else _size(r["size_bytes"]), r["duration_seconds"],
                   r["reason"] or ""] for r in rows])
    limits = ", ".join(f"{host}: {n}" for host, n in sorted(result["server_limits"].items()))
    print(f"Fleet {result['action']}: {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} ok "
          f"in {result['duration_seconds']:.0f} s (at most {limits} at once)")


def cmd_recover_table(args: argparse.Namespace) -> dict[str, Any]:
    from flows.recover_table import recover_table

    return recover_table(backup_id=args.backup, target=_url(args.target), tables=args.table, mode=args.mode,
                         where=args.where, dry_run=args.dry_run, repo=args.repo, db=args.db, jobs=args.jobs,
                         no_owner=args.no_owner)


def show_recover_table(result: dict[str, Any]) -> None:
    verb = "Would recover" if result["dry_run"] else "Recovered"
    print(f"{verb} {len(result['tables'])} table(s) from {result['backup_id']} into {result['target']} "
          f"({result['mode']}{', where ' + result['where'] if result['where'] else ''})")
    _print_table(["TABLE", "IN BACKUP", "PRESENT", "INSERTED", "UPDATED", "DELETED", "SIDE TABLE"],
                 [[t["table"], t["rows_in_backup"], *("-" if t[k] is None else t[k] for k in
                   ("rows_present", "rows_inserted", "rows_updated", "rows_deleted")), t["side_table"] or "-"]
                  for t in result["tables"]])
    for table in result["tables"]:
        for moved in table["sequences"]:
            print(f"  sequence {moved['sequence']} moved from {moved['from']} to {moved['to']}")
def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from flows.prune import prune

    return prune(repo=args.repo, db=args.db, tier=args.tier, dry_run=args.dry_run, area=args.area,
                 name=args.name, bucket=args.bucket, server=_url(args.server))


def cmd_replicate(args: argparse.Namespace) -> dict[str, Any]:
    from flows.replicate import replicate
    from tasks.errors import ConfigError

    if not args.all:
        raise ConfigError("pass --all to copy every backup, base backup, WAL file, files backup and storage "
                          "snapshot the replica lacks")
    return replicate(repo=args.repo, replica_repo=args.replica)


def show_replicate(result: dict[str, Any]) -> None:
    copied = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in result["copied"].items())
    print(f"Copied to {result['replica']}: {copied}")
    _show_replica_lag(result["lag"])


def _show_replica_lag(lag: dict[str, Any]) -> None:
    for entry in lag["databases"]:
        print(f"  {entry['database']}: {entry['missing_backups']} backup(s) and {entry['missing_wal_files']} "
              f"WAL file(s) not in the replica, lag {entry['lag_seconds'] / 3600:.2f} h")
    if lag["missing_files_backups"] or lag["missing_storage_snapshots"]:
        print(f"  {lag['missing_files_backups']} files backup(s) and "
              f"{lag['missing_storage_snapshots']} storage snapshot(s) not in the replica")


def show_prune(result: dict[str, Any]) -> None:
    rows = result["backups"]
    if rows:
        # OF: the database, the files backups' name, or the snapshotted bucket and prefix.
        _print_table(["BACKUP", "AREA", "OF", "TIER", "FINISHED (UTC)", "ACTION", "REASON"],
                     [[r["backup_id"], r["area"], r["database"] or "-", r["tier"] or "-",
                       r["finished_at"] or "-", r["action"], r["reason"]] for r in rows])
    for line in result.get("leftovers") or []:
        print(f"  {line}")
    counts = ", ".join(f"{n} {action}" for action, n in sorted(result["counts"].items())) or "nothing"
    print(f"{'Dry run: ' if result['dry_run'] else ''}{counts} in {result['repository']}")


def cmd_init_repo(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.bucket import init_s3_repository

    settings = _settings()
    return init_s3_repository(args.repo or settings.repo_url, sse=args.sse or settings.s3_sse,
                              kms_key_id=args.kms_key_id or settings.s3_kms_key_id,
                              lock_mode=args.object_lock_mode, lock_days=args.object_lock_days,
                              region=settings.aws_region, archive_after_days=args.archive_after_days,
                              retention_days=settings.retention_days)


def show_init_repo(result: dict[str, Any]) -> None:
    lock = result["object_lock"]
    lifecycle = result["lifecycle"] or {}
    print(f"{'Created and set up' if result['created_bucket'] else 'Set up'} {result['repository']}:")
    print(f"  versioning               {result['versioning']}")
    kms = result["encryption"]["kms_key_id"]
    print(f"  default encryption       {result['encryption']['sse']}{f' (key {kms})' if kms else ''}")
    print(f"  public access            {'blocked' if result['public_access_block'] else 'NOT blocked'}")
    print(f"  non-TLS requests         {'denied' if result['deny_insecure_transport'] else 'NOT denied'}")
    steps = ", ".join(f"{t['Days']} d {t['StorageClass']}" for t in lifecycle.get("transitions") or [])
    print(f"  lifecycle                {steps or 'none'}; deleted versions kept "
          f"{lifecycle.get('noncurrent_days')} d; no expiration (pgdr prune deletes)")
    locked = f"{lock['mode']} {lock['days']} d" if lock["mode"] else "off"
    print(f"  object lock              {locked}")
    for warning in result["warnings"]:
        print(f"  warning: {warning}")
def cmd_automations(args: argparse.Namespace) -> dict[str, Any]:
    from deployments import automations

    after = timedelta(seconds=args.zombie_after) if args.zombie_after else None
    return automations.apply(_settings(), zombie_after=after)


def show_automations(result: dict[str, Any]) -> None:
    for automation in result["automations"]:
        print(f"applied {automation['name']} ({automation['id']})")


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.repository import open_repository
    from tasks.status import repository_status

    settings = _settings()
    repo = open_repository(args.repo or settings.repo_url, region=settings.aws_region)
    result = repository_status(repo, args.db, server_url=args.server or settings.db_url)
    if settings.replica_repo_url and settings.replica_repo_url.rstrip("/") != repo.url.rstrip("/"):
        from tasks.catalog import utcnow
        from tasks.replica import replica_lag

        try:
            result["replica"] = replica_lag(repo, open_repository(settings.replica_repo_url,
                                                                  region=settings.aws_region), utcnow())
        except PgdrError as exc:  # the primary's status still stands
            result["replica"] = {"replica": settings.replica_repo_url, "error": str(exc)}
    return result


def show_status(result: dict[str, Any]) -> None:
    databases = result["databases"]
    if not databases:
        print(f"No backups in {result['repository']}.")
        return
    replica = result.get("replica")
    if replica and replica.get("error"):
        print(f"DR copy {replica['replica']}: UNREACHABLE: {replica['error']}")
    elif replica:
        print(f"DR copy {replica['replica']}: lag {replica['lag_seconds'] / 3600:.2f} h")
        _show_replica_lag(replica)
    _print_table(
        ["DATABASE", "LAST BACKUP", "AGE (H)", "SIZE", "STORAGE", "ITS VERIFICATION", "NEWEST VERIFIED"],
        [[d["database"], d["last_backup"] or "-", d["age_hours"] if d["age_hours"] is not None else "-",
          _size(d["size_bytes"]) if d["size_bytes"] is not None else "-", d["storage_class"] or "-",
          {"verified": "ok", "failed": "FAILED"}.get(d["last_backup_state"], d["last_backup_state"] or "-"),
          f"{d['verified_backup']} at {d['verified_at']}" if d["verified_backup"] else "none"]
         for d in databases],
    )
    for d in databases:
        if d["last_backup_reason"]:
            print(f"{d['database']}: verification of {d['last_backup']} FAILED: {d['last_backup_reason']}")
        for entry in d["damaged"]:
            print(f"{d['database']}: DAMAGED {entry['backup_id']}: {entry['reason']}")
    safety = result.get("safety_databases")
    if safety and safety["error"]:
        print(f"safety databases on {safety['server']}: not checked ({safety['error']})")
    elif safety:
        for kept in safety["databases"]:
            print(f"safety database {kept['name']} ({kept['role']} copy of {kept['of']}, {kept['at']}) "
                  f"on {safety['server']}")
# --- point-in-time recovery: WAL archive, base backups, pitr ------------------------------


class _CommandExit(PgdrError):
    """An error with a specific exit status (restore_command semantics); quiet ones print
    nothing."""

    def __init__(self, message: str, exit_status: int, quiet: bool = False) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.quiet = quiet


def _wal_target(args: argparse.Namespace, url: str | None = None) -> tuple[Any, Any, str]:
    """(settings, repository, database name) for the WAL commands: --db NAME, else
    PGDR_WAL_DB, else the database of the server's URL (DATABASE_URL)."""
    from tasks.repository import open_repository

    settings = _settings()
    database = (args.name if url else args.db) or settings.wal_db
    if not database and (url or settings.db_url):
        from tasks.postgres import database_name

        database = database_name(url or settings.db_url)
    if not database:
        from tasks.errors import ConfigError

        raise ConfigError("name the database the WAL belongs to: --db NAME, PGDR_WAL_DB or DATABASE_URL")
    repo = open_repository(args.repo or settings.repo_url, sse=settings.s3_sse,
                           kms_key_id=settings.s3_kms_key_id, region=settings.aws_region)
    return settings, repo, database


def cmd_wal_push(args: argparse.Namespace) -> dict[str, Any]:
    from tasks import wal

    settings, repo, database = _wal_target(args)
    options = {"encrypt_to": args.encrypt_to or settings.encrypt_to, "gpg_homedir": settings.gpg_homedir,
               "zstd_level": settings.zstd_level}
    if args.jobs > 1:
        if not args.spool:
            from tasks.errors import ConfigError

            raise ConfigError("--jobs above 1 needs --spool DIR (where pushes ahead are noted)")
        result = wal.push_ahead(repo, database, Path(args.path), Path(args.spool), args.jobs, **options)
    else:
        result = wal.push(repo, database, Path(args.path), **options)
    # Not copied to PGDR_REPLICA_REPO here: a second repository (an S3 client, ~1 s of CPU)
    # for every segment would undo the light push. `pgdr replicate --all` copies the WAL.
    return {"name": result.name, "key": result.key, "stored": result.stored, "size_bytes": result.size,
            "wal_bytes": result.wal_size, "database": database, "repository": repo.url}


def cmd_wal_fetch(args: argparse.Namespace) -> dict[str, Any]:
    from tasks import wal
    from tasks.errors import NotFoundError

    try:
        settings, repo, database = _wal_target(args)
        size = wal.fetch(repo, database, args.name, Path(args.path), gpg_homedir=settings.gpg_homedir,
                         passphrase=settings.gpg_passphrase)
    except NotFoundError as exc:
        # The end of the archive, as recovery expects to find it.
        raise _CommandExit(str(exc), wal.FETCH_NOT_FOUND, quiet=True) from None
    except Exception as exc:
        # Anything else must stop recovery rather than look like the end of the archive.
        reason = str(exc) if isinstance(exc, PgdrError) else f"{type(exc).__name__}: {exc}"
        raise _CommandExit(f"{first_line(reason)} (wal-fetch aborts recovery)",
                           wal.FETCH_ABORT_RECOVERY) from None
    return {"name": args.name, "path": args.path, "wal_bytes": size, "database": database}


def cmd_archive_status(args: argparse.Namespace) -> dict[str, Any]:
    from tasks import wal
    from tasks.basebackup import list_base_backups

    _, repo, database = _wal_target(args)
    backups = list_base_backups(repo, database)
    newest = backups[-1] if backups else None
    if newest is None:
        return wal.archive_status(repo, database)
    return wal.archive_status(repo, database, chain_start=newest.start_wal_file,
                              segment_size=newest.wal_segment_size)


def cmd_check(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.errors import FailedWithReport
    from tasks.pitr import check_archiving

    db_url = args.db or _settings().db_url
    if not db_url:
        from tasks.errors import ConfigError

        raise ConfigError("no database given: pass --db URL or set DATABASE_URL / DB_HOST")
    _, repo, database = _wal_target(args, db_url)
    result = check_archiving(db_url, repo, database, args.timeout, max_base_age_hours=args.max_base_age_hours)
    if not result["ok"]:
        raise FailedWithReport("; ".join(result["problems"]), result)
    return result


def cmd_wal_prune(args: argparse.Namespace) -> dict[str, Any]:
    from tasks import wal
    from tasks.basebackup import list_base_backups

    _, repo, database = _wal_target(args)
    kept = list_base_backups(repo, database)
    names = wal.prunable_segments((f.name for f in wal.archived_files(repo, database)),
                                  (b.start_wal_file for b in kept))
    if not args.dry_run and (failed := wal.delete_archived(repo, database, names)):
        raise PgdrError(f"{len(failed)} archived WAL files not deleted: {next(iter(failed.values()))}")
    return {"database": database, "base_backups": len(kept), "prunable": names,
            "deleted": 0 if args.dry_run else len(names), "dry_run": args.dry_run}


def cmd_basebackup(args: argparse.Namespace) -> dict[str, Any]:
    from flows.basebackup import basebackup

    return basebackup(db=_db(args), repo=args.repo, name=args.name, encrypt_to=args.encrypt_to,
                      fast_checkpoint=not args.spread_checkpoint, tier=args.tier)


def cmd_pitr(args: argparse.Namespace) -> dict[str, Any]:
    from datetime import datetime

    from tasks.errors import ConfigError

    try:
        target_time = datetime.fromisoformat(args.target_time) if args.target_time else None
    except ValueError:
        raise ConfigError(f"--target-time {args.target_time!r} is not an ISO 8601 time") from None
    if args.rds_source:
        from flows.pitr import rds_point_in_time_recovery

        if not args.rds_target:
            raise ConfigError("--rds-source needs --rds-target (the new instance's name)")
        return rds_point_in_time_recovery(args.rds_source, args.rds_target, target_time=target_time,
                                          instance_class=args.rds_instance_class)
    if not args.datadir:
        raise ConfigError("--datadir DIR is required (a new directory for the recovered server)")
    from flows.pitr import pitr

    return pitr(
        datadir=str(Path(args.datadir).resolve()), repo=args.repo, db=args.db, target_time=target_time,
        target_lsn=args.target_lsn, target_name=args.target_name, target_timeline=args.timeline,
        backup_id=args.backup, port=args.port, keep_running=not args.stop,
        timeout_seconds=args.timeout)


def show_nothing(result: dict[str, Any]) -> None:
    """archive_command and restore_command succeed silently."""


def show_archive_status(result: dict[str, Any]) -> None:
    if not result["last_segment"]:
        print(f"No WAL archived for {result['database']} in {result['repository']}.")
        return
    print(f"Last archived segment of {result['database']}: {result['last_segment']} at "
          f"{result['last_archived_at']} ({result['age_seconds']:.0f} s ago); "
          f"{result['segments']} segments in {result['repository']}")
    if result["missing_segments"]:
        print(f"GAP: {result['missing_segments']} segment(s) missing since {result['chain_start']}: "
              f"{', '.join(result['gaps'])}: recovery cannot pass the first one")


def show_check(result: dict[str, Any]) -> None:
    print(f"WAL archiving of {result['database']} works: {result['switched_segment']} reached "
          f"{result['repository']} in {result['archived_within_seconds']:.1f} s; no gap since base "
          f"backup {result['base_backup']} ({result['chain_start']}); newest segment "
          f"{result['age_seconds']:.0f} s old")


def show_wal_prune(result: dict[str, Any]) -> None:
    verb = "would delete" if result["dry_run"] else "deleted"
    print(f"{result['database']}: {verb} {len(result['prunable'])} archived WAL file(s) older than the "
          f"oldest of {result['base_backups']} base backup(s)")


def show_basebackup(result: dict[str, Any]) -> None:
    print(f"Base backup {result['backup_id']} of {result['database']}: {_size(result['size_bytes'])}, "
          f"WAL {result['start_lsn']} to {result['end_lsn']} on timeline {result['timeline']}")
    print(f"  stored at {result['location']}")


def show_pitr(result: dict[str, Any]) -> None:
    if "target_instance" in result:
        print(f"RDS instance {result['target_instance']} restored from {result['source_instance']} "
              f"to {result['restore_time']}: {result['status']}, endpoint {result['endpoint']}")
        return
    print(f"Recovered {result['database']} from {result['backup_id']} to {result['target']}: "
          f"{result['stopped']}")
    print(f"  last transaction replayed at {result['last_replayed_transaction_at']}, "
          f"WAL {result['end_lsn']}, timeline {result['timeline']}")
    state = f"running on port {result['port']}" if result["running"] else "stopped"
    print(f"  data directory {result['datadir']} ({state})")


# --- the parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgdr", description="Backup and disaster recovery "
                                     "for PostgreSQL, as Prefect flows.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help: str, show: Callable[[dict[str, Any]], None],
                runs_flow: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help, description=help)
        cmd.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        if runs_flow:
            cmd.add_argument("-v", "--verbose", action="store_true", help="show the flow's log on stderr")
        cmd.set_defaults(handler=handler, show=show, runs_flow=runs_flow)
        return cmd

    cmd = command("backup", cmd_backup, "back up a database into the repository", show_backup)
    cmd.add_argument("--db", help="database URL (default: DATABASE_URL or DB_HOST/DB_NAME/...)")
    cmd.add_argument("--repo", help="repository URL (default: PGDR_REPO, S3_BUCKET or BACKUP_DIR)")
    cmd.add_argument("--tier", default="manual", help="backup tier (default: manual)")
    cmd.add_argument("--encrypt-to", metavar="KEYID", help="gpg recipient to encrypt to")

    cmd = command("restore", cmd_restore, "restore a backup into a database (replacing it safely)",
                  show_restore)
    cmd.add_argument("backup", metavar="BACKUP", help="backup id, or latest")
    cmd.add_argument("--target", help="database URL to restore into")
    cmd.add_argument("--physical", action="store_true",
                     help="restore the whole server from a base backup (BACKUP: its id, or latest) and "
                          "its WAL to the end of the archive, into --datadir")
    cmd.add_argument("--datadir", help="with --physical: new data directory for the restored server")
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="database whose backup to restore (for latest)")
    cmd.add_argument("--jobs", type=int, help="pg_restore parallel jobs")
    cmd.add_argument("--no-owner", action="store_true", help="do not restore object ownership")
    cmd.add_argument("--no-pre-restore-backup", action="store_true",
                     help="skip the backup of the current database before replacing it")
    cmd.add_argument("--stop-writes-first", action="store_true",
                     help="refuse new connections to the existing target and end its sessions before "
                     "the pre-restore backup, until the swap (downtime rather than divergence; needs a "
                     "superuser, whose own sessions are not refused)")
    cmd.add_argument("--encrypt-to", metavar="KEYID", help="gpg recipient of the pre-restore backup "
                     "(default: PGDR_ENCRYPT_TO, else the restored backup's recipient)")
    _archive_arguments(cmd)
    _role_arguments(cmd)
    cmd.add_argument("--table", action="append", metavar="T",
                     help="restore only this table's rows (and its partitions'), with the backup's whole "
                     "schema, into a new database; repeat for several")

    cmd = command("restore-temp", cmd_restore_temp, "restore into a temporary database and validate it",
                  show_restore)
    cmd.add_argument("backup", metavar="BACKUP", help="backup id, or latest")
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="database whose backup to restore (for latest)")
    cmd.add_argument("--server", help="server URL for the temporary database (default: DATABASE_URL)")
    cmd.add_argument("--keep", action="store_true", help="keep the temporary database")
    _archive_arguments(cmd)
    cmd.add_argument("--jobs", type=int, help="pg_restore parallel jobs")
    cmd.add_argument("--no-owner", action="store_true", help="do not restore object ownership")
    _role_arguments(cmd)

    cmd = command("rollback", cmd_rollback, "undo the last restore of a database", show_rollback)
    cmd.add_argument("--target", required=True, help="database URL that was restored")
    cmd.add_argument("--repo", help="repository URL (for the audit record)")

    cmd = command("repair", cmd_repair, "finish or clean up what a killed restore or rollback left on a "
                  "database's server", show_repair)
    cmd.add_argument("--target", required=True, help="database URL that was being restored")

    cmd = command("verify", cmd_verify, "check the latest backups by restoring them", show_verify)
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="only this database")
    cmd.add_argument("--max-age-hours", type=float, default=26.0, help="oldest acceptable backup (26)")
    cmd.add_argument("--server", help="server URL for the test restore (default: DATABASE_URL)")

    cmd = command("failover", cmd_failover, "bring the database up in the DR region and switch DNS to it",
                  show_failover)
    cmd.add_argument("--repo", help="DR repository URL (default: PGDR_REPLICA_REPO, else PGDR_REPO)")
    cmd.add_argument("--target",
                     help="DR database URL to restore into (RDS: user and database for SQL checks)")
    cmd.add_argument("--db", metavar="NAME", help="database whose backup to restore")
    cmd.add_argument("--no-owner", action="store_true", help="do not restore object ownership")
    _role_arguments(cmd)
    _dns_arguments(cmd, required=True)
    cmd.add_argument("--health-sql", action="append", metavar="SQL",
                     help="SQL check on the restored database (passes only on a first row whose first value "
                     "is true); repeatable")
    cmd.add_argument("--health-timeout", type=float, default=10.0, help="seconds per health check (10)")
    cmd.add_argument("--dry-run", action="store_true",
                     help="change nothing: restore into a scratch database beside the target, check it, drop "
                     "it, and say what the DNS switch would be (RDS: only checks that need no instance)")
    cmd.add_argument("--backup", metavar="ID",
                     help="restore this backup (default: the newest whose checksum holds)")
    cmd.add_argument("--max-backup-age-hours", type=float, default=26.0,
                     help="refuse, before any change, a backup older than this (26)")
    cmd.add_argument("--accept-stale", action="store_true", help="restore a backup older than that anyway")
    cmd.add_argument("--force-record-value", action="store_true",
                     help="point the record at --record-value even if it does not name the checked database")
    cmd.add_argument("--rds-source-instance", metavar="ID",
                     help="RDS instance (or automated-backups ARN) to restore instead of a pgdr backup")
    cmd.add_argument("--rds-target-instance", metavar="ID", help="name of the restored RDS instance")
    cmd.add_argument("--rds-from-snapshot", action="store_true",
                     help="restore the newest automated snapshot instead of the latest restorable time")
    cmd.add_argument("--rds-instance-class", help="instance class of the restored instance")
    cmd.add_argument("--rds-subnet-group", help="DB subnet group in the DR region")
    cmd.add_argument("--rds-timeout-minutes", type=float, default=60.0, help="wait for the instance (60)")
    cmd.add_argument("--rds-poll-seconds", type=float, default=30.0, help="status poll interval (30)")

    cmd = command("drill", cmd_drill, "rehearse a recovery and measure RTO and RPO", show_drill)
    cmd.add_argument("--repo", help="repository URL (primary or DR)")
    cmd.add_argument("--db", metavar="NAME", help="database whose backup to restore")
    cmd.add_argument("--server", help="server URL for the scratch database (default: DATABASE_URL)")
    _role_arguments(cmd)
    cmd.add_argument("--scenario", default="database-corruption",
                     help="runbook scenario whose targets apply (database-corruption, accidental-deletion, "
                     "region-failure, ransomware)")
    cmd.add_argument("--rto-target-minutes", type=float, help="override the scenario's RTO target")
    cmd.add_argument("--rpo-target-minutes", type=float, help="override the scenario's RPO target")
    cmd.add_argument("--health-sql", action="append", metavar="SQL", help="SQL check on the restored copy")
    cmd.add_argument("--backup", metavar="ID",
                     help="restore this backup (default: what a failover would choose)")
    cmd.add_argument("--max-backup-age-hours", type=float, default=26.0,
                     help="a failover refuses older backups, so the drill fails on them (26)")
    cmd.add_argument("--pitr", action="store_true",
                     help="rehearse point-in-time recovery: newest base backup + WAL replayed to its end "
                     "(--db names the WAL area); RPO from the last replayed transaction")
    cmd.add_argument("--with-failover-dry-run", action="store_true",
                     help="also run the failover as a dry run (needs the DNS options)")
    cmd.add_argument("--failover-repo", help="DR repository for the failover dry run (default: --repo)")
    _dns_arguments(cmd, required=False)
    cmd = command("files", cmd_files, "back up files and directories into the repository", show_files)
    cmd.add_argument("--path", action="append", required=True, metavar="PATH",
                     help="file or directory to back up (repeatable)")
    cmd.add_argument("--name", required=True, help="name of this set of files, e.g. app-config")
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--tier", default="manual", help="backup tier (default: manual)")
    cmd.add_argument("--encrypt-to", metavar="KEYID", help="gpg recipient to encrypt to")

    cmd = command("restore-files", cmd_restore_files, "restore a files backup into a directory",
                  show_restore_files)
    cmd.add_argument("backup", metavar="BACKUP", help="backup id, or latest")
    cmd.add_argument("--name", required=True, help="name the files were backed up under")
    cmd.add_argument("--dest", required=True, metavar="DIR", help="directory to restore into")
    cmd.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    cmd.add_argument("--repo", help="repository URL")

    cmd = command("storage-snapshot", cmd_storage_snapshot,
                  "snapshot an S3 bucket or prefix into the (S3) repository", show_storage_snapshot)
    cmd.add_argument("--source", required=True, metavar="S3_URL", help="s3://bucket[/prefix] to snapshot")
    cmd.add_argument("--repo", help="repository URL (s3://...)")
    cmd.add_argument("--tier", default="manual", help="snapshot tier (default: manual)")

    cmd = command("storage-restore", cmd_storage_restore,
                  "copy every object of a storage snapshot into a bucket or prefix", show_storage_restore)
    cmd.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id, or latest")
    cmd.add_argument("--dest", required=True, metavar="S3_URL", help="s3://bucket[/prefix] to restore into")
    cmd.add_argument("--bucket", help="bucket the snapshot was taken of (for latest, with several)")
    cmd.add_argument("--overwrite", action="store_true", help="restore into a non-empty bucket or prefix")
    cmd.add_argument("--repo", help="repository URL (s3://...)")

    cmd = command("fleet", cmd_fleet, "back up (or verify) many databases, each as its own flow run, "
                  "at most --host-limit at once per server", show_fleet)
    cmd.add_argument("action", nargs="?", default="backup", choices=("backup", "verify"))
    cmd.add_argument("--db", action="append", metavar="URL",
                     help="a database of the fleet (repeat; default: PGDR_FLEET_DATABASES)")
    cmd.add_argument("--server", action="append", metavar="URL",
                     help="back up every database on this server (repeat; default: PGDR_FLEET_SERVERS); "
                     "templates are never taken")
    cmd.add_argument("--include", action="append", metavar="PATTERN",
                     help="only discovered databases matching this shell pattern (repeat)")
    cmd.add_argument("--exclude", action="append", metavar="PATTERN",
                     help="skip discovered databases matching this shell pattern (repeat)")
    cmd.add_argument("--tier", default="daily", help="backup tier (default: daily)")
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--host-limit", type=int, metavar="N",
                     help="runs at once per server (sets its limit; default: keep it, or PGDR_HOST_LIMIT "
                     "for a new one)")
    cmd.add_argument("--max-parallel", type=int, default=8, metavar="N",
                     help="runs at once in all (default 8)")
    cmd.add_argument("--deployment", metavar="FLOW/NAME",
                     help="deployment to run each database on (default backup/fleet or verify/fleet)")
    cmd.add_argument("--local", action="store_true",
                     help="run each database's flow in this process instead of on a work pool")
    cmd.add_argument("--verify-server", metavar="URL", help="server for verify's temporary databases")

    cmd = command("recover-table", cmd_recover_table,
                  "bring tables back from a backup without restoring the whole database", show_recover_table)
    cmd.add_argument("backup", metavar="BACKUP", help="backup id, or latest")
    cmd.add_argument("--target", required=True, help="database URL to recover into (the temporary "
                     "database goes on its server)")
    cmd.add_argument("--table", action="append", required=True, metavar="T",
                     help='table as written in SQL, e.g. public.orders or "Sales Data"."Order Items" '
                     "(repeat for several)")
    cmd.add_argument("--mode", default="missing-rows", choices=("missing-rows", "replace", "side-table"),
                     help="missing-rows (default): insert rows whose key is absent; replace: the table "
                     "becomes the backup's; side-table: load into <table>_recovered_<ts>")
    cmd.add_argument("--where", metavar="SQL", help="condition on the backup's rows (one SQL expression)")
    cmd.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="database whose backup to use (for latest)")
    cmd.add_argument("--jobs", type=int, help="pg_restore parallel jobs")
    cmd.add_argument("--no-owner", action="store_true", help="do not restore object ownership")
    cmd = command("prune", cmd_prune, "delete backups, files backups and storage snapshots past their "
                  "tier's retention", show_prune)
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--area", choices=("database", "files", "storage", "pitr"),
                     help="only database backups, files backups, storage snapshots or base backups and "
                          "WAL (pitr) (default: all)")
    cmd.add_argument("--db", metavar="NAME", help="only this database")
    cmd.add_argument("--name", help="only the files backups of this name")
    cmd.add_argument("--bucket", help="only the storage snapshots of this bucket")
    cmd.add_argument("--tier", help="only this tier (the floors still count every tier)")
    cmd.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    cmd.add_argument("--server", metavar="URL", help="server whose safety databases (<db>_pre_restore_*, "
                     "<db>_rolled_back_*) to prune too (default: DATABASE_URL)")

    cmd = command("replicate", cmd_replicate, "copy to the DR repository (PGDR_REPLICA_REPO) whatever it "
                  "lacks", show_replicate)
    cmd.add_argument("--all", action="store_true",
                     help="every database backup, base backup, WAL file, files backup and storage snapshot")
    cmd.add_argument("--repo", help="repository to copy from (default: PGDR_REPO)")
    cmd.add_argument("--replica", metavar="URL", help="DR repository (default: PGDR_REPLICA_REPO)")

    cmd = command("automations", cmd_automations, "apply the server-side alerts (failed or crashed runs, "
                  "dead workers, no backup for 26 hours) to the Prefect server", show_automations,
                  runs_flow=False)
    cmd.add_argument("action", choices=["apply"], help="create or replace every pgdr automation")
    cmd.add_argument("--zombie-after", type=float, metavar="SECONDS",
                     help="mark a run Crashed after this long without a heartbeat "
                          "(default: 3 x PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")

    cmd = command("init-repo", cmd_init_repo, "create and harden the S3 bucket of a repository",
                  show_init_repo, runs_flow=False)
    cmd.add_argument("--repo", help="repository URL (s3://bucket/prefix)")
    cmd.add_argument("--sse", choices=["AES256", "aws:kms"], help="default encryption (AES256)")
    cmd.add_argument("--kms-key-id", metavar="ID", help="KMS key for aws:kms")
    cmd.add_argument("--object-lock-mode", choices=["GOVERNANCE", "COMPLIANCE"],
                     help="default Object Lock retention mode (creates the bucket with Object Lock)")
    cmd.add_argument("--object-lock-days", type=int, metavar="N", help="default Object Lock retention days")
    cmd.add_argument("--archive-after-days", type=int, metavar="N",
                     help="move objects to GLACIER after N days (restoring them then waits hours; "
                     "default: never, only STANDARD_IA after 30 days)")
    cmd = command("status", cmd_status, "last backup, its age and size, and last verification per database",
                  show_status, runs_flow=False)
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="only this database")
    cmd.add_argument("--server", metavar="URL", help="also list the safety databases restores left on this "
                     "server (default: DATABASE_URL)")
    cmd = command("wal-push", cmd_wal_push, "archive one WAL file (PostgreSQL's archive_command)",
                  show_nothing, runs_flow=False)
    cmd.add_argument("path", metavar="PATH", help="the WAL file (%%p)")
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="database name the WAL is archived under")
    cmd.add_argument("--encrypt-to", metavar="KEYID", help="gpg recipient to encrypt to")
    cmd.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="push up to N-1 more segments PostgreSQL marked ready, in parallel (1)")
    cmd.add_argument("--spool", metavar="DIR",
                     help="where pushes ahead are noted (with --jobs; writable by the postgres user)")

    cmd = command("wal-fetch", cmd_wal_fetch,
                  "restore one archived WAL file (PostgreSQL's restore_command)",
                  show_nothing, runs_flow=False)
    cmd.add_argument("name", metavar="NAME", help="the WAL file name (%%f)")
    cmd.add_argument("path", metavar="PATH", help="where to write it (%%p)")
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="database name the WAL is archived under")

    cmd = command("archive-status", cmd_archive_status, "the last archived WAL segment and its age",
                  show_archive_status, runs_flow=False)
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="database name the WAL is archived under")

    cmd = command("check", cmd_check, "check WAL archiving end to end: switch WAL, wait until that segment "
                  "is stored, find no gap since the newest base backup", show_check, runs_flow=False)
    cmd.add_argument("--db", help="database URL of the server (default: DATABASE_URL)")
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--name", help="database name the WAL is archived under "
                                    "(default: PGDR_WAL_DB or the URL's)")
    cmd.add_argument("--timeout", type=float, default=60.0,
                     help="seconds to wait for the switched segment to be archived (60)")
    cmd.add_argument("--max-base-age-hours", type=float, default=26.0, metavar="H",
                     help="fail when the newest base backup is older (26)")

    cmd = command("wal-prune", cmd_wal_prune, "delete archived WAL older than the oldest base backup",
                  show_wal_prune, runs_flow=False)
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="database name the WAL is archived under")
    cmd.add_argument("--dry-run", action="store_true", help="only list what would be deleted")

    cmd = command("basebackup", cmd_basebackup, "take a physical base backup for point-in-time recovery",
                  show_basebackup)
    cmd.add_argument("--db", help="database URL of the server (default: DATABASE_URL)")
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--name", help="database name to file it under (default: PGDR_WAL_DB or the URL's)")
    cmd.add_argument("--encrypt-to", metavar="KEYID", help="gpg recipient to encrypt to")
    cmd.add_argument("--spread-checkpoint", action="store_true",
                     help="wait for a spread checkpoint instead of forcing a fast one")
    cmd.add_argument("--tier", default="hot", help="retention tier of the base backup (hot)")

    cmd = command("pitr", cmd_pitr, "recover to a point in time into a new data directory (or RDS instance)",
                  show_pitr)
    cmd.add_argument("--datadir", help="new data directory for the recovered server")
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="database name the backups and WAL are filed under")
    targets = cmd.add_mutually_exclusive_group()
    targets.add_argument("--target-time", metavar="TIME", help="ISO 8601 time with zone (2026-01-28T02:00Z)")
    targets.add_argument("--target-lsn", metavar="LSN", help="WAL position, e.g. 0/3000060")
    targets.add_argument("--target-name", metavar="NAME", help="restore point (pg_create_restore_point)")
    cmd.add_argument("--timeline", help="recovery_target_timeline (default: latest)")
    cmd.add_argument("--backup", metavar="ID", help="base backup id (default: newest before the target)")
    cmd.add_argument("--port", type=int, help="port for the recovered server (default: a free one)")
    cmd.add_argument("--stop", action="store_true", help="stop the server once recovered")
    cmd.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for recovery (3600)")
    cmd.add_argument("--rds-source", metavar="ID", help="RDS: restore this instance instead")
    cmd.add_argument("--rds-target", metavar="ID", help="RDS: name of the new instance")
    cmd.add_argument("--rds-instance-class", metavar="CLASS", help="RDS: instance class of the new instance")

    cmd = command("list", cmd_list, "list complete backups", show_list, runs_flow=False)
    cmd.add_argument("--repo", help="repository URL")
    cmd.add_argument("--db", metavar="NAME", help="only this database")
    return parser


def _archive_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--archive-wait-hours", type=float, default=12.0, metavar="H",
                     help="a dump in GLACIER/DEEP_ARCHIVE: wait up to H hours for S3 to restore it (12)")
    cmd.add_argument("--no-wait", action="store_true",
                     help="a dump in GLACIER/DEEP_ARCHIVE: request its restore, exit 3 saying when to retry")
def _role_arguments(cmd: argparse.ArgumentParser) -> None:
    """What a restore does about roles the server lacks (see README: a whole database)."""
    cmd.add_argument("--no-acl", action="store_true", help="do not restore privileges (GRANT/REVOKE)")
    cmd.add_argument("--create-roles", action="store_true",
                     help="create the roles the backup needs and the server lacks (without passwords)")


def _dns_arguments(cmd: argparse.ArgumentParser, required: bool) -> None:
    cmd.add_argument("--zone-id", required=required, help="Route53 hosted zone id")
    cmd.add_argument("--record-name", required=required, help="DNS name clients connect to")
    cmd.add_argument("--record-type", default="CNAME", help="record type (CNAME)")
    cmd.add_argument("--record-value",
                     help="new record value; must name the checked database's host (default: that host; "
                     "RDS: the new endpoint)")
    cmd.add_argument("--ttl", type=int, default=60, help="record TTL in seconds (60)")
    cmd.add_argument("--health-url", action="append", metavar="URL",
                     help="HTTP URL that must answer 2xx before DNS is switched; repeatable")
    cmd.add_argument("--region", help="AWS region of the DR side (default: AWS_REGION)")


# --- plumbing ---------------------------------------------------------------------------


def _settings() -> Any:
    from tasks.settings import load_settings

    return load_settings()


def _db(args: argparse.Namespace) -> str | None:
    """The --db URL without its password: the password stays in this process and out of
    the flow's parameters, which Prefect stores."""
    return _url(getattr(args, "db", None) or _settings().db_url)


def _url(url: str | None) -> str | None:
    """A database URL without its password (kept in this process only)."""
    from tasks.postgres import strip_password

    return strip_password(url) if url else None


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TB"


def _print_table(headers: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _terminal_progress() -> None:
    """A progress line on stderr while a flow runs, when a person is watching."""
    if not sys.stderr.isatty():
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    from flows.steps import add_progress_listener

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), transient=True, console=None)
    tasks: dict[str, Any] = {}

    def listener(label: str, done: int, total: int | None) -> None:
        if done < 0:
            if label in tasks:
                bar.remove_task(tasks.pop(label))
            if not tasks:
                bar.stop()
            return
        if label not in tasks:
            bar.start()
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=min(done, total) if total else done)

    add_progress_listener(listener)


@contextlib.contextmanager
def _quiet_console(verbose: bool) -> Iterator[None]:
    """While a flow runs for the command line, Prefect's console log stays off stderr
    (its records still reach the Prefect server): the person sees a progress bar and one
    result or error line, never a traceback. --verbose shows the log, still without
    tracebacks."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # Prefect 3.8 adds its console handler lazily, at the first run

    class NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.exc_info = None
            record.exc_text = None
            return verbose and record.levelno >= logging.INFO

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    quiet = NoTraceback()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _secrets() -> list[str]:
    try:
        secrets: list[str] = _settings().secrets()
        return secrets
    except PgdrError:
        return []


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled flow run, a stopped container): unwind like Ctrl-C so that
    child processes are killed and an unfinished upload is aborted, not left behind."""


def _on_sigterm(signum: int, frame: object) -> None:
    from tasks.process import defer_termination, kill_running_pipelines

    if defer_termination():
        return  # a step that must not stop half-way (a swap) is running: it ends, then this
    kill_running_pipelines()  # pg_dump & co. run in sessions of their own: stop them first
    raise _Terminated()


def _exit_without_teardown(status: list[int]) -> None:
    """Last of the `pgdr` process's exit handlers, so after Prefect's (which send the
    run's last logs and events): exit with main's status without tearing the interpreter
    down, which costs about half a second of CPU once Prefect is loaded and saves nothing
    (every file and upload is complete by then)."""
    if not status:
        return  # main did not return: let Python report what happened
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status[0])


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the pgdr command itself, not a caller in Python
        status: list[int] = []
        atexit.register(_exit_without_teardown, status)  # registered first, runs last
        status.append(main(sys.argv[1:]))
        return status[0]
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL Prefect starts a temporary server; on a busy machine it needs
    # longer than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        if args.runs_flow and not args.json:
            _terminal_progress()
        if args.runs_flow:
            if not args.verbose:
                # Also for the logging setup a temporary Prefect server redoes at its start.
                os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
            with _quiet_console(args.verbose):
                result = args.handler(args)
        else:
            result = args.handler(args)
    except PgdrError as exc:
        details = getattr(exc, "details", None)
        if args.json and details is not None:
            sys.stdout.write(json.dumps(details, sort_keys=True, default=str) + "\n")
        if not getattr(exc, "quiet", False):
            print(f"pgdr: error: {redact(str(exc), _secrets())}", file=sys.stderr)
        return getattr(exc, "exit_status", 1)
    except _Terminated:
        print("pgdr: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("pgdr: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected fault: one line, still no secret
        if os.environ.get("PGDR_DEBUG"):
            raise
        message = first_line(f"{type(exc).__name__}: {exc}", _secrets())
        print(f"pgdr: error: {message}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(result, sort_keys=True, default=str) + "\n")
    else:
        args.show(result)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
