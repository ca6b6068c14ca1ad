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


# Each command's options are declared on its command function, and the flow's parameters on
# the flow (Prefect builds the UI's form and the deployments' schema from them). What keeps
# the two from drifting apart: every flow parameter has its option, under the same name
# unless it is listed here, and an option of the same name has the flow's default.
FLOWS_OF = {
    "backup": ["flows.backup:backup"], "restore": ["flows.restore:restore"],
    "restore-temp": ["flows.restore:restore_to_temp"], "rollback": ["flows.restore:rollback"],
    "repair": ["flows.restore:repair"], "verify": ["flows.verify:verify"],
    "recover-table": ["flows.recover_table:recover_table"], "basebackup": ["flows.basebackup:basebackup"],
    "pitr": ["flows.pitr:pitr", "flows.pitr:rds_point_in_time_recovery"],
    "failover": ["flows.failover:failover"], "drill": ["flows.drill:drill"], "fleet": ["flows.fleet:fleet"],
    "files": ["flows.files:files"], "restore-files": ["flows.files:restore_files"],
    "storage-snapshot": ["flows.storage:storage_snapshot"],
    "storage-restore": ["flows.storage:storage_restore"],
    "prune": ["flows.prune:prune"], "replicate": ["flows.replicate:replicate"],
}
# flow parameter: the option that sets it, where a person's word differs from the flow's
OPTION_FOR = {
    "backup_id": "backup", "tables": "table", "paths": "path", "databases": "db", "servers": "server",
    "pre_restore_backup": "no_pre_restore_backup", "fast_checkpoint": "spread_checkpoint",
    "kind": "full", "target_timeline": "timeline", "timeout_seconds": "timeout", "keep_running": "stop",
    "source_instance": "rds_source", "target_instance": "rds_target", "instance_class": "rds_instance_class",
    "health_urls": "health_url", "health_timeout_seconds": "health_timeout",
    "failover": "with_failover_dry_run", "replica_repo": "replica",
}
# flow parameters no person sets: the command line fills them in, or only a deployment does
NOT_AN_OPTION = {
    ("drill", "started_at"): "the process's start, so that the measured RTO includes pgdr's own",
    ("pitr", "pgdr_path"): "this pgdr, which the recovering server's restore_command runs",
    ("replicate", "only_when_configured"): "the replicate/frequent deployment's: no replica is no error",
}


def _options_of(function) -> dict[str, object]:
    """A command function's options by Python name, option groups expanded, with defaults."""
    import dataclasses
    import inspect

    options: dict[str, object] = {}
    for parameter in inspect.signature(function).parameters.values():
        if dataclasses.is_dataclass(parameter.default):
            options.update({f.name: getattr(parameter.default, f.name)
                            for f in dataclasses.fields(parameter.default)})
        else:
            options[parameter.name] = parameter.default
    return options


def test_every_flow_parameter_has_its_option_with_the_flow_default():
    import importlib
    import inspect

    commands = {name: path for group in COMMANDS.values() for name, path in group}
    assert set(FLOWS_OF) == {name for name, path in commands.items()
                             if getattr(_command(path), "pgdr_runs_flow", False)}
    for name, flows in FLOWS_OF.items():
        options = _options_of(_command(commands[name]))
        for path in flows:
            module, attribute = path.split(":")
            flow = getattr(importlib.import_module(module), attribute)
            for parameter in inspect.signature(flow.fn).parameters.values():
                if (name, parameter.name) in NOT_AN_OPTION:
                    continue
                option = OPTION_FOR.get(parameter.name, parameter.name)
                assert option in options, f"{path}: parameter {parameter.name} has no option in `pgdr {name}`"
                default = options[option]
                if option == parameter.name and default is not inspect.Parameter.empty \
                        and parameter.default is not inspect.Parameter.empty:
                    assert default == parameter.default, (name, option, default, parameter.default)


def _command(path: str):
    import importlib

    module, function = path.split(":")
    return getattr(importlib.import_module(f"flows.cli.{module}"), function)
