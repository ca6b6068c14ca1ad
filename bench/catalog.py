"""`python -m bench.catalog`: the catalog cases alone (catalog_list, catalog_status), with
the harness's S3 endpoint and repository, without the database, pgBackRest or Prefect
server the other cases need. BENCH_CATALOG_BACKUPS (2000), BENCH_RUNS (3). Each round runs
both commands with the catalog index as backups write it; then, once, without it (every
manifest read: a repository whose index is damaged or was never written)."""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.__main__ import _int_env
from bench.cases import CATALOG_DATABASES, Cases
from bench.environment import BenchEnvironment, _base_env, _moto, say
from bench.measure import BenchError


def _round(cases: Cases) -> dict[str, Any]:
    measured = {}
    for name in ("catalog_list", "catalog_status"):
        m = getattr(cases, name)().measurement
        say(f"{name} {m.seconds:.2f} s, {m.cpu_seconds:.2f} CPU s, {m.peak_rss_mb:.0f} MB")
        measured[name] = m
    return measured


def _drop_indexes(cases: Cases) -> None:
    from pgdr.catalog.index import index_key
    from pgdr.storage.repository import open_repository

    repo = open_repository(cases.catalog_url)
    for number in range(CATALOG_DATABASES):
        repo.delete(index_key(f"fleet{number}"))


def main() -> int:
    backups = _int_env("BENCH_CATALOG_BACKUPS", 2000)
    rounds = _int_env("BENCH_RUNS", 3)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgdr-bench-catalog-",
                                                                    dir="/tmp")))
        (work / "logs").mkdir()
        endpoint = stack.enter_context(_moto())
        bench = BenchEnvironment(work, None, endpoint, None, "", None,  # type: ignore[arg-type]
                                 _base_env(work, endpoint))
        cases = Cases(bench, 1, 1)
        try:
            say(f"writing the manifests of {backups} backups and their indexes")
            cases.prepare_catalog(backups)
            indexed = [_round(cases) for _ in range(rounds)]
            say("without the indexes (every manifest read)")
            _drop_indexes(cases)
            cold = _round(cases)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    print(f"\n{backups} backups of {CATALOG_DATABASES} databases on S3 (moto), {rounds} round(s)")
    print("| case | indexed: wall s (median) | CPU s | peak RSS MB | without index: wall s |")
    print("|---|---:|---:|---:|---:|")
    for name in ("catalog_list", "catalog_status"):
        runs = [r[name] for r in indexed]
        print(f"| {name} | {statistics.median(m.seconds for m in runs):.2f} | "
              f"{statistics.median(m.cpu_seconds for m in runs):.2f} | "
              f"{max(m.peak_rss_mb for m in runs):.0f} | {cold[name].seconds:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
