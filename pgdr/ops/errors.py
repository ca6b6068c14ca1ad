"""Errors an operator can act on.

Every message is one line, safe to print: no secret, no traceback needed to understand it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# The password of a URL (scheme://user:password@host), whoever wrote it into a message.
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^@\s/]+@")


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret (of a useful length) in text by ***."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def first_line(error: BaseException | str, secrets: Iterable[str] = ()) -> str:
    """What pgdr prints, records or sends of an error: the first non-blank line of its
    message (an AWS error's code and message; the type's name when there is no text),
    with every secret and any URL's password replaced by ***."""
    aws = getattr(error, "response", None)
    aws_error = aws.get("Error", {}) if isinstance(aws, dict) else {}
    text = (f"{aws_error.get('Code', '')} {aws_error.get('Message', '')}" if aws_error else str(error))
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if not line:
        line = type(error).__name__ if isinstance(error, BaseException) else ""
    return _URL_PASSWORD.sub(r"\1***@", redact(line, secrets))


class PgdrError(Exception):
    """A failure with a clear, secret-free, one-line explanation."""


class ConfigError(PgdrError):
    """Bad input or configuration: fixing the call fixes the problem."""


class NotFoundError(PgdrError):
    """A backup, object or database that was asked for does not exist."""


class IntegrityError(PgdrError):
    """Stored bytes do not match what was recorded: never restore them."""


class FailedWithReport(PgdrError):
    """A run that checked or did several things, some of which failed: the message says
    which, and `details` is the whole report (what `--json` prints)."""

    def __init__(self, message: str, details: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.details = details


class NotReadyYet(PgdrError):
    """What is needed is on its way (an archived backup being restored by S3): run the same
    command again later. The command line exits with status 3."""

    exit_status = 3
class TransientError(PgdrError):
    """A failure that may not happen again (a dropped connection, a throttled or briefly
    failing service): the one kind of error that a step retries."""


class StallError(PgdrError):
    """A data stream that stopped moving: the message names the side that stalled."""


# SQLSTATEs of a server that went away or is coming back: class 08 (connection exception),
# admin/crash shutdown, "cannot connect now", too many connections, a standby's conflict.
_TRANSIENT_SQLSTATES = ("57P01", "57P02", "57P03", "53300", "40001", "40P01")

# What libpq and the server say when the connection, not the request, was the problem.
_TRANSIENT_PG_MESSAGES = (
    "server closed the connection unexpectedly",
    "terminating connection due to administrator command",
    "terminating connection due to unexpected postmaster exit",
    "terminating connection because of crash of another server process",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "could not receive data from server",
    "could not send data to server",
    "no connection to the server",
    "connection refused",
    "connection reset by peer",
    "connection timed out",
    "timeout expired",
    "ssl syscall error",
    "sorry, too many clients already",
    "canceling statement due to conflict with recovery",
)

# S3 error codes worth another try (5xx and throttling); everything else (AccessDenied,
# NoSuchBucket, InvalidArgument...) stays an error however often it is tried.
_TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
    "OperationAborted", "503", "500", "502", "504",
})


def transient_sqlstate(sqlstate: str | None) -> bool:
    return sqlstate is not None and (sqlstate.startswith("08") or sqlstate in _TRANSIENT_SQLSTATES)


def transient_pg_message(text: str) -> bool:
    """True when a libpq / server / pg_dump message says the connection was lost."""
    lowered = text.lower()
    return any(message in lowered for message in _TRANSIENT_PG_MESSAGES)


def transient_s3_error(code: str, http_status: int | None = None) -> bool:
    return code in _TRANSIENT_S3_CODES or (http_status or 0) >= 500 or http_status == 429


def is_transient(exc: BaseException) -> bool:
    """Whether a step that failed with exc may succeed when tried again. pgdr's own errors
    say so by their class; a library's error that escaped unconverted is judged by what it
    is (a lost PostgreSQL connection, a network error of botocore); a child process by its
    stderr (pg_dump whose server connection dropped). Anything else, including bugs, is
    permanent: retrying it only delays the message."""
    if isinstance(exc, TransientError):
        return True
    lines = getattr(exc, "stderr_lines", None)  # pgdr.pipeline.process.CommandError
    if lines is not None:
        return any(transient_pg_message(line) for line in lines)
    if isinstance(exc, PgdrError):
        return False
    module = type(exc).__module__
    if module.startswith("psycopg"):
        sqlstate = getattr(exc, "sqlstate", None)
        return transient_sqlstate(sqlstate) or (sqlstate is None and transient_pg_message(str(exc)))
    if module.startswith("botocore"):
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            return transient_s3_error(error.get("Code", ""),
                                      exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        return isinstance(exc, ConnectionError | HTTPClientError)
    return False
