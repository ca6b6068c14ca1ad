"""Notifications: what went wrong, where, and a link to the run, sent to a JSON webhook
(PGDR_NOTIFY_URL) and/or a Prefect notification block (PGDR_NOTIFY_BLOCK, e.g.
`slack-webhook/ops-alerts`, `email/dba`, `custom-webhook/pager`).

No Prefect import at module level; every text sent is redacted of the settings' secrets.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pgdr.ops.errors import ConfigError, PgdrError, first_line, redact
from pgdr.ops.settings import Settings

_MAX_REASON = 500


@dataclass(frozen=True)
class Notice:
    """One flow run's outcome, as an operator needs it at 3 a.m."""

    flow: str
    ok: bool
    database: str | None = None
    step: str | None = None
    reason: str | None = None
    run_name: str | None = None
    run_url: str | None = None

    @property
    def subject(self) -> str:
        outcome = "succeeded" if self.ok else "FAILED"
        return f"pgdr {self.flow} {outcome}" + (f" for {self.database}" if self.database else "")

    @property
    def body(self) -> str:
        lines = [self.subject]
        if self.step:
            lines.append(f"step: {self.step}")
        if self.reason:
            lines.append(f"reason: {self.reason}")
        if self.run_url or self.run_name:
            lines.append(f"run: {self.run_url or self.run_name}")
        return "\n".join(lines)

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON: `text` for Slack-compatible receivers, the fields for others."""
        return {"text": self.body, "subject": self.subject, "status": "success" if self.ok else "failed",
                **asdict(self)}

    def redacted(self, secrets: list[str]) -> Notice:
        fields: dict[str, Any] = {key: redact(value, secrets) if isinstance(value, str) else value
                                  for key, value in asdict(self).items()}
        return Notice(**fields)


def one_line(error: BaseException | str | None) -> str | None:
    """The first line of an error, shortened: a notification is not a traceback."""
    if error is None:
        return None
    if isinstance(error, BaseException) and not isinstance(error, PgdrError):
        error = f"{type(error).__name__}: {first_line(error)}"  # an unexpected error: its type says a lot
    line = first_line(error)
    return line if len(line) <= _MAX_REASON else line[:_MAX_REASON - 1] + "…"


def post_json(url: str, payload: dict[str, Any], timeout: float = 10.0) -> None:
    """POST the payload as JSON. Errors never quote the URL: webhook URLs carry tokens."""
    if not url.startswith(("https://", "http://")):
        raise ConfigError("PGDR_NOTIFY_URL must be an http(s) URL")
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",  # noqa: S310
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only
            response.read()
    except urllib.error.HTTPError as exc:
        raise PgdrError(f"the notification webhook answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PgdrError(f"the notification webhook is unreachable: {reason}") from None


def send_block(name: str, subject: str, body: str) -> None:
    """Through a saved Prefect notification block, named `<block-type>/<block-name>`."""
    if "/" not in name:
        raise ConfigError(f"PGDR_NOTIFY_BLOCK must be <block-type>/<block-name>, e.g. slack-webhook/{name}")
    from prefect.blocks.core import Block

    Block.load(name).notify(body, subject=subject)  # type: ignore[union-attr]  # Prefect's sync/async API


def configured(settings: Settings) -> bool:
    return bool(settings.notify_url or settings.notify_block)


def send(notice: Notice, settings: Settings) -> list[str]:
    """Send through every configured channel; returns the channels used. Raises the
    first failure only after trying them all."""
    clean = notice.redacted(settings.secrets())
    used: list[str] = []
    errors: list[Exception] = []
    channels: list[tuple[str, Callable[[], None]]] = []
    if settings.notify_url:
        channels.append(("webhook", lambda: post_json(settings.notify_url or "", clean.payload())))
    if settings.notify_block:
        channels.append((f"block {settings.notify_block}",
                         lambda: send_block(settings.notify_block or "", clean.subject, clean.body)))
    for label, deliver in channels:
        try:
            deliver()
            used.append(label)
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return used
