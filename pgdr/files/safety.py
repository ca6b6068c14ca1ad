"""Checks that a files archive is safe to restore: every member stays inside the
destination, matches the manifest, and replaces nothing it should not.

Python 3.11.2's tarfile has no extraction filters, and pgdr does not use extractall at
all: these checks run before a restore writes a byte, and it writes each member itself.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from pgdr.files.manifest import Entry
from pgdr.ops.errors import PgdrError

_MAX_LINK_DEPTH = 40


class UnsafeArchive(PgdrError):
    """A member could write outside the destination, or does not match the manifest."""


def _unsafe_path(path: str) -> bool:
    parts = path.split("/")
    return (not path or path.startswith("/") or "\0" in path
            or any(part in ("", ".", "..") for part in parts))


def _resolves_inside(parts: list[str], links: dict[str, str], depth: int = 0) -> list[str] | None:
    """Resolve a path relative to the destination, following the archive's own symlinks;
    None when it leaves the destination (or loops)."""
    resolved: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return None
            resolved.pop()
            continue
        resolved.append(part)
        target = links.get("/".join(resolved))
        if target is not None:
            if depth >= _MAX_LINK_DEPTH or target.startswith("/"):
                return None
            followed = _resolves_inside(resolved[:-1] + target.split("/"), links, depth + 1)
            if followed is None:
                return None
            resolved = followed
    return resolved


def check_members(entries: Sequence[Entry]) -> None:
    """UnsafeArchive unless every member stays inside the destination: relative paths
    without `..`, only files, directories and symlinks, no member below a symlink, and
    every symlink resolving (through the others) to a place inside."""
    seen: set[str] = set()
    links = {e.path: e.target or "" for e in entries if e.type == "symlink"}
    for entry in entries:
        if _unsafe_path(entry.path):
            raise UnsafeArchive(f"refusing member {entry.path!r}: absolute path or '..'")
        if entry.type not in ("file", "dir", "symlink"):
            raise UnsafeArchive(f"refusing member {entry.path!r}: a {entry.type}")
        if entry.path in seen:
            raise UnsafeArchive(f"refusing member {entry.path!r}: it appears twice")
        seen.add(entry.path)
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in links:
                raise UnsafeArchive(f"refusing member {entry.path!r}: it lies below a symlink")
        if entry.type == "symlink":
            target = entry.target or ""
            if (not target or target.startswith("/")
                    or _resolves_inside(parts[:-1] + target.split("/"), links) is None):
                raise UnsafeArchive(f"refusing symlink {entry.path!r} -> {target!r}: "
                                    "it points outside the destination")


def entry_of(member: tarfile.TarInfo) -> Entry:
    if member.isreg():
        kind = "file"
    elif member.isdir():
        kind = "dir"
    elif member.issym():
        kind = "symlink"
    elif member.islnk():
        raise UnsafeArchive(f"refusing member {member.name!r}: a hard link")
    else:
        raise UnsafeArchive(f"refusing member {member.name!r}: not a file, directory or symlink")
    return Entry(member.name, kind, f"{member.mode:04o}", 0, size=member.size if kind == "file" else 0,
                 target=member.linkname if kind == "symlink" else None)


def check_archive(members: Sequence[tarfile.TarInfo], expected: Sequence[Entry]) -> None:
    """UnsafeArchive unless the archive holds exactly the manifest's members (same type,
    size, mode and link target), and those are safe."""
    check_members(expected)
    by_path = {e.path: e for e in expected}
    found: set[str] = set()
    for member in members:
        entry = entry_of(member)
        if _unsafe_path(entry.path):
            raise UnsafeArchive(f"refusing member {entry.path!r}: absolute path or '..'")
        listed = by_path.get(entry.path)
        if listed is None or entry.path in found:
            raise UnsafeArchive(f"refusing member {entry.path!r}: not in the manifest")
        found.add(entry.path)
        if ((entry.type, entry.size, entry.target, entry.mode_bits)
                != (listed.type, listed.size, listed.target, listed.mode_bits)):
            raise UnsafeArchive(f"member {entry.path!r} does not match the manifest")
    missing = set(by_path) - found
    if missing:
        raise UnsafeArchive(f"member {sorted(missing)[0]!r} of the manifest is not in the archive")


def check_destination(dest: Path, entries: Sequence[Entry], overwrite: bool) -> None:
    """PgdrError if writing the entries into dest would follow a symlink already there, or
    replace something without overwrite."""
    for entry in entries:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            parent = dest.joinpath(*parts[:depth])
            if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                raise UnsafeArchive(f"{parent} is in the way of {entry.path} (not a directory)")
        target = dest.joinpath(*parts)
        if not os.path.lexists(target):
            continue
        existing_dir = target.is_dir() and not target.is_symlink()
        if entry.type == "dir" and existing_dir:
            continue
        if existing_dir:
            raise PgdrError(f"{target} is a directory; the backup has a {entry.type} there")
        if not overwrite:
            raise PgdrError(f"{target} exists: pass --overwrite to replace existing files")
