"""`pgdr`: the command line.

Commands that change something run their Prefect flow (recorded in the Prefect server
when PREFECT_API_URL is set); commands that only read, and the WAL commands, call plain
functions and never import Prefect. `--json` prints one JSON object on stdout and nothing
else there; errors are one line on stderr; the exit status is 0 only on success (2: the
command line itself is wrong).
"""

from flows.cli.main import main

__all__ = ["main"]
