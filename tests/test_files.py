"""Files backups end to end: real tar, zstd and gpg, file and HTTP S3 repositories."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from pgdr.catalog import catalog, locks
from pgdr.files.backup import collect, first_secret, secret_patterns
from pgdr.files.manifest import ARCHIVE, FORMAT, Entry, FilesManifest, find_file_backup, list_file_backups
from pgdr.ops.errors import ConfigError
from pgdr.storage.repository import open_repository
from tests.support.cli import cli_json, error_line, run_cli

BASE_NS = 1_700_000_000_123_456_789


def make_tree(root: Path, *, with_secret: bool = False) -> tuple[Path, Path]:
    """A config directory with nested files, modes, symlinks and an empty directory, and a
    single file beside it."""
    config = root / "config"
    (config / "nested" / "deep").mkdir(parents=True)
    (config / "empty").mkdir()
    files = {
        "app.yaml": (b"database: fleet\nreplicas: 3\n", 0o640),
        "run.sh": (b"#!/bin/sh\nexec app\n", 0o755),
        "nested/deep/values.json": (json.dumps({"k": list(range(500))}).encode(), 0o600),
        "nested/blob.bin": (os.urandom(300_000), 0o644),
        "nested/empty.txt": (b"", 0o444),
    }
    if with_secret:
        files["prod.env"] = (b"DB_PASSWORD=hunter2\n", 0o600)
    for index, (rel, (data, mode)) in enumerate(sorted(files.items())):
        path = config / rel
        path.write_bytes(data)
        path.chmod(mode)
        os.utime(path, ns=(BASE_NS + index, BASE_NS + index * 1_000_000_007))
    os.symlink("app.yaml", config / "current.yaml")
    os.symlink("../run.sh", config / "nested" / "run-link")
    os.symlink("deep", config / "nested" / "deep-link")
    (config / "empty").chmod(0o750)
    (config / "nested" / "deep").chmod(0o700)
    for index, rel in enumerate(["nested/deep", "nested", "empty", ""]):
        os.utime(config / rel, ns=(BASE_NS - index, BASE_NS - index * 999))
    single = root / "deploy.yaml"
    single.write_bytes(b"kind: Deployment\n")
    single.chmod(0o600)
    return config, single


def tree_of(root: Path) -> dict[str, tuple]:
    """Everything a restore must reproduce: type, mode, mtime and content or link target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = ("dir", stat.S_IMODE(info.st_mode), info.st_mtime_ns)
            else:
                found[rel] = ("file", stat.S_IMODE(info.st_mode), info.st_mtime_ns,
                              hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@pytest.mark.parametrize("repo_kind", ["file", "s3"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "gpg"])
def test_tree_round_trips_exactly(repo_kind, encrypted, request, capsys, gpg, tmp_path, monkeypatch):
    repo_url = request.getfixturevalue("file_repo" if repo_kind == "file" else "s3_repo")
    monkeypatch.setenv("PGDR_GNUPGHOME", gpg.homedir)
    config, single = make_tree(tmp_path / "src", with_secret=encrypted)
    extra = ["--encrypt-to", gpg.fingerprint] if encrypted else []
    result = cli_json(capsys, "files", "--path", str(config), "--path", str(single),
                      "--name", "app-config", "--repo", repo_url, "--tier", "daily", *extra)

    assert result["name"] == "app-config" and result["tier"] == "daily"
    assert result["encrypted"] is encrypted
    assert result["location"].startswith(f"{repo_url}/files/app-config/daily/")
    repo = open_repository(repo_url)
    [manifest] = list_file_backups(repo)
    assert manifest.backup_id == result["backup_id"] and manifest.sha256 == result["sha256"]
    entries = {e["path"]: e for e in manifest.entries}
    app_sha = hashlib.sha256((config / "app.yaml").read_bytes()).hexdigest()
    assert entries["config/app.yaml"]["sha256"] == app_sha
    assert entries["config/app.yaml"]["mode"] == "0640"
    assert entries["config/current.yaml"] == {"path": "config/current.yaml", "type": "symlink",
                                              "target": "app.yaml", "mode": "0777", "size": 0,
                                              "mtime_ns": (config / "current.yaml").lstat().st_mtime_ns}
    assert entries["config/empty"]["type"] == "dir" and entries["config/empty"]["mode"] == "0750"
    stored = repo.get_bytes(f"{manifest.prefix}/{manifest.data_key}")
    # zstd's magic number, unless gpg encrypted it.
    assert (stored[:4] == b"\x28\xb5\x2f\xfd") is not encrypted

    dest = tmp_path / "restored"
    restored = cli_json(capsys, "restore-files", "latest", "--name", "app-config", "--dest", str(dest),
                        "--repo", repo_url)
    assert restored["backup_id"] == result["backup_id"] and restored["verified"] is True
    assert restored["files"] == sum(1 for e in manifest.entries if e["type"] == "file")
    assert tree_of(dest / "config") == tree_of(config)
    assert tree_of(dest) == {**{f"config/{k}": v for k, v in tree_of(config).items()},
                             "config": tree_of(tmp_path / "src")["config"],
                             "deploy.yaml": tree_of(tmp_path / "src")["deploy.yaml"]}

    # A second restore refuses to replace what is there, unless asked to.
    (dest / "config" / "app.yaml").write_text("changed locally\n")
    code, _, err = run_cli(capsys, "restore-files", result["backup_id"], "--name", "app-config",
                           "--dest", str(dest), "--repo", repo_url)
    assert code == 1 and "exists: pass --overwrite" in error_line(err)
    assert (dest / "config" / "app.yaml").read_text() == "changed locally\n"
    cli_json(capsys, "restore-files", result["backup_id"], "--name", "app-config", "--dest", str(dest),
             "--repo", repo_url, "--overwrite")
    assert tree_of(dest / "config") == tree_of(config)


def test_expired_files_backups_are_pruned_and_the_kept_one_restores(capsys, file_repo, tmp_path, monkeypatch):
    config, _ = make_tree(tmp_path / "src")
    trees = {}
    for version in range(3):
        (config / "app.yaml").write_text(f"version {version}\n")
        taken = cli_json(capsys, "files", "--path", str(config), "--name", "app-config", "--repo", file_repo,
                         "--tier", "daily")
        assert taken["pruned"] == {"keep": version + 1}  # the retention after each backup: all young
        trees[taken["backup_id"]] = tree_of(config)
    other = cli_json(capsys, "files", "--path", str(config), "--name", "infra", "--repo", file_repo,
                     "--tier", "daily")
    repo = open_repository(file_repo)
    newest = list_file_backups(repo, "app-config")[-1].backup_id
    stored_before = sorted(o.key for o in repo.list("files/"))

    # Time travel by policy: with a daily retention of 0 days, only the floors keep a backup
    # (the newest daily one of each name).
    monkeypatch.setenv("PGDR_RETENTION_DAILY_DAYS", "0")
    expected = {newest: "keep", other["backup_id"]: "keep",
                **{backup_id: "would delete" for backup_id in trees if backup_id != newest}}
    dry = cli_json(capsys, "prune", "--repo", file_repo, "--dry-run")
    assert {r["backup_id"]: r["action"] for r in dry["backups"]} == expected
    assert {(r["area"], r["database"]) for r in dry["backups"]} == {("files", "app-config"),
                                                                    ("files", "infra")}
    assert sorted(o.key for o in repo.list("files/")) == stored_before
    # One area, or one name, is pruned alone.
    assert cli_json(capsys, "prune", "--repo", file_repo, "--area", "database", "--dry-run")["backups"] == []
    only = cli_json(capsys, "prune", "--repo", file_repo, "--name", "infra", "--dry-run")["backups"]
    assert [r["backup_id"] for r in only] == [other["backup_id"]]

    result = cli_json(capsys, "prune", "--repo", file_repo)
    assert result["ok"] and result["counts"] == {"keep": 2, "deleted": 2}
    assert {r["backup_id"]: r["action"] for r in result["backups"]} == {
        k: v.replace("would delete", "deleted") for k, v in expected.items()}
    assert {m.backup_id for m in list_file_backups(repo)} == {newest, other["backup_id"]}
    # Nothing of a deleted backup stays behind, and the lock is released.
    assert {o.key.split("/")[-2] for o in repo.list("files/")} == {newest, other["backup_id"]}
    assert not repo.head(locks.lock_key("app-config", "files"))

    dest = tmp_path / "restored"
    restored = cli_json(capsys, "restore-files", "latest", "--name", "app-config", "--dest", str(dest),
                        "--repo", file_repo)
    assert restored["backup_id"] == newest
    assert tree_of(dest / "config") == trees[newest]

    # The retention that follows a files backup applies the same policy to its name.
    again = cli_json(capsys, "files", "--path", str(config), "--name", "infra", "--repo", file_repo,
                     "--tier", "daily")
    assert again["pruned"] == {"keep": 1, "deleted": 1}
    assert {m.backup_id for m in list_file_backups(repo)} == {newest, again["backup_id"]}


@pytest.mark.parametrize("extra_patterns", ["", "*.secret"])
def test_secret_file_without_encryption_is_refused(extra_patterns, capsys, file_repo, tmp_path,
                                                    monkeypatch):
    monkeypatch.delenv("PGDR_ENCRYPT_TO", raising=False)
    monkeypatch.setenv("PGDR_FILES_SECRET_PATTERNS", extra_patterns)
    config, _ = make_tree(tmp_path / "src")
    secret = "config/nested/terraform.tfstate" if not extra_patterns else "config/nested/api.secret"
    (tmp_path / "src" / secret).write_text("{}")
    code, out, err = run_cli(capsys, "files", "--path", str(config), "--name", "infra",
                             "--repo", file_repo, "--json")
    assert code == 1 and out == ""
    assert error_line(err) == (f"pgdr: error: {secret} looks like a secret: refusing to store it "
                               "unencrypted (pass --encrypt-to or set PGDR_ENCRYPT_TO)")
    repo = open_repository(file_repo)
    assert list_file_backups(repo) == []
    assert not [o for o in repo.list("files/")]


def test_symlink_pointing_outside_the_backed_up_paths_is_refused(tmp_path):
    config, _ = make_tree(tmp_path / "src")
    os.symlink("/etc/hostname", config / "hostname")
    with pytest.raises(ConfigError, match="cannot back up: refusing symlink 'config/hostname'"):
        collect([str(config)])


def test_secret_patterns_match_file_names():
    patterns = secret_patterns()
    names = [".env", "prod.env", "terraform.tfstate", "terraform.tfstate.backup", "tls.pem", "tls.key",
             "id_rsa", "id_rsa.pub", ".env.production", "credentials", "terraform.tfvars", "cert.p12",
             "cert.pfx", "keystore.jks", "kubeconfig", "client_secret.json", "Secrets.yaml", "PROD.ENV"]
    for name in names:
        assert first_secret([Entry(f"a/{name}", "file", "0600", 0)], patterns) == f"a/{name}"
    for name in [".env.gpg", "env.example", ".env.example", "secrets.yaml.asc", "keys", "app.yaml"]:
        assert first_secret([Entry(f"a/{name}", "file", "0600", 0)], patterns) is None


# --- crafted archives ------------------------------------------------------------------------


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644 if kind != tarfile.SYMTYPE else 0o777
    info.mtime = 1_700_000_000
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def _entry(info: tarfile.TarInfo, data: bytes) -> dict:
    kind = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
            tarfile.LNKTYPE: "hardlink"}[info.type]
    entry = {"path": info.name, "type": kind, "mode": f"{info.mode:04o}", "mtime_ns": 1_700_000_000 * 10**9,
             "size": info.size}
    if kind == "file":
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    if kind in ("symlink", "hardlink"):
        entry["target"] = info.linkname
    return entry


