"""Proof that a restore is right: a great-expectations validation of the restored database.

For every table in the manifest, ExpectTableRowCountToEqual the row count the backup's
snapshot had, and its content digest equal to the manifest's (computed once by pgdr). Each
table is a query asset built with psycopg.sql, so any name (mixed case, spaces, quotes) works.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import logging
import os
import queue
import sys
import threading
import types
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pgdr.postgres import dsn, postgres

# Imported by great-expectations at start-up only for expectations pgdr never runs (the
# distribution tests and their charts): about 60 MB and 0.8 s of CPU, measured. They are
# loaded on first use instead, so an expectation that needs them still works.
DEFERRED_IMPORTS = ("scipy.stats", "altair")


def defer_unused_imports() -> None:
    """Put a stand-in for each of DEFERRED_IMPORTS in sys.modules, which imports the real
    module on its first attribute access. Called before great-expectations is imported, in
    the thread that starts the import. (importlib's LazyLoader is not enough: `import
    altair` reads the module's __spec__, which makes LazyLoader execute it.)"""
    for name in DEFERRED_IMPORTS:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # its package is not installed: nothing to defer
            continue
        if spec is None:
            continue
        sys.modules[name] = _stand_in(name, spec)


def _stand_in(name: str, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    stand_in = types.ModuleType(name)
    stand_in.__spec__ = spec

    def load(attribute: str) -> Any:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        return getattr(importlib.import_module(name), attribute)

    stand_in.__getattr__ = load  # type: ignore[method-assign]
    return stand_in


def preload() -> threading.Thread:
    """Start importing great-expectations (2-3 s of CPU, without DEFERRED_IMPORTS) in the
    background, so that it overlaps the download instead of following the restore. A
    failed import is reported by validate_row_counts."""

    def load() -> None:
        with contextlib.suppress(Exception):
            import great_expectations.expectations  # noqa: F401

    defer_unused_imports()
    loading = threading.Thread(target=load, name="gx-preload", daemon=True)
    loading.start()
    return loading


def cores_spare(restore_jobs: int) -> bool:
    """Whether a core is left beside pg_restore's jobs (and their server backends): without
    one, importing great-expectations during pg_restore slows it down by more than the
    overlap saves (measured on 2 cores with 2 jobs)."""
    return (os.cpu_count() or 1) > restore_jobs + 1


def validate_row_counts(url: str, expected: dict[str, int], digests: dict[str, str] | None = None,
                        known_tables: Iterable[str] | None = None, jobs: int = 1) -> dict[str, Any]:
    """Validate the database at url against the manifest's row counts and, for the tables
    `digests` has, content digests. A table of the database that the manifest does not
    know (`known_tables`, by default the expected ones) fails: that manifest does not
    describe this backup.

    Returns {"success", "tables": [{table, expected, observed, success}], "statistics"}; a
    table missing from the database fails its expectation. great-expectations counts each
    table's rows (ExpectTableRowCountToEqual: one count(*)); the digests are computed once
    per table, on `jobs` connections of their own while the counts run (a digest query
    given to great-expectations as an asset ran three to four times per table, once per
    metric). Primary keys need no check of their own: pg_restore --exit-on-error fails if
    one cannot be restored."""
    defer_unused_imports()
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for noisy in ("great_expectations", "great_expectations.core"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    params = dsn.parse_dsn(url)
    password = dsn.password_of(url)
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
    if password:
        connect_args["password"] = password
    datasource = context.data_sources.add_postgres(
        "restored", connection_string=engine_url,
        kwargs={"connect_args": connect_args})  # type: ignore[call-arg]  # passed on to SQLAlchemy
    columns = _columns(url)
    wanted = {table: columns[table] for table in (digests or {}) if table in expected and table in columns}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="digests") as pool:
        computing = pool.submit(_digests, url, wanted, expected, jobs)
        tables = _count_rows(context, datasource, columns, expected)
        observed_digests = computing.result()
    # GX pools its connections: close them, or the restored database stays "in use".
    datasource.get_engine().dispose()
    for entry in tables:
        if entry["table"] in observed_digests:
            entry["digest_matches"] = observed_digests[entry["table"]] == (digests or {})[entry["table"]]
            entry["success"] = entry["success"] and entry["digest_matches"]
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


def _count_rows(context: Any, datasource: Any, columns: dict[str, list[str]],
                expected: dict[str, int]) -> list[dict[str, Any]]:
    """One great-expectations validation per table: its row count equals the manifest's."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    tables = []
    for index, (table, count) in enumerate(sorted(expected.items())):
        entry: dict[str, Any] = {"table": table, "expected": count, "observed": None, "success": False}
        tables.append(entry)
        if table not in columns:
            entry["error"] = "table missing from the restored database"
            continue
        schema, name = postgres.parse_table_name(table)
        # A query asset: GX's own table assets mangle mixed-case and quoted names.
        query = postgres.table_rows(schema, name, "1 AS one").as_string()
        asset = datasource.add_query_asset(name=f"t{index}", query=query)
        batch = asset.add_batch_definition_whole_table("all rows")
        suite = context.suites.add(gx.ExpectationSuite(name=f"row counts t{index}"))
        suite.add_expectation(gxe.ExpectTableRowCountToEqual(value=count))
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"restore t{index}", data=batch, suite=suite))
        outcome = validation.run()
        entry["success"] = bool(outcome.success)
        (result,) = outcome.results
        entry["observed"] = result.result.get("observed_value")
    return tables


def _digests(url: str, columns: dict[str, list[str]], expected: dict[str, int], jobs: int) -> dict[str, str]:
    """The content digest of each table in `columns`, on up to `jobs` connections, the
    largest tables (by expected rows) first so that the connections finish together."""
    waiting = queue.SimpleQueue[str]()
    for table in sorted(columns, key=lambda t: -expected.get(t, 0)):
        waiting.put(table)
    found: dict[str, str] = {}

    def work() -> None:
        with postgres.connect(url) as conn:
            postgres.use_digest_settings(conn)
            while True:
                try:
                    table = waiting.get_nowait()
                except queue.Empty:
                    return
                schema, name = postgres.parse_table_name(table)
                found[table] = postgres.table_digest(conn, schema, name, columns[table])[1]

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(columns)))) as pool:
        for running in [pool.submit(work) for _ in range(max(1, min(jobs, len(columns))))]:
            running.result()
    return found


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
