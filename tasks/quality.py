"""Proof that a restore is right: a great-expectations validation of the restored database.

For every table in the manifest, ExpectTableRowCountToEqual the row count the backup's
snapshot had, and ExpectColumnValuesToNotBeNull on its primary key columns. Each table
is a query asset built with psycopg.sql, so any name (mixed case, spaces, quotes) works.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from tasks import postgres


def preload() -> threading.Thread:
    """Start importing great-expectations (3-8 s of CPU) in the background, so that it
    overlaps the download instead of following the restore. A failed import is reported
    by validate_row_counts."""

    def load() -> None:
        with contextlib.suppress(Exception):
            import great_expectations.expectations  # noqa: F401

    loading = threading.Thread(target=load, name="gx-preload", daemon=True)
    loading.start()
    return loading


def cores_spare(restore_jobs: int) -> bool:
    """Whether a core is left beside pg_restore's jobs (and their server backends): without
    one, importing great-expectations during pg_restore slows it down by more than the
    overlap saves (measured on 2 cores with 2 jobs)."""
    return (os.cpu_count() or 1) > restore_jobs + 1


def validate_row_counts(url: str, expected: dict[str, int], digests: dict[str, str] | None = None,
                        known_tables: Iterable[str] | None = None) -> dict[str, Any]:
    """Validate the database at url against the manifest's row counts and, for the tables
    `digests` has, content digests (an expectation over the digest query's one row). A
    table of the database that the manifest does not know (`known_tables`, by default the
    expected ones) fails: that manifest does not describe this backup.

    Returns {"success", "tables": [{table, expected, observed, success}], "statistics"}; a
    table missing from the database fails its expectation. One scan per table: primary keys
    need no check of their own, pg_restore --exit-on-error fails if one cannot be restored."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for noisy in ("great_expectations", "great_expectations.core"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    params = postgres.parse_dsn(url)
    password = postgres.password_of(url)
    # The password goes to the driver directly, never into a connection string GX keeps.
    params.pop("password", None)
    from sqlalchemy.engine import URL

    # The database name goes to the driver too: GX validates connection strings as URLs and
    # refuses names that are legal in PostgreSQL (spaces, quotes, semicolons).
    engine_url = URL.create(
        "postgresql+psycopg", username=params.get("user"), host=params.get("host", "localhost"),
        port=int(params["port"]) if params.get("port") else None, database="postgres",
    ).render_as_string(hide_password=False)
    connect_args = {"dbname": params.get("dbname")}
    if digests:  # rows print as they did in the backup's snapshot
        connect_args["options"] = " ".join(f"-c {k}={v}" for k, v in postgres.DIGEST_SETTINGS.items())
    if password:
        connect_args["password"] = password
    datasource = context.data_sources.add_postgres(
        "restored", connection_string=engine_url,
        kwargs={"connect_args": connect_args})  # type: ignore[call-arg]  # passed on to SQLAlchemy
    columns = _columns(url)
    tables = []
    for index, (table, count) in enumerate(sorted(expected.items())):
        entry: dict[str, Any] = {"table": table, "expected": count, "observed": None, "success": False}
        tables.append(entry)
        if table not in columns:
            entry["error"] = "table missing from the restored database"
            continue
        schema, name = postgres.parse_table_name(table)
        # A query asset: GX's own table assets mangle mixed-case and quoted names.
        digest = (digests or {}).get(table)
        select = postgres.digest_select(columns[table]) if digest else "1 AS one"
        query = postgres.table_rows(schema, name, select).as_string()
        asset = datasource.add_query_asset(name=f"t{index}", query=query)
        batch = asset.add_batch_definition_whole_table("all rows")
        suite = context.suites.add(gx.ExpectationSuite(name=f"row counts t{index}"))
        if digest:
            suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="rows", value_set=[count]))
            suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="digest", value_set=[digest]))
        else:
            suite.add_expectation(gxe.ExpectTableRowCountToEqual(value=count))
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"restore t{index}", data=batch, suite=suite))
        outcome = validation.run()
        entry["success"] = bool(outcome.success)
        if digest:
            rows, content = outcome.results
            entry["observed"] = count if rows.success else rows.result["partial_unexpected_list"][0]
            entry["digest_matches"] = bool(content.success)
        else:
            (result,) = outcome.results
            entry["observed"] = result.result.get("observed_value")
    # GX pools its connections: close them, or the restored database stays "in use".
    datasource.get_engine().dispose()
    # A table the manifest does not count (all of them, for an emptied row_counts) is a
    # manifest that does not describe this backup.
    for table in sorted(set(columns) - set(expected if known_tables is None else known_tables)):
        tables.append({"table": table, "expected": None, "observed": None, "success": False,
                       "error": "in the restored database but not in the manifest"})
    failed = [t for t in tables if not t["success"]]
    return {
        "success": not failed,
        "tables": tables,
        "statistics": {"evaluated": len(tables), "failed": len(failed)},
        "engine": f"great_expectations {gx.__version__}",
    }


def _columns(url: str) -> dict[str, list[str]]:
    """The restored database's tables (as user_tables keys them) and their columns."""
    with postgres.connect(url) as conn:
        columns = postgres.table_columns(conn)
        return {key: columns.get(key, []) for key, _schema, _table in postgres.user_tables(conn)}


def failure_summary(result: dict[str, Any], limit: int = 3) -> str:
    """One line naming the first tables that failed validation."""
    failed = [t for t in result["tables"] if not t["success"]]
    parts = []
    for entry in failed[:limit]:
        if entry.get("error"):
            parts.append(f"{entry['table']}: {entry['error']}")
        elif entry["observed"] == entry["expected"] and entry.get("digest_matches") is False:
            parts.append(f"{entry['table']}: {entry['observed']} rows as expected, but their content differs "
                         "from the backup's (digest)")
        else:
            parts.append(f"{entry['table']}: {entry['observed']} rows, expected {entry['expected']}")
    more = f" and {len(failed) - limit} more" if len(failed) > limit else ""
    return "; ".join(parts) + more
