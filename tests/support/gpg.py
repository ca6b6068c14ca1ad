"""A throwaway GnuPG home with two keys: one bare, one protected by a passphrase."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.secrets import GPG_PASSPHRASE

USER_ID = "pgdr test <pgdr@example.test>"
PROTECTED_USER_ID = "pgdr protected <pgdr-protected@example.test>"


@dataclass(frozen=True)
class GpgHome:
    """The `gpg` fixture: pass `homedir` to gpg explicitly; GNUPGHOME is never set."""

    homedir: str
    fingerprint: str
    protected_fingerprint: str
    passphrase: str

    def run(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """gpg in batch mode against this home."""
        return subprocess.run(
            ["gpg", "--homedir", self.homedir, "--batch", "--yes", *args],
            input=input, capture_output=True, check=check,
        )

    def close(self) -> None:
        _remove(self.homedir)


def _remove(homedir: str) -> None:
    """Stop the home's gpg-agent (it outlives gpg) and delete the home."""
    subprocess.run(
        ["gpgconf", "--homedir", homedir, "--kill", "all"], capture_output=True, check=False
    )
    shutil.rmtree(homedir, ignore_errors=True)


def _generate(homedir: str, user_id: str, passphrase: str) -> str:
    # future-default: an ed25519 signing key with a cv25519 encryption subkey, made in
    # milliseconds (RSA would take seconds). The passphrase goes in on stdin, not argv.
    result = subprocess.run(
        ["gpg", "--homedir", homedir, "--batch", "--status-fd", "1",
         "--pinentry-mode", "loopback", "--passphrase-fd", "0",
         "--quick-gen-key", user_id, "future-default", "default", "never"],
        input=passphrase.encode() + b"\n", capture_output=True, check=True,
    )
    match = re.search(rb"^\[GNUPG:\] KEY_CREATED \w+ ([0-9A-F]{40})$", result.stdout, re.M)
    if not match:
        raise AssertionError(f"gpg made no key: {result.stderr.decode(errors='replace')}")
    return match.group(1).decode()


def make_gpg_home() -> GpgHome:
    # gpg-agent's socket lives in the homedir and Unix socket paths are short: keep it
    # directly under /tmp.
    homedir = tempfile.mkdtemp(prefix="g", dir="/tmp")
    # No passphrase caching, so every test that needs the passphrase must supply it.
    Path(homedir, "gpg-agent.conf").write_text(
        "allow-loopback-pinentry\ndefault-cache-ttl 0\nmax-cache-ttl 0\n"
    )
    try:
        return GpgHome(
            homedir=homedir,
            fingerprint=_generate(homedir, USER_ID, ""),
            protected_fingerprint=_generate(homedir, PROTECTED_USER_ID, GPG_PASSPHRASE),
            passphrase=GPG_PASSPHRASE,
        )
    except BaseException:
        _remove(homedir)
        raise
