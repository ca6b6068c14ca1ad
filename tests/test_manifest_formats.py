"""Manifests as pgdr has written them read back unchanged: every kind (database backups,
files backups, storage snapshots, base backups) shares one StoredManifest base, and a
repository written before must still be understood. The texts below are byte for byte what
the writers stored; they must never be edited to fit the code."""

from __future__ import annotations

import pytest

from pgdr.catalog.backup_retention import scan_backups
from pgdr.catalog.catalog import Manifest, StoredManifest
from pgdr.catalog.pitr_retention import scan_base_backups
from pgdr.files.manifest import FilesManifest
from pgdr.ops.errors import ConfigError
from pgdr.pitr.basebackup import BaseManifest
from pgdr.storage.repository import open_repository
from pgdr.storage.storage import StorageManifest

DATABASE_KEY = "app%20db/daily/2026/01/28/20260128T020000Z-daily-3f2a/manifest.json"
DATABASE = """\
{
  "backup_id": "20260128T020000Z-daily-3f2a",
  "compression": "zstd-3",
  "data_key": "dump.pgdr",
  "database": "app db",
  "database_properties": {
    "owner": "app"
  },
  "digests": {
    "public.t": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
  },
  "dump_bytes": 5678,
  "encryption": {
    "recipient_fingerprint": "ABCD",
    "type": "gpg"
  },
  "extra": {},
  "finished_at": "2026-01-28T02:03:10Z",
  "format": "custom",
  "globals": {
    "roles": []
  },
  "partitioned": {
    "public.p": [
      "public.p1"
    ]
  },
  "row_counts": {
    "public.t": 3
  },
  "server_version": "16.4",
  "sha256": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
  "size_bytes": 1234,
  "snapshot_at": "2026-01-28T02:00:01Z",
  "source": "postgresql://h/app",
  "started_at": "2026-01-28T02:00:00Z",
  "tier": "daily",
  "tool_version": "0.1.0",
  "wal_lsn_start": "0/3000028"
}"""

FILES_KEY = "files/app-config/weekly/2026/01/28/20260128T030000Z-weekly-00ff/manifest.json"
FILES = """\
{
  "archive_bytes": 10240,
  "backup_id": "20260128T030000Z-weekly-00ff",
  "compression": "zstd-3",
  "data_key": "archive.tar.zst",
  "encryption": null,
  "entries": [
    {
      "mode": "0755",
      "mtime_ns": 1,
      "path": "conf",
      "type": "dir"
    },
    {
      "mode": "0644",
      "mtime_ns": 2,
      "path": "conf/a.yml",
      "sha256": "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
      "size": 5,
      "type": "file"
    }
  ],
  "finished_at": "2026-01-28T03:00:02Z",
  "format": "tar-pax",
  "name": "app-config",
  "sha256": "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
  "size_bytes": 99,
  "skipped": [
    "conf/sock"
  ],
  "sources": {
    "conf": "/etc/app/conf"
  },
  "started_at": "2026-01-28T03:00:00Z",
  "tier": "weekly",
  "tool_version": "0.1.0"
}"""

STORAGE_KEY = "storage/uploads/20260128T040000Z-monthly-beef/manifest.json"
STORAGE = """\
{
  "bucket": "uploads",
  "copied_bytes": 7,
  "copied_count": 1,
  "finished_at": "2026-01-28T04:01:00Z",
  "object_count": 1,
  "objects": {
    "user/x": {
      "etag": "\\"e\\"",
      "size": 7,
      "stored": "storage/uploads/20260128T040000Z-monthly-beef/objects/user/x"
    }
  },
  "previous_snapshot": null,
  "snapshot_id": "20260128T040000Z-monthly-beef",
  "source_prefix": "user/",
  "started_at": "2026-01-28T04:00:00Z",
  "tier": "monthly",
  "total_bytes": 7
}"""

BASE_KEY = "app%20db/base/2026/01/28/20260128T050000Z-hot-1234/manifest.json"
BASE = """\
{
  "backup_id": "20260128T050000Z-hot-1234",
  "compression": "zstd-3",
  "data_key": "base.tar.zst",
  "database": "app db",
  "encryption": null,
  "end_lsn": "0/5000100",
  "finished_at": "2026-01-28T05:00:30Z",
  "kind": "full",
  "parent_backup_id": null,
  "server_manifest": null,
  "server_version": "16.4",
  "sha256": "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
  "size_bytes": 4096,
  "source": "postgresql://h/app",
  "start_lsn": "0/5000028",
  "start_wal_file": "000000010000000000000005",
  "started_at": "2026-01-28T05:00:00Z",
  "system_identifier": "7300000000000000000",
  "timeline": 1,
  "tool_version": "0.1.0",
  "wal_segment_size": 16777216
}"""


