"""Server-side automations: alerts that the Prefect server sends, so that a run whose worker
died (OOM killer, lost node) still alerts somebody, and a backup that never ran does too.

Applied by `pgdr automations apply` (idempotent: each automation is found by its name and
replaced). They notify through the same settings as the runs' own notifications:
PGDR_NOTIFY_BLOCK (a saved notification block) or PGDR_NOTIFY_URL (saved as the webhook
block `pgdr-notify`, the URL kept as a secret value).

- "pgdr: zombie run": a pgdr flow run whose heartbeats stop (its process died without a
  word) is marked Crashed. Flow runs send a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY
  seconds (Prefect's default 180); the run is declared dead after three missed ones.
- "pgdr: run failed": any pgdr flow run of a deployment that ends Failed or Crashed. Runs
  from the command line notify from their own process (tasks.runs.notify_hook), which
  leaves deployment runs to this automation once it exists: one notification per failure.
- "pgdr: no backup for 26 hours": no successful backup run of a deployment within 26 hours
  of its last one (the runbook's alarm).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pgdr.ops.errors import ConfigError
from pgdr.ops.settings import Settings

# Every flow pgdr defines (flows/*.py): the automations watch these and nothing else.
PGDR_FLOWS = ["backup", "basebackup", "drill", "failover", "files", "restore-files", "fleet", "pitr",
              "pitr-rds", "prune", "recover-table", "restore", "restore-to-temp", "rollback",
              "storage-snapshot", "storage-restore", "verify"]
ZOMBIE = "pgdr: zombie run"
FAILED = "pgdr: run failed"
NO_BACKUP = "pgdr: no backup for 26 hours"
NO_BACKUP_WITHIN = timedelta(hours=26)
WEBHOOK_BLOCK = "pgdr-notify"
_TERMINAL = ["prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
             "prefect.flow-run.Crashed"]
_PGDR_RUN = {"prefect.resource.role": "flow", "prefect.resource.name": PGDR_FLOWS}


def _duration(span: timedelta) -> str:
    seconds = span.total_seconds()
    return f"{seconds / 3600:g} hours" if seconds % 3600 == 0 else f"{seconds:g} s"


def definitions(block_document_id: Any, zombie_after: timedelta,
                no_backup_within: timedelta = NO_BACKUP_WITHIN) -> list[Any]:
    """The automations, as Prefect objects (what `apply` sends to the server)."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState, SendNotification
    from prefect.events.schemas.automations import AutomationCore as Automation
    from prefect.events.schemas.automations import EventTrigger, Posture

    def notify(subject: str, body: str) -> Any:
        return SendNotification(block_document_id=block_document_id, subject=subject, body=body)

    run_link = "{{ flow_run|ui_url }}"
    return [
        Automation(
            name=ZOMBIE, description="A pgdr flow run whose heartbeats stopped is marked Crashed.",
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"}, match_related=_PGDR_RUN,
                after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *_TERMINAL},
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=zombie_after),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message=(
                f"no heartbeat for {zombie_after.total_seconds():g} s: the process running it died"))],
        ),
        Automation(
            name=FAILED, description="Notify once when a pgdr deployment run ends Failed or Crashed.",
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related=[_PGDR_RUN, {"prefect.resource.role": "deployment"}],
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1,
                within=timedelta(0)),
            actions=[notify("pgdr {{ flow.name }} {{ flow_run.state.name|upper }}: {{ flow_run.name }}",
                            "run: {{ flow_run.name }} ({{ deployment.name }})\n"
                            "state: {{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
                            f"link: {run_link}")],
        ),
        Automation(
            name=NO_BACKUP, description="No successful backup of a deployment within 26 hours.",
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related=[{"prefect.resource.role": "flow", "prefect.resource.name": "backup"},
                               {"prefect.resource.role": "deployment"}],
                after={"prefect.flow-run.Completed"}, expect={"prefect.flow-run.Completed"},
                for_each={"related:deployment:prefect.resource.id"}, posture=Posture.Proactive,
                threshold=1, within=no_backup_within),
            actions=[notify(f"pgdr: no successful backup for {_duration(no_backup_within)}",
                            f"A backup deployment has not completed a run for {_duration(no_backup_within)} "
                            "since its last success: look at the runs of the backup flow.")],
        ),
    ]


def notification_block_id(settings: Settings) -> Any:
    """The block the server notifies through: PGDR_NOTIFY_BLOCK, or PGDR_NOTIFY_URL saved as
    the webhook block `pgdr-notify` (the URL a secret value: it often holds a token)."""
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    if settings.notify_block:
        return Block.load(settings.notify_block)._block_document_id  # type: ignore[union-attr]  # sync/async API
    if not settings.notify_url:
        raise ConfigError("no notification channel: set PGDR_NOTIFY_URL or PGDR_NOTIFY_BLOCK")
    block = CustomWebhookNotificationBlock(
        name="pgdr", url="{{url}}", secrets={"url": settings.notify_url},
        json_data={"subject": "{{subject}}", "text": "{{body}}", "source": "prefect-automation"})
    return block.save(WEBHOOK_BLOCK, overwrite=True)


def zombie_after_default() -> timedelta:
    """Three missed heartbeats."""
    from prefect.settings import get_current_settings

    return timedelta(seconds=3 * (get_current_settings().flows.heartbeat_frequency or 180))


def apply(settings: Settings, zombie_after: timedelta | None = None,
          no_backup_within: timedelta = NO_BACKUP_WITHIN) -> dict[str, Any]:
    """Create or replace every automation on the Prefect server (PREFECT_API_URL)."""
    from prefect import get_client

    block_id = notification_block_id(settings)
    applied = []
    with get_client(sync_client=True) as client:
        for automation in definitions(block_id, zombie_after or zombie_after_default(), no_backup_within):
            for existing in client.read_automations_by_name(automation.name):
                client.delete_automation(existing.id)
            applied.append({"name": automation.name, "id": str(client.create_automation(automation))})
    return {"automations": applied}


def server_notifies_failures() -> bool:
    """Whether the server sends failure notifications of deployment runs (FAILED is there,
    enabled): then a run's own hook leaves them to it."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return any(a.enabled for a in client.read_automations_by_name(FAILED))
