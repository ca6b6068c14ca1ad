"""The command line's contract, without a database: every command and option spelling
that scripts, prefect.yaml, workflows and archive_command use; help for each; the exit
status of a wrong command line; the plain commands bound without the parser."""

from __future__ import annotations

import re

import pytest

from flows.cli.main import COMMANDS, _bind_plainly, build_app
from tests.support.cli import error_line, run_cli

# command: (positionals, options besides --json, runs a flow (so --verbose/-v too))
CONTRACT = {
    "backup": ("", "--db --encrypt-to --repo --tier", True),
    "restore": ("BACKUP", "--archive-wait-hours --create-roles --datadir --db --encrypt-to --jobs --no-acl "
                "--no-owner --no-pre-restore-backup --no-wait --physical --repo --stop-writes-first --table "
                "--target", True),
    "restore-temp": ("BACKUP", "--archive-wait-hours --create-roles --db --jobs --keep --no-acl --no-owner "
                     "--no-wait --repo --server", True),
    "rollback": ("", "--repo --target", True),
    "repair": ("", "--target", True),
    "verify": ("", "--db --max-age-hours --repo --server", True),
    "failover": ("", "--accept-stale --backup --create-roles --db --dry-run --force-record-value "
                 "--health-sql --health-timeout --health-url --max-backup-age-hours --no-acl --no-owner "
                 "--rds-from-snapshot --rds-instance-class --rds-poll-seconds --rds-source-instance "
                 "--rds-subnet-group "
                 "--rds-target-instance --rds-timeout-minutes --record-name --record-type --record-value "
                 "--region --repo --target --ttl --zone-id", True),
    "drill": ("", "--backup --create-roles --db --failover-repo --health-sql --health-url "
              "--max-backup-age-hours --no-acl --pitr --record-name --record-type --record-value --region "
              "--repo --rpo-target-minutes --rto-target-minutes --scenario --server --ttl "
              "--with-failover-dry-run --zone-id", True),
    "files": ("", "--encrypt-to --name --path --repo --tier", True),
    "restore-files": ("BACKUP", "--dest --name --overwrite --repo", True),
    "storage-snapshot": ("", "--repo --source --tier", True),
    "storage-restore": ("SNAPSHOT", "--bucket --dest --overwrite --repo", True),
    "fleet": ("ACTION", "--db --deployment --exclude --host-limit --include --local --max-parallel --repo "
              "--server --tier --verify-server", True),
    "recover-table": ("BACKUP", "--db --dry-run --jobs --mode --no-owner --repo --table --target --where",
                      True),
    "prune": ("", "--area --bucket --db --dry-run --name --repo --server --tier", True),
    "replicate": ("", "--all --replica --repo", True),
    "automations": ("ACTION", "--zombie-after", False),
    "init-repo": ("", "--archive-after-days --kms-key-id --object-lock-days --object-lock-mode --repo --sse",
                  False),
    "status": ("", "--db --repo --server", False),
    "wal-push": ("PATH", "--db --encrypt-to --jobs --repo --spool", False),
    "wal-fetch": ("NAME PATH", "--db --repo", False),
    "archive-status": ("", "--db --repo", False),
    "check": ("", "--db --max-base-age-hours --name --repo --timeout", False),
    "wal-prune": ("", "--db --dry-run --repo", False),
    "basebackup": ("", "--db --encrypt-to --full --incremental --name --repo --spread-checkpoint "
                   "--tier", True),
    "pitr": ("", "--backup --datadir --db --port --rds-instance-class --rds-source --rds-target --repo "
             "--stop --target-lsn --target-name --target-time --timeline --timeout", True),
    "list": ("", "--db --repo", False),
}


def _arguments(name: str) -> list:
    """The leaf arguments of one command (option groups expanded)."""
    return [a for a in build_app()[name].assemble_argument_collection(parse_docstring=True)
            if not a.children]


def test_every_command_keeps_its_name_and_every_option_spelling():
    listed = {name for commands in COMMANDS.values() for name, _ in commands}
    assert listed == set(CONTRACT)
    for name, (positionals, options, runs_flow) in CONTRACT.items():
        arguments = _arguments(name)
        spelled = {n for a in arguments for n in a.names if n.startswith("-")}
        expected = set(options.split()) | {"--json"} | ({"--verbose", "-v"} if runs_flow else set())
        assert expected <= spelled, (name, expected - spelled)
        assert [a.names[0] for a in arguments if a.field_info.kind is a.field_info.POSITIONAL_ONLY] == \
            positionals.split(), name


def test_every_option_has_help_and_help_lists_it(capsys):
    for name in CONTRACT:
        undocumented = [a.names[0] for a in _arguments(name) if not a.parameter.help]
        assert undocumented == [], (name, undocumented)
        code, out, _ = run_cli(capsys, name, "--help")
        assert code == 0
        for argument in _arguments(name):
            spelling = re.escape(argument.names[0])
            assert re.search(rf"(?<![\w-]){spelling}(?![\w-])", out), (name, argument.names)
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(name in out for name in CONTRACT)


@pytest.mark.parametrize("argv", [
    ["list", "--no-such-option"],
    ["restore", "latest", "--jobs", "many"],
    ["fleet", "everything"],
    ["recover-table", "latest", "--target", "postgresql://h/db"],  # --table is required
    ["pitr", "--target-time", "2026-01-28T02:00Z", "--target-lsn", "0/3000060"],
    ["no-such-command"],
    [],
    ["list", "--no-json"],  # no negative forms of flags
])
def test_a_wrong_command_line_exits_2_with_one_error_line(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert (code, out) == (2, "")
    assert error_line(err).startswith("pgdr: error: ")


@pytest.mark.parametrize("argv", [
    ["wal-push", "pg_wal/000000010000000000000001"],
    ["wal-push", "p", "--repo", "s3://b/p", "--db", "fleet", "--encrypt-to", "ops@example.com", "--json"],
    ["wal-push", "--jobs", "4", "p", "--spool=/var/spool/pgdr"],
    ["wal-push", "p", "--db=", "--repo", "file:///r"],
    ["wal-fetch", "000000010000000000000001", "pg_wal/RECOVERYXLOG", "--repo", "file:///r", "--db", "x"],
    ["list", "--repo", "s3://b/p", "--db", "fleet", "--json"],
    ["list"],
    ["status", "--server", "postgresql://admin@h/postgres", "--db=fleet"],
])
def test_plain_commands_bind_like_the_parser(argv):
    plain = _bind_plainly(argv)
    function, bound, _ = build_app(argv).parse_args(argv)
    assert plain == (function, list(bound.args), dict(bound.kwargs))


def test_an_option_given_twice_counts_once_the_last_and_lists_append():
    _, bound, _ = build_app().parse_args(["failover", "--ttl", "60", "--zone-id", "Z", "--ttl", "30",
                                          "--health-url", "http://a", "--health-url", "http://b"])
    dns = bound.arguments["dns"]
    assert (dns.ttl, dns.zone_id, dns.health_url) == (30, "Z", ["http://a", "http://b"])
    plain = _bind_plainly(["wal-push", "p", "--db", "a", "--db", "b"])
    assert plain is not None and plain[2] == {"db": "b"}


@pytest.mark.parametrize("argv", [
    ["wal-push", "--help"], ["wal-push"], ["wal-push", "p", "--jobs", "x"], ["wal-push", "p", "--bogus"],
    ["wal-push", "p", "--repo"], ["wal-fetch", "n"], ["list", "extra"], ["status", "--help"],
    ["backup", "--db", "x"],
])
def test_anything_else_goes_to_the_parser(argv):
    assert _bind_plainly(argv) is None