KINDS = [
    pytest.param(Manifest, DATABASE, DATABASE_KEY, id="database"),
    pytest.param(FilesManifest, FILES, FILES_KEY, id="files"),
    pytest.param(StorageManifest, STORAGE, STORAGE_KEY, id="storage"),
    pytest.param(BaseManifest, BASE, BASE_KEY, id="base"),
]


@pytest.mark.parametrize(("kind", "text", "key"), KINDS)
def test_a_stored_manifest_reads_back_where_it_lies_and_writes_the_same_bytes(tmp_path, kind, text, key):
    repo = open_repository(tmp_path.as_uri())
    repo.put_bytes(key, text.encode())
    manifest = kind.read(repo, key)
    assert isinstance(manifest, StoredManifest)
    assert manifest.manifest_key == key and manifest.belongs_at(key.rsplit("/", 1)[0])
    assert manifest.finished.isoformat().startswith("2026-01-28T0")
    assert manifest.to_json() == text.encode()  # the format on disk is unchanged
    # Writing it stores exactly those bytes at exactly that key.
    other = open_repository((tmp_path / "copy").as_uri())
    assert manifest.write(other) == key and other.get_bytes(key) == text.encode()


@pytest.mark.parametrize(("kind", "text", "key"), KINDS)
def test_a_field_added_later_does_not_stop_a_manifest_from_reading(kind, text, key):
    newer = text.replace("{\n", '{\n  "added_by_a_newer_pgdr": 1,\n', 1)
    assert kind.from_json(newer.encode()).to_json() == text.encode()


@pytest.mark.parametrize(("kind", "text", "key"), KINDS)
def test_a_damaged_manifest_is_refused_naming_its_kind(kind, text, key):
    with pytest.raises(ConfigError, match=f"unreadable {kind.KIND}"):
        kind.from_json(text[: len(text) // 2].encode())
    bad_id = text.replace(key.split("/")[-2], "not-a-backup-id")
    with pytest.raises(ConfigError, match="not a backup id"):
        kind.from_json(bad_id.encode())


def test_a_base_backup_manifest_from_before_incrementals_reads_as_a_full_backup():
    older = "".join(line + "\n" for line in BASE.splitlines()
                    if not line.startswith(('  "kind"', '  "parent_backup_id"', '  "server_manifest"')))
    manifest = BaseManifest.from_json(older.encode())
    assert (manifest.kind, manifest.parent_backup_id) == ("full", None)
    assert manifest.to_json() == BASE.encode()


def test_a_files_manifest_with_an_invalid_name_is_refused():
    with pytest.raises(ConfigError, match="invalid files backup name"):
        FilesManifest.from_json(FILES.replace('"name": "app-config"', '"name": "../etc"').encode())


@pytest.mark.parametrize(("kind", "text", "key"), [KINDS[0], KINDS[1], KINDS[3]])
def test_retention_lists_every_kind_alike_and_never_trusts_a_moved_manifest(tmp_path, kind, text, key):
    repo = open_repository(tmp_path.as_uri())
    prefix = key.rsplit("/", 1)[0]
    repo.put_bytes(key, text.encode())
    repo.put_bytes(f"{prefix}/data", b"x")
    # The same manifest copied under another backup id of the same place: it describes another backup.
    backup_id = prefix.rsplit("/", 1)[-1]
    moved = prefix.replace(backup_id, backup_id[:-4] + "0000")
    repo.put_bytes(f"{moved}/manifest.json", text.encode())
    if kind is BaseManifest:
        readable, unreadable = scan_base_backups(repo, "app db")
    else:
        root = "/".join(prefix.split("/")[: 2 if kind is FilesManifest else 1])
        readable, unreadable = scan_backups(repo, root, "group", kind)
    assert [(s.prefix, s.tier, s.manifest.backup_id) for s in readable] == [
        (prefix, backup_id.split("-")[1], backup_id)]
    assert sorted(readable[0].keys) == sorted([f"{prefix}/data", key])
    assert [s.prefix for s in unreadable] == [moved]


def test_a_manifest_whose_names_make_no_key_belongs_nowhere():
    manifest = StorageManifest.from_json(STORAGE.replace('"bucket": "uploads"', '"bucket": "A_B"').encode())
    assert not manifest.belongs_at(STORAGE_KEY.rsplit("/", 1)[0])
