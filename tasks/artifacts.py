"""What a person watching a run sees: Prefect artifacts, tables, progress, sizes."""

from __future__ import annotations

import contextvars
import hashlib
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

ProgressListener = Callable[[str, int, int | None], None]


_listeners: list[ProgressListener] = []


def add_progress_listener(listener: ProgressListener) -> None:
    """The command line registers its progress bar here."""
    _listeners.append(listener)


class Progress:
    """One long operation's progress, as a context manager: a Prefect progress artifact,
    and the terminal's progress bar when a person is watching. The artifact is updated from
    a thread of its own, once a second at most: a call to the Prefect API never holds up
    the data. It reaches 100% only when the operation ends without an error."""

    def __init__(self, label: str, total: int | None, *, terminal: bool = True) -> None:
        self.label = label
        self.total = total
        # The terminal's bar counts bytes: a count of other things stays in the artifact.
        self.listeners = _listeners if terminal else []
        self.artifact_id = _quietly(create_progress_artifact, progress=0.0, description=label)
        self.done = 0
        self.finished = threading.Event()
        self.poster: threading.Thread | None = None

    def update(self, done: int) -> None:
        self.done = done
        for listener in self.listeners:
            listener(self.label, done, self.total)
        if self.artifact_id and self.total and self.poster is None:
            # With this context: it says which Prefect API to talk to.
            self.poster = threading.Thread(target=contextvars.copy_context().run, args=(self._post,),
                                           name="progress", daemon=True)
            self.poster.start()

    def _post(self) -> None:
        posted = -1
        while not self.finished.wait(1.0):
            if self.done != posted:
                posted = self.done
                percent = min(99.0, 100.0 * posted / (self.total or 1))
                _quietly(update_progress_artifact, self.artifact_id, percent)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.finished.set()
        if self.poster:
            self.poster.join()
        for listener in self.listeners:
            listener(self.label, -1, self.total)
        if self.artifact_id and exc_type is None:
            _quietly(update_progress_artifact, self.artifact_id, 100.0)


def _quietly(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Progress is a nicety, never a reason for a backup to fail."""
    try:
        return function(*args, **kwargs)
    except Exception:
        return None


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def artifact_key(kind: str, name: str) -> str:
    """`<kind>-<name>` as Prefect accepts artifact keys (lower-case ASCII letters, digits,
    dashes): a name that is not one already becomes its ASCII slug plus a short hash, so
    that any database name works and two names never share a key."""
    if re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name):
        return f"{kind}-{name}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{kind}-{slug}-{digest}" if slug else f"{kind}-{digest}"


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
