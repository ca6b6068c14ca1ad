"""Running `pgdr` in-process, as a person or a script would from a shell."""

from __future__ import annotations

import json
from typing import Any

from flows.cli import main


def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `pgdr argv...`."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: Any, *argv: str) -> dict[str, Any]:
    """The JSON object of a successful `pgdr argv... --json`."""
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def error_line(err: str) -> str:
    """The single `pgdr: error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("pgdr:")]
    assert len(lines) == 1, err
    return lines[0]
