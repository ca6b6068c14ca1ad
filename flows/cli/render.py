"""How each command's result reads for a person (without --json): a few lines, and
tables through rich. Every function takes the dict that --json prints."""

from __future__ import annotations

import sys
from typing import Any


def size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TB"


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Columns separated by two spaces. On a terminal long cells wrap to its width; in a
    pipe or a file nothing wraps, so every value stays whole for grep."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, box=None, pad_edge=False, show_edge=False, header_style="bold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    natural = sum(max(len(str(c)) for c in column) + 2 for column in zip(headers, *rows, strict=False))
    width = None if sys.stdout.isatty() else max(natural, 80)
    console = Console(file=sys.stdout, width=width, markup=False, highlight=False, emoji=False)
    with console.capture() as captured:
        console.print(table)
    print("\n".join(line.rstrip() for line in captured.get().splitlines()))


def show_repair(result: dict[str, Any]) -> None:
    for line in result["repaired"]:
        print(f"  {line}")
    print(f"{result['target']}: {'repaired' if result['repaired'] else 'nothing to repair'}")


def show_restore(result: dict[str, Any]) -> None:
    if "datadir" in result:  # restore --physical
        show_pitr(result)
        return
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
    print_table(["DATABASE", "BACKUP", "AGE (H)", "RESULT"],
                 [[e["database"], e["backup_id"] or "-", e["age_hours"], "ok" if e["ok"] else e.get("reason")]
                  for e in result["databases"]])


def show_list(result: dict[str, Any]) -> None:
    backups, damaged = result["backups"], result["damaged"]
    if not backups and not damaged and not result.get("base_backups"):
        print(f"No backups in {result['repository']}.")
        return
    print_table(
        ["BACKUP", "DATABASE", "TIER", "FINISHED (UTC)", "SIZE", "ENCRYPTED", "STORAGE", "NOTE"],
        [[b["backup_id"], b["database"], b["tier"], b["finished_at"], size(b["size_bytes"]),
          "yes" if b["encrypted"] else "no", b["storage_class"] or "-",
          "safety copy (restore by id)" if b["safety_copy"] else ""] for b in backups],
    )
    for entry in damaged:
        print(f"DAMAGED {entry['backup_id']} of {entry['database']}: {entry['reason']}")
    if result.get("base_backups"):
        print("Base backups (point-in-time recovery):")
        print_table(["BACKUP", "DATABASE", "KIND", "FINISHED (UTC)", "SIZE"],
                    [[b["backup_id"], b["database"], _kind(b), b["finished_at"], size(b["size_bytes"])]
                     for b in result["base_backups"]])
    for name in result.get("base_backups_unreadable") or []:
        print(f"UNREADABLE base backup manifest(s) of {name}")
    print(f"{len(backups)} backup(s) in {result['repository']}"
          + (f", {len(damaged)} DAMAGED (never restored, never latest)" if damaged else ""))


def show_backup(result: dict[str, Any]) -> None:
    rows = sum(result["row_counts"].values())
    print(f"Backup {result['backup_id']} of {result['database']} ({result['tier']}): "
          f"{size(result['size_bytes'])}, {len(result['row_counts'])} tables, {rows} rows, "
          f"{result['duration_seconds']:.1f} s")
    print(f"  stored at {result['location']}")
    print(f"  sha256    {result['sha256']}")
    for warning in result.get("warnings") or []:
        print(f"  warning: {warning}")


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


def show_files(result: dict[str, Any]) -> None:
    print(f"Files backup {result['backup_id']} of {result['name']} ({result['tier']}): "
          f"{result['files']} files, {size(result['size_bytes'])} stored, "
          f"encrypted: {'yes' if result['encrypted'] else 'no'}, {result['duration_seconds']:.1f} s")
    print(f"  stored at {result['location']}")
    if result["skipped"]:
        print(f"  skipped {len(result['skipped'])} special files: {', '.join(result['skipped'][:5])}")


def show_restore_files(result: dict[str, Any]) -> None:
    print(f"Restored {result['backup_id']} of {result['name']} into {result['dest']}: "
          f"{result['files']} files ({size(result['bytes'])}), {result['dirs']} directories, "
          f"{result['symlinks']} symlinks, every checksum verified")


def show_storage_snapshot(result: dict[str, Any]) -> None:
    print(f"Snapshot {result['snapshot_id']} of s3://{result['bucket']}/{result['source_prefix']}: "
          f"{result['object_count']} objects ({size(result['total_bytes'])}), {result['copied_count']} "
          f"copied ({size(result['copied_bytes'])}), {result['duration_seconds']:.1f} s")
    print(f"  stored at {result['location']}")


