"""Selective table recovery: the runbook's "someone deleted rows" scenario.

resolve backup -> refuse unknown tables and unusable filters -> check the target's tables
-> restore the named tables only (the backup's schema, their rows) into a temporary
database on the target's server (validated) -> per table, in one transaction: COPY the
backup's rows into a staging table on the target and merge them (missing-rows, replace)
or load them beside the original (side-table) -> drop the temporary database (always)
-> audit, artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.restore import restore_and_validate
from pgdr.catalog import catalog
from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.ops.settings import load_settings
from pgdr.postgres import dsn
from pgdr.restore import recovery
from pgdr.restore import restore as restoring
from pgdr.restore.row_filter import check_row_filter
from tasks.artifacts import Stopwatch, artifact_key, markdown_table, publish_markdown
from tasks.records import audited, open_repo
from tasks.recover_table import check_target, recover_one
from tasks.restore import find_backup
from tasks.runs import FLOW_HOOKS, run_name


class RecoveryFailed(PgdrError):
    """A table could not be recovered; `details` says what was done before it."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


def _publish(manifest: catalog.Manifest, result: dict[str, Any]) -> None:
    rows = [[t["table"], t["rows_in_backup"], _shown(t["rows_present"]), _shown(t["rows_inserted"]),
             _shown(t["rows_updated"]), _shown(t["rows_deleted"]), t["side_table"] or "-"]
            for t in result["tables"]]
    title = "Dry run of table recovery" if result["dry_run"] else "Table recovery"
    publish_markdown(
        artifact_key("recover-table", manifest.database),
        f"## {title} from {manifest.backup_id} ({result['mode']})\n\n"
        f"Target {result['target']}" + (f", rows where `{result['where']}`" if result["where"] else "")
        + "\n\n" + markdown_table(["table", "rows in backup", "already present", "inserted", "updated",
                                   "deleted", "side table"], rows),
        f"Tables recovered from {manifest.backup_id} into {result['target']}",
    )


def _shown(value: int | None) -> str:
    return "-" if value is None else str(value)


@flow(name="recover-table", flow_run_name=run_name("recover-table-{tables}-into-{target|$db}"),
      log_prints=True, **FLOW_HOOKS)
def recover_table(backup_id: str = "latest", target: str | None = None, tables: list[str] | None = None,
                  mode: str = "missing-rows", where: str | None = None, dry_run: bool = False,
                  repo: str | None = None, db: str | None = None, jobs: int | None = None,
                  no_owner: bool = False) -> dict[str, Any]:
    """Bring named tables of `target` back from a backup without restoring the whole
    database: `missing-rows` inserts the rows whose primary key is absent, `replace` makes
    the table's content the backup's, `side-table` loads the rows into
    `<table>_recovered_<ts>` for review. `where` filters the backup's rows."""
    settings = load_settings()
    target_url = target or settings.db_url
    if not target_url:
        raise ConfigError("no target given: pass --target URL")
    recovery.check_mode(mode)
    row_filter = check_row_filter(where)
    repository = open_repo(repo or settings.repo_url, settings)
    target_db = dsn.database_name(target_url)
    clock = Stopwatch()  # from the start: finding the backup is part of the recovery's time
    manifest = find_backup(repository, backup_id, db, target_db)
    moment = catalog.utcnow()
    temp_db = restoring.derived_name(manifest.database, "recover", moment)
    result: dict[str, Any] = {
        "backup_id": manifest.backup_id, "database": manifest.database,
        "target": dsn.display_dsn(target_url), "mode": mode, "dry_run": dry_run, "where": row_filter,
        "temp_database": temp_db, "tables": [],
    }

    with audited(repository, settings, "recover-table", type=mode, source=manifest.backup_id,
                 destination=target_db, clock=clock, dry_run=dry_run, where=row_filter,
                 tables=result["tables"]) as step:
        wanted = recovery.requested_tables(list(tables or []), manifest.row_counts, manifest.partitioned)
        check_target(target_url, wanted, mode, row_filter)
        try:
            restore_and_validate(repository, settings, manifest, target_url, temp_db, jobs, no_owner,
                                 by="recover-table", tables=[(schema, table) for _, schema, table in wanted])
            temp_url = dsn.with_database(target_url, temp_db)
            for key, schema, table in wanted:
                try:
                    result["tables"].append(recover_one(target_url, temp_url, key, schema, table, mode,
                                                        row_filter, dry_run, manifest.backup_id, moment))
                except PgdrError as exc:
                    done = ", ".join(t["table"] for t in result["tables"])
                    raise RecoveryFailed(str(exc) + (f" (already recovered: {done})" if done else ""),
                                         result) from None
        finally:
            restoring.drop_quietly(target_url, temp_db)
        step.succeeded()
    _publish(manifest, result)
    result["duration_seconds"] = round(clock.seconds, 3)
    return result
