"""Verification records: each backup's history of restore checks (`verified.json`
beside its manifest), and the state it gives the backup."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pgdr.catalog.catalog import Manifest
from pgdr.storage.repository import Repository

if TYPE_CHECKING:
    from pgdr.catalog.index import BackupEntry


def read_verification(repo: Repository, manifest: Manifest | BackupEntry) -> dict[str, Any] | None:
    if not repo.head(manifest.verified_key):
        return None
    history: dict[str, Any] = json.loads(repo.get_bytes(manifest.verified_key))
    return history


def append_verification(repo: Repository, manifest: Manifest, result: dict[str, Any]) -> None:
    """Add one verification result, passed or failed (`success`, `at`, and `reason` when it
    failed), to the backup's history; the newest result is the backup's state."""
    try:
        history = read_verification(repo, manifest)
    except ValueError:
        history = None  # an unreadable history is replaced by what is known now
    history = history or {"backup_id": manifest.backup_id, "results": []}
    history["results"].append(result)
    history["verified"] = result["success"]
    history["last_verified_at"] = result["at"]
    history["reason"] = None if result["success"] else result.get("reason")
    if "manifest_sha256" in result:
        history["manifest_sha256"] = result["manifest_sha256"]
    write_verification(repo, manifest, history)


VERIFIED_STATE, FAILED_STATE, NEVER_STATE = "verified", "failed", "never verified"


def verification_state(history: dict[str, Any] | None) -> tuple[str, str | None, str | None]:
    """(state, when, reason) of a backup from its verification history: its newest result."""
    if not history or "verified" not in history:
        return NEVER_STATE, None, None
    if history["verified"] is True:
        return VERIFIED_STATE, history.get("last_verified_at"), None
    return FAILED_STATE, history.get("last_verified_at"), history.get("reason") or "verification failed"


def write_verification(repo: Repository, manifest: Manifest, result: dict[str, Any]) -> None:
    repo.put_bytes(manifest.verified_key, json.dumps(result, indent=2, sort_keys=True).encode())