def show_storage_restore(result: dict[str, Any]) -> None:
    print(f"Restored snapshot {result['snapshot_id']} of {result['bucket']} into {result['dest']}: "
          f"{result['object_count']} objects, {size(result['bytes'])}")


def show_fleet(result: dict[str, Any]) -> None:
    rows = result["databases"]
    print_table(["DATABASE", "SERVER", "STATUS", "SIZE", "SECONDS", "REASON"],
                 [[r["database"], r["server"], r["status"],
                   "-" if r["size_bytes"] is None else size(r["size_bytes"]), r["duration_seconds"],
                   r["reason"] or ""] for r in rows])
    limits = ", ".join(f"{host}: {n}" for host, n in sorted(result["server_limits"].items()))
    print(f"Fleet {result['action']}: {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} ok "
          f"in {result['duration_seconds']:.0f} s (at most {limits} at once)")


def show_recover_table(result: dict[str, Any]) -> None:
    verb = "Would recover" if result["dry_run"] else "Recovered"
    print(f"{verb} {len(result['tables'])} table(s) from {result['backup_id']} into {result['target']} "
          f"({result['mode']}{', where ' + result['where'] if result['where'] else ''})")
    print_table(["TABLE", "IN BACKUP", "PRESENT", "INSERTED", "UPDATED", "DELETED", "SIDE TABLE"],
                 [[t["table"], t["rows_in_backup"], *("-" if t[k] is None else t[k] for k in
                   ("rows_present", "rows_inserted", "rows_updated", "rows_deleted")), t["side_table"] or "-"]
                  for t in result["tables"]])
    for table in result["tables"]:
        for moved in table["sequences"]:
            print(f"  sequence {moved['sequence']} moved from {moved['from']} to {moved['to']}")


def show_replicate(result: dict[str, Any]) -> None:
    copied = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in result["copied"].items())
    print(f"Copied to {result['replica']}: {copied}")
    show_replica_lag(result["lag"])


def show_replica_lag(lag: dict[str, Any]) -> None:
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
        print_table(["BACKUP", "AREA", "OF", "TIER", "FINISHED (UTC)", "ACTION", "REASON"],
                     [[r["backup_id"], r["area"], r["database"] or "-", r["tier"] or "-",
                       r["finished_at"] or "-", r["action"], r["reason"]] for r in rows])
    for line in result.get("leftovers") or []:
        print(f"  {line}")
    counts = ", ".join(f"{n} {action}" for action, n in sorted(result["counts"].items())) or "nothing"
    print(f"{'Dry run: ' if result['dry_run'] else ''}{counts} in {result['repository']}")


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


def show_automations(result: dict[str, Any]) -> None:
    for automation in result["automations"]:
        print(f"applied {automation['name']} ({automation['id']})")


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
        show_replica_lag(replica)
    print_table(
        ["DATABASE", "LAST BACKUP", "AGE (H)", "SIZE", "STORAGE", "ITS VERIFICATION", "NEWEST VERIFIED"],
        [[d["database"], d["last_backup"] or "-", d["age_hours"] if d["age_hours"] is not None else "-",
          size(d["size_bytes"]) if d["size_bytes"] is not None else "-", d["storage_class"] or "-",
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


def show_nothing(result: dict[str, Any]) -> None:
    """archive_command and restore_command succeed silently."""


def show_archive_status(result: dict[str, Any]) -> None:
    if not result["last_segment"]:
        print(f"No WAL archived for {result['database']} in {result['repository']}.")
        return
    print(f"Last archived segment of {result['database']}: {result['last_segment']} at "
          f"{result['last_archived_at']} ({result['age_seconds']:.0f} s ago); "
          f"{result['segments']} segments in {result['repository']}")
    if result.get("base_backup"):
        base = result["base_backup"]
        print(f"Newest base backup: {base['backup_id']} ({_kind(base)}), finished {base['finished_at']}")
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
    print(f"Base backup {result['backup_id']} of {result['database']} ({_kind(result)}): "
          f"{size(result['size_bytes'])}, WAL {result['start_lsn']} to {result['end_lsn']} on timeline "
          f"{result['timeline']}")
    print(f"  stored at {result['location']}")
    for warning in result.get("warnings") or []:
        print(f"  warning: {warning}")


def _kind(base: dict[str, Any]) -> str:
    """`full`, or `incremental on <parent>`."""
    parent = base.get("parent_backup_id")
    return f"{base['kind']} on {parent}" if parent else base["kind"]


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
