"""What the command modules share: the `@command` marker and the small conversions from
what a person types to what a flow takes.

Each command is one function: its signature declares its options (names, types,
defaults) and its docstring their help, which `pgdr <command> --help` shows. Importing
this module loads nothing heavy, not even the parser: `wal-push` runs once per WAL segment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pgdr.ops.errors import PgdrError

Result = Mapping[str, Any]  # what --json prints: each flow's result type says its keys
Show = Callable[[Any], None]
F = TypeVar("F", bound=Callable[..., Any])


def command(show: Show, runs_flow: bool = True) -> Callable[[F], F]:
    """Mark a function as a `pgdr` command: `show` prints its result for a person (unless
    --json); a command that runs a Prefect flow also gets --verbose, a progress bar and
    Prefect's console log kept off stderr."""

    def mark(function: F) -> F:
        function.pgdr_show = show  # type: ignore[attr-defined]
        function.pgdr_runs_flow = runs_flow  # type: ignore[attr-defined]
        return function

    return mark


class CommandExit(PgdrError):
    """An error with a specific exit status (2: a wrong command line; restore_command's
    statuses); quiet ones print nothing."""

    def __init__(self, message: str, exit_status: int, quiet: bool = False) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.quiet = quiet


def usage_error(message: str) -> CommandExit:
    """A command line that cannot work as given: exit status 2, like a parse error."""
    return CommandExit(message, 2)


def settings() -> Any:
    from pgdr.ops.settings import load_settings

    return load_settings()


def url(value: str | None) -> str | None:
    """A database URL without its password (kept in this process only)."""
    from pgdr.postgres.dsn import strip_password

    return strip_password(value) if value else None


def db_url(value: str | None) -> str | None:
    """--db URL (or DATABASE_URL) without its password: the password stays in this process
    and out of the flow's parameters, which Prefect stores."""
    return url(value or settings().db_url)


def secrets() -> list[str]:
    try:
        secrets: list[str] = settings().secrets()
        return secrets
    except PgdrError:
        return []
