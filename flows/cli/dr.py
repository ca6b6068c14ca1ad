"""Disaster recovery and many databases: failover, drills, fleets."""

from __future__ import annotations

from typing import Literal

from flows.cli import render
from flows.cli.common import Result, command, url, usage_error
from flows.cli.options import Dns, FlowOutput, Roles


@command(render.show_failover)
def failover(*, repo: str | None = None, target: str | None = None, db: str | None = None,
             no_owner: bool = False, roles: Roles = Roles(), dns: Dns = Dns(),
             health_sql: list[str] | None = None, health_timeout: float = 10.0, dry_run: bool = False,
             backup: str | None = None, max_backup_age_hours: float = 26.0, accept_stale: bool = False,
             force_record_value: bool = False, rds_source_instance: str | None = None,
             rds_target_instance: str | None = None, rds_from_snapshot: bool = False,
             rds_instance_class: str | None = None, rds_subnet_group: str | None = None,
             rds_timeout_minutes: float = 60.0, rds_poll_seconds: float = 30.0,
             output: FlowOutput = FlowOutput()) -> Result:
    """Bring the database up in the DR region and switch DNS to it (needs --zone-id and
    --record-name).

    Args:
        repo: DR repository URL (default: PGDR_REPLICA_REPO, else PGDR_REPO)
        target: DR database URL to restore into (RDS: user and database for SQL checks)
        db: database whose backup to restore (NAME)
        no_owner: do not restore object ownership
        health_sql: SQL check on the restored database (passes only on a first row whose first value
            is true); repeatable
        health_timeout: seconds per health check
        dry_run: change nothing: restore into a scratch database beside the target, check it, drop it,
            and say what the DNS switch would be (RDS: only checks that need no instance)
        backup: restore this backup (default: the newest whose checksum holds)
        max_backup_age_hours: refuse, before any change, a backup older than this
        accept_stale: restore a backup older than that anyway
        force_record_value: point the record at --record-value even if it does not name the checked
            database
        rds_source_instance: RDS instance (or automated-backups ARN) to restore instead of a pgdr backup
        rds_target_instance: name of the restored RDS instance
        rds_from_snapshot: restore the newest automated snapshot instead of the latest restorable time
        rds_instance_class: instance class of the restored instance
        rds_subnet_group: DB subnet group in the DR region
        rds_timeout_minutes: wait for the instance
        rds_poll_seconds: status poll interval
    """
    if not (dns.zone_id and dns.record_name):
        raise usage_error("failover needs --zone-id and --record-name")
    from flows.failover import failover

    return failover(
        zone_id=dns.zone_id, record_name=dns.record_name, record_value=dns.record_value,
        record_type=dns.record_type, ttl=dns.ttl, repo=repo, target=url(target), db=db,
        health_urls=dns.health_url, health_sql=health_sql, health_timeout_seconds=health_timeout,
        dry_run=dry_run, region=dns.region, rds_source_instance=rds_source_instance,
        rds_target_instance=rds_target_instance, rds_from_snapshot=rds_from_snapshot,
        rds_instance_class=rds_instance_class, rds_subnet_group=rds_subnet_group,
        rds_timeout_minutes=rds_timeout_minutes, rds_poll_seconds=rds_poll_seconds,
        no_owner=no_owner, no_acl=roles.no_acl, create_roles=roles.create_roles,
        backup_id=backup, max_backup_age_hours=max_backup_age_hours, accept_stale=accept_stale,
        force_record_value=force_record_value)


@command(render.show_drill)
def drill(*, repo: str | None = None, db: str | None = None, server: str | None = None,
          roles: Roles = Roles(), scenario: str = "database-corruption",
          rto_target_minutes: float | None = None, rpo_target_minutes: float | None = None,
          health_sql: list[str] | None = None, backup: str | None = None,
          max_backup_age_hours: float = 26.0, pitr: bool = False, with_failover_dry_run: bool = False,
          failover_repo: str | None = None, dns: Dns = Dns(), output: FlowOutput = FlowOutput()) -> Result:
    """Rehearse a recovery and measure RTO and RPO.

    Args:
        repo: repository URL (primary or DR)
        db: database whose backup to restore (NAME)
        server: server URL for the scratch database (default: DATABASE_URL)
        scenario: runbook scenario whose targets apply (database-corruption, accidental-deletion,
            region-failure, ransomware)
        rto_target_minutes: override the scenario's RTO target
        rpo_target_minutes: override the scenario's RPO target
        health_sql: SQL check on the restored copy
        backup: restore this backup (default: what a failover would choose)
        max_backup_age_hours: a failover refuses older backups, so the drill fails on them
        pitr: rehearse point-in-time recovery: newest base backup + WAL replayed to its end (--db names
            the WAL area); RPO from the last replayed transaction
        with_failover_dry_run: also run the failover as a dry run (needs the DNS options)
        failover_repo: DR repository for the failover dry run (default: --repo)
    """
    from flows.drill import drill, process_started_at

    failover = None
    if with_failover_dry_run:
        if not dns.complete:
            from pgdr.ops.errors import ConfigError

            raise ConfigError("--with-failover-dry-run needs --zone-id, --record-name and --record-value")
        failover = {"zone_id": dns.zone_id, "record_name": dns.record_name,
                    "record_value": dns.record_value, "record_type": dns.record_type, "ttl": dns.ttl,
                    "health_urls": dns.health_url, "region": dns.region}
        if failover_repo:
            failover["repo"] = failover_repo
    return drill(repo=repo, db=db, server=url(server), scenario=scenario,
                 rto_target_minutes=rto_target_minutes, rpo_target_minutes=rpo_target_minutes,
                 health_sql=health_sql, failover=failover, backup_id=backup,
                 max_backup_age_hours=max_backup_age_hours, pitr=pitr, started_at=process_started_at(),
                 no_acl=roles.no_acl, create_roles=roles.create_roles)


@command(render.show_fleet)
def fleet(action: Literal["backup", "verify"] = "backup", /, *, db: list[str] | None = None,
          server: list[str] | None = None, include: list[str] | None = None,
          exclude: list[str] | None = None, tier: str = "daily", repo: str | None = None,
          host_limit: int | None = None, max_parallel: int = 8, deployment: str | None = None,
          local: bool = False, verify_server: str | None = None,
          output: FlowOutput = FlowOutput()) -> Result:
    """Back up (or verify) many databases, each as its own flow run, at most --host-limit at
    once per server.

    Args:
        action: what to do with each database
        db: a database of the fleet (URL; repeat; default: PGDR_FLEET_DATABASES)
        server: back up every database on this server (URL; repeat; default: PGDR_FLEET_SERVERS);
            templates are never taken
        include: only discovered databases matching this shell pattern (repeat)
        exclude: skip discovered databases matching this shell pattern (repeat)
        tier: backup tier
        repo: repository URL
        host_limit: runs at once per server (sets its limit; default: keep it, or PGDR_HOST_LIMIT for a
            new one)
        max_parallel: runs at once in all
        deployment: deployment to run each database on, FLOW/NAME (default backup/fleet or
            verify/fleet)
        local: run each database's flow in this process instead of on a work pool
        verify_server: server for verify's temporary databases (URL)
    """
    from flows.fleet import fleet
    from pgdr.postgres.dsn import strip_password

    return fleet(action=action, databases=[strip_password(u) for u in db or []],
                 servers=[strip_password(u) for u in server or []],
                 include=include, exclude=exclude, tier=tier, repo=repo, host_limit=host_limit,
                 max_parallel=max_parallel, deployment=deployment, local=local,
                 verify_server=url(verify_server))
