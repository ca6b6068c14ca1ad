"""A stall watchdog for byte streams: a backup that stops moving fails, and says where.

The stream's code marks where each of its threads waits (`with watchdog.waiting("store")`);
when no wait has ended for the budget (PGDR_STALL_SECONDS, default 300), the watchdog blames
the side that holds the stream up, stops the stream's processes, and the thread that runs
the stream raises StallError. A stalled store (a hung S3 endpoint or NFS mount) may hold its
thread for good: the stream runs its store in a thread of its own that is then abandoned.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from typing import TypeVar

from pgdr.ops.errors import StallError

T = TypeVar("T")

DEFAULT_STALL_SECONDS = 300


def blame(waiting_on: Sequence[str], fallback: str = "encoder") -> str:
    """The side that stalls a stream, from what each of its threads waits on now: a store
    that does not take bytes holds up everything before it, then a database that sends
    none; a thread waiting on the encoder is only to blame when nothing else is."""
    for side in ("store", "database"):
        if side in waiting_on:
            return side
    return fallback


class StallWatchdog:
    def __init__(self, what: str, seconds: float, on_stall: Callable[[], None]) -> None:
        self.what = what
        self.seconds = seconds
        self.on_stall = on_stall
        self.stalled: str | None = None
        self._last_moved = time.monotonic()
        self._waits: dict[int, list[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def __enter__(self) -> StallWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def waiting(self, side: str) -> Iterator[None]:
        """Around a call that blocks until `side` moves bytes; its end counts as movement."""
        stack = self._waits.setdefault(threading.get_ident(), [])
        with self._lock:
            stack.append(side)
        try:
            yield
        finally:
            with self._lock:
                stack.pop()
                self._last_moved = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.seconds / 4)):
            with self._lock:
                idle = time.monotonic() - self._last_moved
                innermost = [stack[-1] for stack in self._waits.values() if stack]
            if idle >= self.seconds:
                self.stalled = blame(innermost)
                self.on_stall()
                return

    def check(self) -> None:
        """StallError once the stream stalled."""
        if self.stalled:
            raise StallError(f"the {self.stalled} stalled: no byte of the {self.what} moved for "
                             f"{self.seconds:g} s (PGDR_STALL_SECONDS)")

    def run(self, function: Callable[[], T]) -> T:
        """function() in a thread of its own (with this context), waited for until it ends
        or the stream stalls: then StallError here, and the thread is left to its fate."""
        future: Future[T] = Future()

        def target() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(target,), name=f"{self.what}-store",
                         daemon=True).start()
        while not self.stalled and not wait([future], timeout=0.5).done:
            pass
        self.check()  # a stall explains the failure better than what it caused
        return future.result()


def stall_seconds() -> float:
    """The stall budget of every data stream (PGDR_STALL_SECONDS, default 300)."""
    from pgdr.ops.settings import load_settings

    return load_settings().stall_seconds
