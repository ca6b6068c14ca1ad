"""Running `pgdr` in-process, as a person or a script would from a shell."""

from __future__ import annotations

import json
from typing import Any

from flows.cli import main


def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `pgdr argv...`."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def result_types() -> dict[str, type]:
    """The declared `--json` result of each command that has one: every successful
    cli_json of these commands is checked against it, key for key."""
    from flows.backup import BackupResult
    from flows.basebackup import BaseBackupResult
    from flows.cli.results import ArchiveStatusResult, ListResult, WalFetchResult, WalPushResult
    from flows.files import FilesBackupResult, FilesRestoreResult
    from flows.prune import PruneResult
    from flows.replicate import ReplicateResult
    from flows.restore import RepairResult, RestoreResult, RollbackResult, TempRestoreResult
    from flows.storage import SnapshotResult, StorageRestoreResult
    from flows.verify import VerifyResult

    return {"backup": BackupResult, "basebackup": BaseBackupResult, "list": ListResult,
            "wal-push": WalPushResult, "wal-fetch": WalFetchResult, "files": FilesBackupResult,
            "restore-files": FilesRestoreResult, "storage-snapshot": SnapshotResult,
            "storage-restore": StorageRestoreResult, "restore": RestoreResult,
            "restore-temp": TempRestoreResult, "rollback": RollbackResult, "repair": RepairResult,
            "prune": PruneResult, "replicate": ReplicateResult, "verify": VerifyResult,
            "archive-status": ArchiveStatusResult}


def cli_json(capsys: Any, *argv: str) -> dict[str, Any]:
    """The JSON object of a successful `pgdr argv... --json`, with the keys its command
    declares: every required one, and no other."""
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    result = json.loads(out)
    physical = "--physical" in argv  # restore --physical reports the point-in-time recovery
    declared = None if physical else result_types().get(argv[0])
    if declared is not None:
        required = declared.__required_keys__  # type: ignore[attr-defined]
        allowed = required | declared.__optional_keys__  # type: ignore[attr-defined]
        missing, extra = sorted(required - set(result)), sorted(set(result) - allowed)
        assert not missing and not extra, f"{argv[0]} --json: {missing} missing, {extra} extra"
    return result


def error_line(err: str) -> str:
    """The single `pgdr: error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("pgdr:")]
    assert len(lines) == 1, err
    return lines[0]
