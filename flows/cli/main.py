"""Reading the command line and running one command: its exit status, its one error line,
its output (a person's lines, or --json), SIGTERM and Ctrl-C.

The commands are listed here by import path only: a command's module is imported when
that command runs, so `wal-push` loads none of the others (`pgdr --help` loads them all).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from flows.cli.common import secrets
from pgdr.ops.errors import PgdrError, first_line, redact

# Help panel: [(command name, "module:function" under flows.cli)]. A new command is one
# decorated function in its module and one line here.
COMMANDS: dict[str, list[tuple[str, str]]] = {
    "Database backups": [
        ("backup", "backups:backup"),
        ("list", "inventory:list_"),
        ("restore", "backups:restore"),
        ("restore-temp", "backups:restore_temp"),
        ("rollback", "backups:rollback"),
        ("repair", "backups:repair"),
        ("verify", "backups:verify"),
        ("recover-table", "backups:recover_table"),
        ("status", "inventory:status"),
    ],
    "Point-in-time recovery": [
        ("wal-push", "wal:wal_push"),
        ("wal-fetch", "wal:wal_fetch"),
        ("archive-status", "archive:archive_status"),
        ("check", "archive:check"),
        ("wal-prune", "archive:wal_prune"),
        ("basebackup", "archive:basebackup"),
        ("pitr", "archive:pitr"),
    ],
    "Disaster recovery": [
        ("failover", "dr:failover"),
        ("drill", "dr:drill"),
        ("fleet", "dr:fleet"),
    ],
    "Files and object storage": [
        ("files", "objects:files"),
        ("restore-files", "objects:restore_files"),
        ("storage-snapshot", "objects:storage_snapshot"),
        ("storage-restore", "objects:storage_restore"),
    ],
    "Repository and server": [
        ("prune", "repository:prune"),
        ("replicate", "repository:replicate"),
        ("init-repo", "repository:init_repo"),
        ("automations", "repository:automations"),
    ],
}


# PostgreSQL runs wal-push and wal-fetch once per WAL segment, monitoring runs list and
# status often: their plain command lines are bound without importing the parser (see
# _bind_plainly), which would cost more CPU than archiving a small segment.
PLAIN = ("wal-push", "wal-fetch", "list", "status")


def build_app(argv: Sequence[str] = ()) -> Any:
    """The parser (a cyclopts App). When argv names a command, only that command's module
    is imported."""
    from cyclopts import App, Group, Parameter

    app = App(name="pgdr", help="Backup and disaster recovery for PostgreSQL, as Prefect flows.",
              version_flags=(), help_format="plaintext",  # help texts hold <db>_*, not markup
              # An option given twice: the last one counts (scripts append overrides).
              default_parameter=Parameter(negative=(), allow_repeating=True, show_default=_shown_default))
    asked = {name for commands in COMMANDS.values() for name, _ in commands} & set(argv[:1])
    for order, (title, commands) in enumerate(COMMANDS.items()):
        group = Group(title, sort_key=order)
        for place, (name, target) in enumerate(commands):
            if not asked or name in asked:
                app.command(_load(target), name=name, group=group, sort_key=place)
    return app


def _load(target: str) -> Callable[..., Any]:
    module, function = target.split(":")
    loaded: Callable[..., Any] = getattr(importlib.import_module(f"flows.cli.{module}"), function)
    return loaded


def _bind_plainly(argv: Sequence[str]) -> tuple[Callable[..., Any], list[Any], dict[str, Any]] | None:
    """(command, args, kwargs) of a PLAIN command line that holds only positionals,
    `--option VALUE` (str or int) and `--flag`, read from the command's own signature like
    the parser would; None for anything else (--help, a mistake), which the parser then
    reads and explains."""
    if not argv or argv[0] not in PLAIN:
        return None
    target = next(t for commands in COMMANDS.values() for name, t in commands if name == argv[0])
    function = _load(target)
    parameters = inspect.signature(function).parameters.values()
    positional = [p for p in parameters if p.kind is p.POSITIONAL_ONLY]
    options = {f"--{p.name.replace('_', '-')}": p for p in parameters if p.kind is p.KEYWORD_ONLY}
    convert: dict[str, Callable[[str], Any]] = {"str": str, "str | None": str, "int": int}
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    tokens = iter(argv[1:])
    for token in tokens:
        name, equals, inline = token.partition("=")
        option = options.get(name)
        if not token.startswith("-"):
            args.append(token)
        elif option is not None and option.annotation == "bool" and not equals:
            kwargs[option.name] = True
        elif option is not None and option.annotation in convert:
            value = inline if equals else next(tokens, None)
            if value is None or value.startswith("-"):
                return None
            try:
                kwargs[option.name] = convert[option.annotation](value)
            except ValueError:
                return None
        else:
            return None
    if len(args) != len(positional):
        return None
    return function, args, kwargs


def _shown_default(value: object) -> object:
    """Help shows a default value, but not that a flag is off unless given."""
    return None if value is False else value


def _terminal_progress() -> None:
    """A progress line on stderr while a flow runs, when a person is watching."""
    if not sys.stderr.isatty():
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from tasks.artifacts import add_progress_listener

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), transient=True, console=None)
    tasks: dict[str, Any] = {}

    def listener(label: str, done: int, total: int | None) -> None:
        if done < 0:
            if label in tasks:
                bar.remove_task(tasks.pop(label))
            if not tasks:
                bar.stop()
            return
        if label not in tasks:
            bar.start()
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=min(done, total) if total else done)

    add_progress_listener(listener)


@contextlib.contextmanager
def _quiet_console(verbose: bool) -> Iterator[None]:
    """While a flow runs for the command line, Prefect's console log stays off stderr
    (its records still reach the Prefect server): the person sees a progress bar and one
    result or error line, never a traceback. --verbose shows the log, still without
    tracebacks."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # Prefect 3.8 adds its console handler lazily, at the first run

    class NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.exc_info = None
            record.exc_text = None
            return verbose and record.levelno >= logging.INFO

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    quiet = NoTraceback()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled flow run, a stopped container): unwind like Ctrl-C so that
    child processes are killed and an unfinished upload is aborted, not left behind."""


def _on_sigterm(signum: int, frame: object) -> None:
    from pgdr.pipeline.process import kill_running_pipelines
    from pgdr.pipeline.termination import defer_termination

    if defer_termination():
        return  # a step that must not stop half-way (a swap) is running: it ends, then this
    kill_running_pipelines()  # pg_dump & co. run in sessions of their own: stop them first
    raise _Terminated()


def _exit_without_teardown(status: list[int]) -> None:
    """Last of the `pgdr` process's exit handlers, so after Prefect's (which send the
    run's last logs and events): exit with main's status without tearing the interpreter
    down, which costs about half a second of CPU once Prefect is loaded and saves nothing
    (every file and upload is complete by then)."""
    if not status:
        return  # main did not return: let Python report what happened
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status[0])


def _run(function: Callable[..., dict[str, Any]], args: Sequence[Any], kwargs: dict[str, Any],
         as_json: bool, verbose: bool) -> dict[str, Any]:
    """The command itself; a flow's under a quiet console, with a progress bar."""
    if not function.pgdr_runs_flow:  # type: ignore[attr-defined]
        return function(*args, **kwargs)
    if not as_json:
        _terminal_progress()
    if not verbose:
        # Also for the logging setup a temporary Prefect server redoes at its start.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    with _quiet_console(verbose):
        return function(*args, **kwargs)


def _parse(argv: Sequence[str]) -> tuple[Callable[..., Any], list[Any], dict[str, Any]] | int:
    """(command, args, kwargs), or the exit status of --help (0) or of a wrong command line (2)."""
    if not argv:
        print("pgdr: error: name a command (pgdr --help lists them)", file=sys.stderr)
        return 2
    plain = _bind_plainly(argv)
    if plain is not None:
        return plain
    from cyclopts import CycloptsError

    try:
        function, bound, _ = build_app(argv).parse_args(list(argv), exit_on_error=False, print_error=False)
    except CycloptsError as exc:
        print(f"pgdr: error: {str(exc).strip()}", file=sys.stderr)
        return 2
    if not hasattr(function, "pgdr_show"):  # --help
        function(*bound.args, **bound.kwargs)
        return 0
    return function, list(bound.args), dict(bound.kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the pgdr command itself, not a caller in Python
        status: list[int] = []
        atexit.register(_exit_without_teardown, status)  # registered first, runs last
        status.append(main(sys.argv[1:]))
        return status[0]
    parsed = _parse(argv)
    if isinstance(parsed, int):
        return parsed
    function, args, kwargs = parsed
    # The output options: an `output` group (json, verbose), or a plain `json` (PLAIN commands).
    output = kwargs.get("output")
    as_json = getattr(output, "json", kwargs.get("json", False))
    verbose = getattr(output, "verbose", False)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL Prefect starts a temporary server; on a busy machine it needs
    # longer than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        result = _run(function, args, kwargs, as_json, verbose)
    except PgdrError as exc:
        details = getattr(exc, "details", None)
        if as_json and details is not None:
            sys.stdout.write(json.dumps(details, sort_keys=True, default=str) + "\n")
        if not getattr(exc, "quiet", False):
            print(f"pgdr: error: {redact(str(exc), secrets())}", file=sys.stderr)
        return getattr(exc, "exit_status", 1)
    except _Terminated:
        print("pgdr: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("pgdr: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected fault: one line, still no secret
        if os.environ.get("PGDR_DEBUG"):
            raise
        message = first_line(f"{type(exc).__name__}: {exc}", secrets())
        print(f"pgdr: error: {message}", file=sys.stderr)
        return 1
    if as_json:
        sys.stdout.write(json.dumps(result, sort_keys=True, default=str) + "\n")
    else:
        function.pgdr_show(result)  # type: ignore[attr-defined]
    return 0 if result.get("ok", True) else 1
