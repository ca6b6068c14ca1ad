"""AWS for failover: the Route53 record that points clients at the database, and RDS
restores into the DR region.

boto3 clients come from the standard chain (environment, profile, instance role;
AWS_ENDPOINT_URL for a test endpoint). Errors become one-line PgdrErrors.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pgdr.ops.errors import ConfigError, NotFoundError, PgdrError, TransientError, first_line, is_transient

# One AWS request gives up within about four minutes: at most 4 attempts of at most
# 10 s to connect and 45 s without a byte of answer, with standard backoff between them.
# A stalled endpoint fails the step and says so; it does not eat the backup window.
REQUEST_ATTEMPTS = 4
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 45

# Functions called with every new client but S3's (Route53, RDS, CloudWatch): how tests act
# on botocore's event hooks (client.meta.events), as pgdr.storage.s3repo.S3_CLIENT_HOOKS does for S3.
CLIENT_HOOKS: list[Callable[[Any], None]] = []


def client_config() -> Any:
    """botocore's configuration for every pgdr client: standard retries (5xx, throttling,
    resets) and the time budget above, unless AWS_RETRY_MODE / AWS_MAX_ATTEMPTS say otherwise."""
    from botocore.config import Config

    from pgdr.pipeline.watchdog import stall_seconds

    retries: dict[str, Any] = {}
    if not os.environ.get("AWS_RETRY_MODE"):
        retries["mode"] = "standard"
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["max_attempts"] = REQUEST_ATTEMPTS
    # A request that receives nothing for the stall budget has stalled too.
    read_timeout = min(READ_TIMEOUT, stall_seconds())
    return Config(retries=retries, connect_timeout=min(CONNECT_TIMEOUT, read_timeout),
                  read_timeout=read_timeout, user_agent_extra="pgdr")


@functools.cache
def _model_loader() -> Any:
    """One botocore data loader for the process. A new session would parse the service
    model again (about 1 s of CPU per client on a busy 2-core host, and a backup opens the
    repository several times); sharing only the loader keeps credentials, configuration
    and event hooks per client."""
    import botocore.loaders

    return botocore.loaders.create_loader(os.environ.get("AWS_DATA_PATH"))


def client(service: str, region: str | None = None,
           hooks: Iterable[Callable[[Any], None]] | None = None) -> Any:
    """The one way pgdr makes a boto3 client: the standard credential chain, pgdr's
    retries and time budget (client_config), then every hook (CLIENT_HOOKS unless given)."""
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    core.register_component("data_loader", _model_loader())
    made = boto3.session.Session(botocore_session=core).client(service, region_name=region,
                                                               config=client_config())
    for hook in CLIENT_HOOKS if hooks is None else hooks:
        hook(made)
    return made


@contextmanager
def aws_errors(action: str) -> Iterator[None]:
    """A failed AWS call as one line naming what was attempted."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        message = f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
        raise (TransientError if is_transient(exc) else PgdrError)(f"{action} failed: {message}") from None
    except BotoCoreError as exc:
        raise (TransientError if is_transient(exc) else PgdrError)(f"{action} failed: {exc}") from None


# --- Route53 ----------------------------------------------------------------------------


def fqdn(name: str) -> str:
    """Route53 returns names with the trailing dot."""
    return name if name.endswith(".") else name + "."


@dataclass(frozen=True)
class DnsRecord:
    zone_id: str
    name: str
    type: str
    ttl: int
    value: str

    def describe(self) -> str:
        return f"{fqdn(self.name)} {self.type} {self.value} (TTL {self.ttl})"


def read_record(route53: Any, zone_id: str, name: str, record_type: str) -> DnsRecord | None:
    """The record as Route53 serves it now, or None when there is none."""
    with aws_errors(f"reading {name} {record_type} in zone {zone_id}"):
        answer = route53.list_resource_record_sets(
            HostedZoneId=zone_id, StartRecordName=fqdn(name), StartRecordType=record_type, MaxItems="1")
    for found in answer.get("ResourceRecordSets", []):
        if found["Name"].lower() == fqdn(name).lower() and found["Type"] == record_type:
            values = [r["Value"] for r in found.get("ResourceRecords", [])]
            return DnsRecord(zone_id, found["Name"], record_type, int(found.get("TTL", 0)), ",".join(values))
    return None


def upsert_record(route53: Any, record: DnsRecord, comment: str) -> DnsRecord:
    """UPSERT the record, then read it back: a switch is done only when Route53 serves it."""
    if record.ttl < 0:
        raise ConfigError("the TTL must be zero or more seconds")
    with aws_errors(f"switching {record.name} {record.type}"):
        route53.change_resource_record_sets(HostedZoneId=record.zone_id, ChangeBatch={
            "Comment": comment[:256],
            "Changes": [{"Action": "UPSERT", "ResourceRecordSet": {
                "Name": fqdn(record.name), "Type": record.type, "TTL": record.ttl,
                "ResourceRecords": [{"Value": record.value}]}}],
        })
    served = read_record(route53, record.zone_id, record.name, record.type)
    if served is None or served.value.rstrip(".") != record.value.rstrip(".") or served.ttl != record.ttl:
        raise PgdrError(f"Route53 does not serve the new record {record.describe()} after the change "
                        f"(it serves {served.describe() if served else 'nothing'})")
    return served


