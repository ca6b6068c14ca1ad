"""`python -m deployments.serve`: run prefect.yaml's schedules in this process, without a
work pool or worker (a laptop, a single server, a demo). Manual deployments are served
too, so they can be started from the UI with parameters."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from deployments.register import available_specs


def runner_deployments(names: list[str] | None = None, timezone: str | None = None) -> list[Any]:
    """One RunnerDeployment per available deployment, with prefect.yaml's schedules."""
    return [
        spec.load_flow().to_deployment(
            name=spec.name, schedules=spec.cron_schedules(timezone), parameters=spec.parameters,
            description=spec.description, tags=list(spec.tags))
        for spec in available_specs(names)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="FLOW/DEPLOYMENT",
                        help="only these deployments (default: all in prefect.yaml)")
    parser.add_argument("--timezone", help="time zone of every schedule (default: prefect.yaml's)")
    args = parser.parse_args(argv)
    from prefect import serve

    serve(*runner_deployments(args.names or None, args.timezone))
    return 0


if __name__ == "__main__":
    sys.exit(main())
