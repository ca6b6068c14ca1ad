"""The option groups several commands take (each a frozen dataclass whose fields become
options), and the output options every command takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from cyclopts import Parameter


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
