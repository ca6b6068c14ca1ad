"""GPG public-key encryption of backups, with real gpg.

Backups are encrypted to a recipient's public key (so the backup host never holds the
key that decrypts them); gpg's own compression is off because zstd already did it.
A passphrase, when the restore key has one, reaches gpg through a pipe, never argv.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from pgdr.ops.errors import ConfigError, PgdrError
from pgdr.pipeline.process import run


def _base(homedir: str | None, quiet: bool = True) -> list[str]:
    argv = ["gpg", "--batch", "--no-tty"] + (["--quiet"] if quiet else [])
    if homedir:
        argv += ["--homedir", homedir]
    return argv


def recipient_fingerprint(recipient: str, homedir: str | None = None) -> str:
    """The fingerprint of the encryption key for recipient; ConfigError if there is none
    usable (missing, expired, revoked, or not an encryption key)."""
    if not re.fullmatch(r"[A-Za-z0-9@._+<> -]{1,200}", recipient) or recipient.startswith("-"):
        raise ConfigError(f"invalid gpg recipient {recipient!r}")
    try:
        listing = run([*_base(homedir), "--with-colons", "--list-keys", "--", recipient])
    except Exception:
        raise ConfigError(f"no gpg public key for {recipient!r}") from None
    fingerprint = None
    usable = False
    for line in listing.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            usable = fields[1] not in ("r", "e", "d", "i") and "E" in fields[11]
        elif fields[0] == "fpr" and fingerprint is None:
            fingerprint = fields[9]
    if not fingerprint or not usable:
        raise ConfigError(f"gpg key {recipient!r} cannot encrypt (expired, revoked or sign-only)")
    return fingerprint


def encrypt_command(fingerprint: str, homedir: str | None = None) -> list[str]:
    return [*_base(homedir), "--trust-model", "always", "--compress-algo", "none",
            "--recipient", fingerprint, "--encrypt"]


# What a private home takes from the keyring: the keys, never the agent or its sockets.
_KEYRING = ("pubring.kbx", "pubring.gpg", "trustdb.gpg", "private-keys-v1.d")
# The per-run agent forgets a passphrase as soon as it has used it.
_AGENT_CONF = "default-cache-ttl 0\nmax-cache-ttl 0\nallow-loopback-pinentry\n"
PRIVATE_HOME_PREFIX = "pgdr-gpg-"


# Not $TMPDIR: the agent's socket lives in the home, and socket paths are short. Only homes
# of this user are ever swept, and no link is followed.
_HOMES_ROOT = Path("/tmp")  # noqa: S108


def _stop_agent_and_remove(home: Path) -> None:
    with suppress(PgdrError):
        run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], timeout=30)
    shutil.rmtree(home, ignore_errors=True)


def _locked(path: Path) -> int | None:
    """An fd holding an exclusive lock on path, or None when someone else holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    if os.fstat(fd).st_uid != os.getuid():
        os.close(fd)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def _new_home() -> Iterator[Path]:
    """A new private home, locked while it is in use. Homes whose lock is free belong to
    runs that were killed: their agents are stopped and the homes removed first. Creating
    and sweeping happen under one lock, so a home is never swept before its run locks it."""
    fd = os.open(_HOMES_ROOT / f"{PRIVATE_HOME_PREFIX}lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in _HOMES_ROOT.glob(f"{PRIVATE_HOME_PREFIX}*"):
            if not stale.is_dir() or stale.is_symlink():
                continue
            with suppress(OSError):
                stale_fd = _locked(stale)
                if stale_fd is not None:
                    _stop_agent_and_remove(stale)
                    os.close(stale_fd)
        home = Path(tempfile.mkdtemp(prefix=PRIVATE_HOME_PREFIX, dir=_HOMES_ROOT))
        home_fd = _locked(home)
    finally:
        os.close(fd)
    try:
        yield home
    finally:
        _stop_agent_and_remove(home)
        if home_fd is not None:
            os.close(home_fd)


@contextmanager
def private_home(homedir: str | None = None) -> Iterator[str]:
    """A GnuPG home for one run: links to the keyring of `homedir` (default GNUPGHOME or
    ~/.gnupg) and its own gpg-agent, which caches nothing and is stopped, with the home
    removed, when the run ends (or, after a kill, when the next one starts). An agent the
    operator runs for the keyring, with whatever it has cached, is never asked: only the
    passphrase given to pgdr decrypts."""
    keyring = Path(homedir or os.environ.get("GNUPGHOME") or Path.home() / ".gnupg")
    with _new_home() as home:
        for name in _KEYRING:
            if (keyring / name).exists():
                os.symlink(keyring.resolve() / name, home / name)
        (home / "gpg-agent.conf").write_text(_AGENT_CONF)
        yield str(home)


@contextmanager
def decrypt_command(homedir: str | None = None, passphrase: str | None = None
                    ) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """(argv, fds to pass) for decrypting stdin to stdout, in a private home (see
    private_home). The passphrase is written to a pipe whose read end gpg inherits."""
    with private_home(homedir) as home:
        # Not quiet: --quiet drops the line that says why ("Bad passphrase"), keeping only
        # the consequence ("No secret key").
        argv = [*_base(home, quiet=False), "--pinentry-mode", "loopback", "--no-symkey-cache"]
        if passphrase is None:
            yield [*argv, "--decrypt"], ()
            return
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, passphrase.encode() + b"\n")
            os.close(write_fd)
            write_fd = -1
            yield [*argv, "--passphrase-fd", str(read_fd), "--decrypt"], (read_fd,)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)


def resolve_passphrase(passphrase: str | None, block_name: str | None) -> str | None:
    """The restore key's passphrase: given directly, or from a Prefect Secret block."""
    if passphrase or not block_name:
        return passphrase
    from prefect.blocks.system import Secret

    try:
        value: str | None = Secret.load(block_name).get()  # type: ignore[union-attr]  # sync/async API
        return value
    except ValueError:
        raise ConfigError(f"Prefect Secret block {block_name!r} not found") from None
