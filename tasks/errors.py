"""Errors an operator can act on.

Every message is one line, safe to print: no secret, no traceback needed to understand it.
"""


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

    def __init__(self, message: str, details: dict) -> None:
        super().__init__(message)
        self.details = details


class NotReadyYet(PgdrError):
    """What is needed is on its way (an archived backup being restored by S3): run the same
    command again later. The command line exits with status 3."""

    exit_status = 3