def store_crafted(repo_url: str, name: str, members: list[tuple], listed: list[tuple] | None = None) -> str:
    """Store a hand-made archive with a manifest that lists `listed` (default: the members)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    stored = subprocess.run(["zstd", "-q", "-c"], input=buffer.getvalue(), capture_output=True,
                            check=True).stdout
    backup_id = catalog.new_backup_id(catalog.utcnow(), "manual")
    manifest = FilesManifest(
        backup_id=backup_id, name=name, tier="manual", started_at="2026-01-01T00:00:00Z",
        finished_at="2026-01-01T00:00:01Z", tool_version="crafted", format=FORMAT,
        compression="zstd-3", encryption=None, size_bytes=len(stored), archive_bytes=len(buffer.getvalue()),
        sha256=hashlib.sha256(stored).hexdigest(), data_key=ARCHIVE, sources={},
        entries=[_entry(info, data) for info, data in (listed if listed is not None else members)],
    )
    repo = open_repository(repo_url)
    repo.put_bytes(f"{manifest.prefix}/{manifest.data_key}", stored)
    repo.put_bytes(manifest.manifest_key, manifest.to_json())
    return backup_id


def crafted_cases(outside: Path) -> dict[str, tuple[list[tuple], list[tuple] | None]]:
    good = _member("ok/readme.txt", b"fine\n")
    return {
        "dotdot": ([good, _member("ok/../../escaped.txt", b"owned\n")], None),
        "absolute": ([good, _member(str(outside / "absolute.txt"), b"owned\n")], None),
        "symlink-out": ([good, _member("ok/link", kind=tarfile.SYMTYPE, link="../../escaped.txt")], None),
        "symlink-absolute": ([good, _member("ok/link", kind=tarfile.SYMTYPE, link=str(outside))], None),
        # Each link stays inside on its own; followed one through the other, it leaves.
        "symlink-chain": ([good, _member("a", b"", tarfile.DIRTYPE),
                           _member("a/b", kind=tarfile.SYMTYPE, link=".."),
                           _member("c", kind=tarfile.SYMTYPE, link="a/b/..")], None),
        "through-symlink": ([_member("d", kind=tarfile.SYMTYPE, link="."), _member("d/x.txt", b"x")], None),
        "hardlink": ([good, _member("ok/hard", kind=tarfile.LNKTYPE, link="/etc/passwd")], None),
        # The manifest is clean; the archive carries one more member.
        "unlisted": ([good, _member("../escaped.txt", b"owned\n")], [good]),
    }


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink-out", "symlink-absolute", "symlink-chain",
                                  "through-symlink", "hardlink", "unlisted"])
def test_crafted_archive_is_refused_and_writes_nothing(case, capsys, file_repo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    members, listed = crafted_cases(outside)[case]
    backup_id = store_crafted(file_repo, "crafted", members, listed)
    dest = tmp_path / "a" / "b" / "dest"

    code, out, err = run_cli(capsys, "restore-files", backup_id, "--name", "crafted", "--dest", str(dest),
                             "--repo", file_repo, "--json")

    assert code == 1 and out == ""
    line = error_line(err)
    assert "refusing" in line or "not in the manifest" in line, line
    assert not (tmp_path / "a" / "escaped.txt").exists()
    assert not (tmp_path / "a" / "b" / "escaped.txt").exists()
    assert list(outside.iterdir()) == []
    assert not dest.exists() or list(dest.iterdir()) == []


def test_restore_does_not_write_through_a_symlink_already_in_the_destination(capsys, file_repo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    backup_id = store_crafted(file_repo, "crafted", [_member("ok", b"", tarfile.DIRTYPE),
                                                    _member("ok/readme.txt", b"fine\n")])
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "ok")
    code, _, err = run_cli(capsys, "restore-files", backup_id, "--name", "crafted", "--dest", str(dest),
                           "--repo", file_repo, "--overwrite")
    assert code == 1 and "ok" in error_line(err)
    assert list(outside.iterdir()) == []


def test_corrupt_archive_is_refused_before_anything_is_written(capsys, file_repo, tmp_path):
    backup_id = store_crafted(file_repo, "crafted", [_member("readme.txt", b"fine\n")])
    repo = open_repository(file_repo)
    manifest = find_file_backup(repo, backup_id, "crafted")
    data = bytearray(repo.get_bytes(f"{manifest.prefix}/{manifest.data_key}"))
    data[-5] ^= 0xFF
    repo.put_bytes(f"{manifest.prefix}/{manifest.data_key}", bytes(data))
    dest = tmp_path / "dest"
    code, _, err = run_cli(capsys, "restore-files", backup_id, "--name", "crafted", "--dest", str(dest),
                           "--repo", file_repo)
    assert code == 1 and "is corrupt" in error_line(err)
    assert not dest.exists()