# --- RDS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RdsRestore:
    source: str
    instance: str
    method: str  # "point-in-time" or "snapshot"
    restored_from: str  # the restore time ("latest") or the snapshot id


def latest_automated_snapshot(rds: Any, source_instance: str) -> dict[str, Any]:
    with aws_errors(f"listing the automated snapshots of {source_instance}"):
        pages = rds.get_paginator("describe_db_snapshots").paginate(
            DBInstanceIdentifier=source_instance, SnapshotType="automated")
        snapshots = [s for page in pages for s in page.get("DBSnapshots", [])
                     if s.get("Status") == "available"]
    if not snapshots:
        raise NotFoundError(f"no available automated snapshot of {source_instance}")
    return max(snapshots, key=lambda s: s["SnapshotCreateTime"])


def check_rds_restore(rds: Any, source_instance: str, new_instance: str, *, from_snapshot: bool) -> str:
    """What a restore needs, checked without creating anything: the new name is free and
    the source (or its newest automated snapshot) exists. Returns what a restore would do."""
    from botocore.exceptions import ClientError

    try:
        rds.describe_db_instances(DBInstanceIdentifier=new_instance)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "DBInstanceNotFound":
            with aws_errors(f"describing {new_instance}"):
                raise
    else:
        raise ConfigError(f"an RDS instance named {new_instance} already exists: choose another "
                          "--rds-target-instance (or delete the leftover instance)")
    if from_snapshot:
        snapshot = latest_automated_snapshot(rds, source_instance)
        return f"would restore {new_instance} from snapshot {snapshot['DBSnapshotIdentifier']}"
    with aws_errors(f"describing {source_instance}"):
        if source_instance.startswith("arn:"):
            rds.describe_db_instance_automated_backups(DBInstanceAutomatedBackupsArn=source_instance)
            latest = "its latest restorable time"
        else:
            found = rds.describe_db_instances(DBInstanceIdentifier=source_instance)["DBInstances"][0]
            latest = found.get("LatestRestorableTime") or "its latest restorable time"
    return f"would restore {source_instance} to {latest} as {new_instance}"


def restore_rds_instance(rds: Any, source_instance: str, new_instance: str, *, from_snapshot: bool = False,
                         restore_time: datetime | None = None, instance_class: str | None = None,
                         subnet_group: str | None = None) -> RdsRestore:
    """Start restoring `source_instance` as `new_instance` in the client's region: to its
    latest restorable time (or `restore_time`), or from its newest automated snapshot.
    The source may be an automated-backups ARN replicated into this region."""
    options: dict[str, Any] = {"DBInstanceIdentifier" if from_snapshot else "TargetDBInstanceIdentifier":
                               new_instance}
    if instance_class:
        options["DBInstanceClass"] = instance_class
    if subnet_group:
        options["DBSubnetGroupName"] = subnet_group
    if from_snapshot:
        snapshot = latest_automated_snapshot(rds, source_instance)
        with aws_errors(f"restoring {new_instance} from snapshot {snapshot['DBSnapshotIdentifier']}"):
            rds.restore_db_instance_from_db_snapshot(DBSnapshotIdentifier=snapshot["DBSnapshotIdentifier"],
                                                     **options)
        return RdsRestore(source_instance, new_instance, "snapshot", snapshot["DBSnapshotIdentifier"])
    if source_instance.startswith("arn:"):
        options["SourceDBInstanceAutomatedBackupsArn"] = source_instance
    else:
        options["SourceDBInstanceIdentifier"] = source_instance
    if restore_time:
        options["RestoreTime"] = restore_time
    else:
        options["UseLatestRestorableTime"] = True
    with aws_errors(f"restoring {source_instance} to a point in time as {new_instance}"):
        rds.restore_db_instance_to_point_in_time(**options)
    return RdsRestore(source_instance, new_instance, "point-in-time",
                      restore_time.isoformat() if restore_time else "latest")


def wait_until_available(rds: Any, instance: str, timeout_seconds: float,
                         poll_seconds: float = 30) -> dict[str, Any]:
    """Wait for the instance to be `available`; return its endpoint {"Address", "Port"}."""
    from botocore.exceptions import WaiterError

    attempts = max(1, int(timeout_seconds // max(poll_seconds, 1)) + 1)
    try:
        rds.get_waiter("db_instance_available").wait(
            DBInstanceIdentifier=instance,
            WaiterConfig={"Delay": max(1, int(poll_seconds)), "MaxAttempts": attempts})
    except WaiterError as exc:
        raise PgdrError(f"{instance} did not become available within {timeout_seconds:g} s: "
                        f"{first_line(exc)}") from None
    with aws_errors(f"describing {instance}"):
        found = rds.describe_db_instances(DBInstanceIdentifier=instance)["DBInstances"][0]
    endpoint = found.get("Endpoint") or {}
    if not endpoint.get("Address"):
        raise PgdrError(f"{instance} is available but has no endpoint")
    return {"Address": endpoint["Address"], "Port": int(endpoint.get("Port") or 5432)}
