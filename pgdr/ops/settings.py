"""Configuration: arguments first, then the environment, then a `.env` file.

The runbook's variable names are accepted (DB_HOST, DB_PORT, DB_NAME, DB_USER,
DB_PASSWORD, BACKUP_DIR, S3_BUCKET, RETENTION_DAYS, AWS_REGION) beside pgdr's own
(PGDR_REPO, DATABASE_URL, PGDR_*). Nothing here imports Prefect: the WAL commands
read their settings in milliseconds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from pgdr.ops.errors import ConfigError
from pgdr.ops.metrics import DEFAULT_NAMESPACE

DEFAULT_REPO = "file:///var/backups/pgdr"

# The runbook's tiers: retention in days, and the S3 storage class of their objects.
TIER_RETENTION_DAYS: dict[str, int] = {
    "hot": 7,
    "daily": 30,
    "weekly": 90,
    "monthly": 365,
    "manual": 30,
    "pre-deploy": 7,
    "pre-restore": 7,
}
TIER_STORAGE_CLASS: dict[str, str] = {
    "hot": "STANDARD",
    "daily": "STANDARD_IA",
    "weekly": "STANDARD_IA",
    "monthly": "GLACIER_IR",
    "manual": "STANDARD",
    "pre-deploy": "STANDARD",
    "pre-restore": "STANDARD",
}
TIERS = tuple(TIER_RETENTION_DAYS)


def check_tier(tier: str) -> str:
    if tier not in TIER_RETENTION_DAYS:
        raise ConfigError(f"unknown tier {tier!r}: choose one of {', '.join(TIERS)}")
    return tier


def _env_key(tier: str) -> str:
    return tier.upper().replace("-", "_")


@dataclass(frozen=True)
class Settings:
    """Everything a flow needs to know that is not a per-run parameter."""

    db_url: str | None = None
    repo_url: str = DEFAULT_REPO
    replica_repo_url: str | None = None
    aws_region: str | None = None
    encrypt_to: str | None = None
    gpg_homedir: str | None = None
    # Passphrase of the restore key: an environment variable or a Prefect Secret block.
    gpg_passphrase: str | None = field(default=None, repr=False)
    gpg_passphrase_block: str | None = None
    s3_sse: str = "AES256"
    s3_kms_key_id: str | None = None
    storage_classes: dict[str, str] = field(default_factory=lambda: dict(TIER_STORAGE_CLASS))
    retention_days: dict[str, int] = field(default_factory=lambda: dict(TIER_RETENTION_DAYS))
    keep_verified: int = 3
    restore_jobs: int = 4
    max_clock_skew_seconds: int = 300
    zstd_level: int = 3
    zstd_threads: int = 2
    work_dir: str | None = None
    notify_block: str | None = None
    notify_url: str | None = field(default=None, repr=False)
    notify_on_success: bool = False
    cloudwatch_namespace: str | None = None
    # Extra file name patterns (fnmatch) that files backups refuse to store unencrypted.
    files_secret_patterns: tuple[str, ...] = ()
    # The database name the WAL commands archive under (else the database of db_url).
    wal_db: str | None = None
    # The fleet: database URLs (without passwords) and servers whose databases are discovered.
    fleet_databases: tuple[str, ...] = ()
    fleet_servers: tuple[str, ...] = ()
    # How many pgdr runs may work on one PostgreSQL server at once (fleet runs).
    host_limit: int = 2
    # Days a restore's and a rollback's set-aside databases stay on the server (the newest
    # per target always stays).
    keep_safety_databases_days: int = 7
    # A digest of every table's content in the backup's snapshot, checked after each restore.
    content_digests: bool = True
    # Statement timeout of a recover-table row filter (--where), in seconds.
    filter_timeout_seconds: int = 900
    # A data stream that moves no byte for this long fails, naming the side that stalled.
    stall_seconds: int = 300

    def secrets(self) -> list[str]:
        """Values that must never be printed, to redact from child process output."""
        from pgdr.postgres.dsn import password_of

        values = [self.gpg_passphrase, self.notify_url, os.environ.get("AWS_SECRET_ACCESS_KEY")]
        if self.db_url:
            values.append(password_of(self.db_url))
        return [v for v in values if v]


def _read_dotenv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _db_url_from_parts(env: Mapping[str, str]) -> str | None:
    if "DB_HOST" not in env and "DB_NAME" not in env:
        return None
    user = env.get("DB_USER", "postgres")
    password = env.get("DB_PASSWORD")
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    host = env.get("DB_HOST", "localhost")
    port = env.get("DB_PORT", "5432")
    return f"postgresql://{auth}@{host}:{port}/{quote(env.get('DB_NAME', 'postgres'), safe='')}"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None


def load_settings(env: Mapping[str, str] | None = None, dotenv: Path | None = None) -> Settings:
    """Settings from the environment, with a `.env` file (current directory) underneath."""
    merged = _read_dotenv(dotenv or Path(".env"))
    merged.update(os.environ if env is None else env)

    repo = merged.get("PGDR_REPO")
    if not repo and merged.get("S3_BUCKET"):
        bucket = merged["S3_BUCKET"].removeprefix("s3://").strip("/")
        repo = f"s3://{bucket}" if "/" in bucket else f"s3://{bucket}/pgdr"
    if not repo and merged.get("BACKUP_DIR"):
        repo = Path(merged["BACKUP_DIR"]).resolve().as_uri()

    retention = dict(TIER_RETENTION_DAYS)
    if merged.get("RETENTION_DAYS"):
        retention["daily"] = _int(merged, "RETENTION_DAYS", retention["daily"])
    storage = dict(TIER_STORAGE_CLASS)
    for tier in TIERS:
        retention[tier] = _int(merged, f"PGDR_RETENTION_{_env_key(tier)}_DAYS", retention[tier])
        storage[tier] = merged.get(f"PGDR_STORAGE_CLASS_{_env_key(tier)}", storage[tier])

    return Settings(
        db_url=merged.get("DATABASE_URL") or _db_url_from_parts(merged),
        repo_url=repo or DEFAULT_REPO,
        replica_repo_url=merged.get("PGDR_REPLICA_REPO") or None,
        aws_region=merged.get("AWS_REGION") or merged.get("AWS_DEFAULT_REGION"),
        encrypt_to=merged.get("PGDR_ENCRYPT_TO") or None,
        gpg_homedir=merged.get("PGDR_GNUPGHOME") or merged.get("GNUPGHOME") or None,
        gpg_passphrase=merged.get("PGDR_GPG_PASSPHRASE") or None,
        gpg_passphrase_block=merged.get("PGDR_GPG_PASSPHRASE_BLOCK") or None,
        s3_sse=merged.get("PGDR_S3_SSE", "AES256"),
        s3_kms_key_id=merged.get("PGDR_S3_KMS_KEY_ID") or None,
        storage_classes=storage,
        retention_days=retention,
        keep_verified=_int(merged, "PGDR_KEEP_VERIFIED", 3),
        restore_jobs=_int(merged, "PGDR_RESTORE_JOBS", min(4, os.cpu_count() or 1)),
        max_clock_skew_seconds=_int(merged, "PGDR_MAX_CLOCK_SKEW_SECONDS", 300),
        zstd_level=_int(merged, "PGDR_ZSTD_LEVEL", 3),
        zstd_threads=_int(merged, "PGDR_ZSTD_THREADS", min(2, os.cpu_count() or 1)),
        work_dir=merged.get("PGDR_WORK_DIR") or None,
        notify_block=merged.get("PGDR_NOTIFY_BLOCK") or None,
        notify_url=merged.get("PGDR_NOTIFY_URL") or None,
        notify_on_success=merged.get("PGDR_NOTIFY_ON_SUCCESS", "").lower() in ("1", "true", "yes"),
        cloudwatch_namespace=merged.get("PGDR_CLOUDWATCH_NAMESPACE")
        or (DEFAULT_NAMESPACE if merged.get("PGDR_CLOUDWATCH", "").lower() in ("1", "true", "yes") else None),
        files_secret_patterns=_list(merged, "PGDR_FILES_SECRET_PATTERNS"),
        wal_db=merged.get("PGDR_WAL_DB") or None,
        fleet_databases=_list(merged, "PGDR_FLEET_DATABASES"),
        fleet_servers=_list(merged, "PGDR_FLEET_SERVERS"),
        host_limit=_int(merged, "PGDR_HOST_LIMIT", 2),
        keep_safety_databases_days=_int(merged, "PGDR_KEEP_SAFETY_DATABASES_DAYS", 7),
        content_digests=merged.get("PGDR_CONTENT_DIGESTS", "1").lower() not in ("0", "false", "no"),
        filter_timeout_seconds=_int(merged, "PGDR_WHERE_TIMEOUT_SECONDS", 900),
        stall_seconds=_int(merged, "PGDR_STALL_SECONDS", 300),
    )


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma- or whitespace-separated list."""
    return tuple(item for item in re.split(r"[,\s]+", env.get(name, "")) if item)
