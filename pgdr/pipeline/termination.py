"""SIGTERM during steps that must not stop half-way: it takes effect once the step is done.

The command line's SIGTERM handler asks defer_termination() first; a block run under
termination_deferred() (the swap of a restore) then finishes before pgdr stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

_critical_depth = 0
_termination_pending = threading.Event()


@contextlib.contextmanager
def termination_deferred() -> Iterator[None]:
    """A SIGTERM that arrives during the block takes effect when the block has finished:
    for steps that must complete once begun (the swap of a restore). In the main thread the
    block has its own handler (Prefect's flow engine installs one of its own meanwhile)."""
    global _critical_depth
    try:
        previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: _termination_pending.set())
    except ValueError:  # not the main thread: the command line's handler defers it
        previous = None
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if _critical_depth == 0 and _termination_pending.is_set():
            os.kill(os.getpid(), signal.SIGTERM)  # now it is handled


def defer_termination() -> bool:
    """Called by the SIGTERM handler: True (and the signal kept for later) while a
    termination_deferred block runs."""
    if _critical_depth > 0:
        _termination_pending.set()
        return True
    _termination_pending.clear()
    return False


def termination_pending() -> bool:
    return _termination_pending.is_set()

