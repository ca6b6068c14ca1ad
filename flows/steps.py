"""The named steps flows are made of: Prefect tasks around the plain functions in tasks/.

tasks/ never imports Prefect (the WAL commands must start in milliseconds); retries,
timeouts, tags, artifacts and progress live here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from tasks import audit, catalog
from tasks.errors import PgdrError
from tasks.repository import Repository, open_repository
from tasks.settings import Settings

ProgressListener = Callable[[str, int, int | None], None]
_listeners: list[ProgressListener] = []


def add_progress_listener(listener: ProgressListener) -> None:
    """The command line registers its progress bar here."""
    _listeners.append(listener)


class Progress:
    """One long operation's progress: a Prefect progress artifact, and the terminal's
    progress bar when a person is watching."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label = label
        self.total = total
        self.artifact_id = _quietly(create_progress_artifact, progress=0.0, description=label)

    def update(self, done: int) -> None:
        for listener in _listeners:
            listener(self.label, done, self.total)
        if self.artifact_id and self.total:
            _quietly(update_progress_artifact, self.artifact_id, min(99.0, 100.0 * done / self.total))

    def finish(self) -> None:
        for listener in _listeners:
            listener(self.label, -1, self.total)
        if self.artifact_id:
            _quietly(update_progress_artifact, self.artifact_id, 100.0)


def _quietly(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Progress is a nicety, never a reason for a backup to fail."""
    try:
        return function(*args, **kwargs)
    except Exception:
        return None


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry unexpected errors (network, S3), not PgdrErrors: those are permanent and
    clearly explained, and a retry would only delay the message."""
    try:
        state.result()
    except PgdrError:
        return False
    except Exception:
        return True
    return False


def open_repo(url: str, settings: Settings) -> Repository:
    return open_repository(url, sse=settings.s3_sse, kms_key_id=settings.s3_kms_key_id,
                           region=settings.aws_region)


@task(name="write manifest", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=transient_only)
def write_manifest(repo_url: str, settings: Settings, manifest: catalog.Manifest) -> str:
    """The completion marker, written last."""
    repo = open_repo(repo_url, settings)
    repo.put_bytes(manifest.manifest_key, manifest.to_json())
    return manifest.manifest_key


@task(name="record audit", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=transient_only)
def record_audit(repo_url: str, settings: Settings, record: dict[str, Any]) -> str:
    """The runbook's audit record in the repository, and a Prefect event."""
    key = audit.write_audit(open_repo(repo_url, settings), record)
    try:
        from prefect.events import emit_event

        emit_event(
            event=f"pgdr.{record['operation']}.{record['status']}",
            resource={"prefect.resource.id": f"pgdr.database.{record['source']}"},
            payload=record,
        )
    except Exception as exc:  # an event is a convenience; the record is stored
        get_run_logger().warning("could not emit the audit event: %s", exc)
    return key


def record_failure(repo_url: str, settings: Settings, record: dict[str, Any]) -> None:
    """Audit a failed operation without hiding why it failed: if even the audit record
    cannot be written (the repository may be the problem), say so in the log."""
    try:
        record_audit(repo_url, settings, record)
    except Exception as exc:
        get_run_logger().warning("could not write the audit record of this failure: %s", exc)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    create_table_artifact(key=key, table=rows, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=key, markdown=markdown, description=description)


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TB"


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started
