"""Reading what pgdr stored, independently of pgdr's own restore code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from pgdr.catalog import catalog
from pgdr.storage.repository import open_repository


def decode_backup(repo_url: str, manifest: catalog.Manifest, dest: Path, gpg_homedir: str | None = None,
                  passphrase: str | None = None) -> Path:
    """Fetch the stored object and decode it with plain gpg and zstd into dest."""
    repo = open_repository(repo_url)
    raw = repo.get_bytes(f"{manifest.prefix}/{manifest.data_key}")
    if manifest.encryption:
        argv = ["gpg", "--batch", "--quiet", "--homedir", gpg_homedir or "", "--decrypt"]
        if passphrase:
            argv[-1:-1] = ["--pinentry-mode", "loopback", "--passphrase", passphrase]
        raw = subprocess.run(argv, input=raw, capture_output=True, check=True).stdout
    dest.write_bytes(subprocess.run(["zstd", "-d", "-c", "-q"], input=raw, capture_output=True,
                                    check=True).stdout)
    return dest


def archive_tables(archive: Path) -> set[str]:
    """Tables whose data the custom-format archive holds (from pg_restore --list)."""
    listing = subprocess.run(["pg_restore", "--list", str(archive)], capture_output=True, text=True,
                             check=True).stdout
    tables = set()
    for line in listing.splitlines():
        if " TABLE DATA " in line:
            # "123; 0 16390 TABLE DATA public vehicles postgres"
            fields = line.split(" TABLE DATA ", 1)[1].split()
            tables.add(f"{fields[0]}.{fields[1]}")
    return tables


def restore_archive(archive: Path, target_url: str) -> None:
    subprocess.run(["pg_restore", "--exit-on-error", "-d", target_url, str(archive)],
                   check=True, capture_output=True)


def audit_records(repo_url: str, operation: str) -> list[dict[str, Any]]:
    """The audit records of one operation in the repository, oldest first."""
    repo = open_repository(repo_url)
    records = [json.loads(repo.get_bytes(info.key)) for info in repo.list("audit/")]
    return sorted((r for r in records if r["operation"] == operation), key=lambda r: r["timestamp"])
