"""What the command modules share: the option groups several commands take, the
`@command` marker and the small conversions from what a person types to what a flow takes.

Each command is one function: its signature declares its options (names, types,
defaults) and its docstring their help, which `pgdr <command> --help` shows. Importing
this module loads nothing heavy: `wal-push` runs once per WAL segment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from cyclopts import Parameter

from tasks.errors import PgdrError

Result = dict[str, Any]
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


@Parameter(name="*")
@dataclass(frozen=True)
class Output:
    """How every command prints its result."""

    json: Annotated[bool, Parameter(help="print one JSON object on stdout")] = False


@Parameter(name="*")
@dataclass(frozen=True)
class FlowOutput(Output):
    """How a command that runs a flow prints its result and log."""

    verbose: Annotated[bool, Parameter(name=["--verbose", "-v"],
                                       help="show the flow's log on stderr")] = False


@Parameter(name="*")
@dataclass(frozen=True)
class Roles:
    """What a restore does about roles the server lacks (see README: a whole database)."""

    no_acl: Annotated[bool, Parameter(help="do not restore privileges (GRANT/REVOKE)")] = False
    create_roles: Annotated[bool, Parameter(
        help="create the roles the backup needs and the server lacks (without passwords)")] = False


@Parameter(name="*")
@dataclass(frozen=True)
class ArchiveWait:
    """What a restore does with a dump in an archive storage class."""

    archive_wait_hours: Annotated[float, Parameter(
        help="a dump in GLACIER/DEEP_ARCHIVE: wait up to H hours for S3 to restore it")] = 12.0
    no_wait: Annotated[bool, Parameter(
        help="a dump in GLACIER/DEEP_ARCHIVE: request its restore, exit 3 saying when to retry")] = False


@Parameter(name="*")
@dataclass(frozen=True)
class Dns:
    """The Route53 record a failover switches, and what must answer before it does."""

    zone_id: Annotated[str | None, Parameter(help="Route53 hosted zone id")] = None
    record_name: Annotated[str | None, Parameter(help="DNS name clients connect to")] = None
    record_type: Annotated[str, Parameter(help="record type")] = "CNAME"
    record_value: Annotated[str | None, Parameter(
        help="new record value; must name the checked database's host (default: that host; RDS: the "
        "new endpoint)")] = None
    ttl: Annotated[int, Parameter(help="record TTL in seconds")] = 60
    health_url: Annotated[list[str] | None, Parameter(
        help="HTTP URL that must answer 2xx before DNS is switched; repeatable")] = None
    region: Annotated[str | None, Parameter(help="AWS region of the DR side (default: AWS_REGION)")] = None

    @property
    def complete(self) -> bool:
        return bool(self.zone_id and self.record_name and self.record_value)


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
    from tasks.settings import load_settings

    return load_settings()


def url(value: str | None) -> str | None:
    """A database URL without its password (kept in this process only)."""
    from tasks.postgres import strip_password

    return strip_password(value) if value else None


def db_url(value: str | None) -> str | None:
    """--db URL (or DATABASE_URL) without its password: the password stays in this process
    and out of the flow's parameters, which Prefect stores."""
    return url(value or settings().db_url)


def secrets() -> list[str]:
    try:
        return settings().secrets()
    except PgdrError:
        return []
