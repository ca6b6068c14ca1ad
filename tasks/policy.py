"""The transient-error policy of every Prefect task: which failures are retried, how often, how soon."""

from __future__ import annotations

import os
from typing import Any

from prefect.cache_policies import NONE
from prefect.tasks import exponential_backoff

from pgdr.ops.errors import is_transient


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may succeed when tried again (pgdr.ops.errors.is_transient: a dropped
    connection, a throttled or briefly failing S3, a PostgreSQL shutting down), never a
    permanent error (bad credentials, a missing bucket or database, bad input, a checksum
    mismatch) nor a bug: retrying those only delays the message."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


# Multiplies every retry delay: tests shorten them; an operator may lengthen them. Read at
# import, because Prefect fixes a task's delays when the task is defined.
_RETRY_DELAY_FACTOR = float(os.environ.get("PGDR_RETRY_DELAY_FACTOR", "1"))


def retrying(times: int, first_delay: float) -> dict[str, Any]:
    """Task options: retry transient failures `times` times, the first after about
    first_delay seconds, doubling each time, with jitter so that runs that failed together
    do not retry together. Prefect logs each retry with its error and delay. No caching:
    every step runs (its inputs, a Repository among them, are not hashed for a cache key)."""
    return {"retries": times, "cache_policy": NONE,
            "retry_delay_seconds": exponential_backoff(first_delay * _RETRY_DELAY_FACTOR),
            "retry_jitter_factor": 0.5, "retry_condition_fn": transient_only}
