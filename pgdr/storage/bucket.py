"""AWS set-up: the S3 bucket of a repository, hardened as the runbook asks.

`init_s3_repository` is safe to run again and again: each setting is put, merged with
what others configured (lifecycle rules and policy statements that are not pgdr's are
kept), and read back from S3 for the report.
"""

from __future__ import annotations

import json
from typing import Any

from pgdr.ops.errors import ConfigError
from pgdr.storage.aws import aws_errors
from pgdr.storage.repository import open_repository
from pgdr.storage.s3repo import S3Repository

LIFECYCLE_RULE_ID = "pgdr-tiering"
POLICY_SID = "PgdrDenyInsecureTransport"
# Tiering. There is no Expiration: pgdr's prune decides what is deleted, so WAL still
# needed by a kept backup is never expired underneath it. By default nothing moves to a
# class that must be restored (hours) before it can be read: within retention, any backup
# may be needed at once. GLACIER only from --archive-after-days.
INSTANT_TRANSITIONS: list[dict[str, Any]] = [{"Days": 30, "StorageClass": "STANDARD_IA"}]
# Versions that prune deleted (or that were overwritten) stay this long: a window to undo
# a mistaken deletion. Current objects never expire.
NONCURRENT_DAYS = 30
LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")


def _call(client: Any, operation: str, **kwargs: Any) -> Any:
    with aws_errors(f"S3 {operation}"):
        return getattr(client, operation)(**kwargs)


def _missing(client: Any, operation: str, codes: tuple[str, ...], **kwargs: Any) -> Any:
    """The configuration, or None when S3 says there is none."""
    from botocore.exceptions import ClientError

    with aws_errors(f"S3 {operation}"):
        try:
            return getattr(client, operation)(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in codes:
                return None
            raise


def _ensure_bucket(client: Any, bucket: str, object_lock: bool) -> bool:
    """Create the bucket if it does not exist; True if it was created."""
    if _missing(client, "head_bucket", ("404", "NoSuchBucket", "NotFound"), Bucket=bucket) is not None:
        return False
    args: dict[str, Any] = {"Bucket": bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        args["CreateBucketConfiguration"] = {"LocationConstraint": region}
    if object_lock:
        args["ObjectLockEnabledForBucket"] = True
    _call(client, "create_bucket", **args)
    return True


def transitions(archive_after_days: int | None) -> list[dict[str, Any]]:
    """The lifecycle's transitions: STANDARD_IA after 30 days; GLACIER only when asked for."""
    if archive_after_days is None:
        return list(INSTANT_TRANSITIONS)
    if archive_after_days < 1:
        raise ConfigError("--archive-after-days must be 1 or more")
    instant = [t for t in INSTANT_TRANSITIONS if t["Days"] < archive_after_days]
    return [*instant, {"Days": archive_after_days, "StorageClass": "GLACIER"}]


def archive_warnings(archive_after_days: int | None, retention_days: dict[str, int]) -> list[str]:
    """What an operator must know when backups pgdr keeps will be archived."""
    if archive_after_days is None:
        return []
    longer = sorted(tier for tier, days in retention_days.items() if days > archive_after_days)
    if not longer:
        return []
    return [f"backups older than {archive_after_days} d (kept longer in tiers {', '.join(longer)}) and WAL "
            f"go to GLACIER: restoring them first waits hours for S3 (pgdr restore --archive-wait-hours)"]


def is_plain_http(repo: S3Repository) -> bool:
    return str(repo.client.meta.endpoint_url).lower().startswith("http://")


def _lifecycle_rule(prefix: str, archive_after_days: int | None) -> dict[str, Any]:
    return {
        "ID": LIFECYCLE_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": f"{prefix}/" if prefix else ""},
        "Transitions": transitions(archive_after_days),
        "NoncurrentVersionExpiration": {"NoncurrentDays": NONCURRENT_DAYS},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
    }


def _tls_statement(bucket: str) -> dict[str, Any]:
    return {
        "Sid": POLICY_SID,
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    }


def read_s3_settings(repo: S3Repository) -> dict[str, Any]:
    """What the bucket is configured with, as S3 reports it."""
    client, bucket = repo.client, repo.bucket
    versioning = _call(client, "get_bucket_versioning", Bucket=bucket).get("Status")
    encryption = _missing(client, "get_bucket_encryption",
                          ("ServerSideEncryptionConfigurationNotFoundError",), Bucket=bucket)
    sse = (encryption or {}).get("ServerSideEncryptionConfiguration", {}).get("Rules", [{}])[0].get(
        "ApplyServerSideEncryptionByDefault", {})
    public = _missing(client, "get_public_access_block", ("NoSuchPublicAccessBlockConfiguration",),
                      Bucket=bucket)
    policy = _missing(client, "get_bucket_policy", ("NoSuchBucketPolicy",), Bucket=bucket)
    statements = json.loads(policy["Policy"]).get("Statement", []) if policy else []
    lifecycle = _missing(client, "get_bucket_lifecycle_configuration", ("NoSuchLifecycleConfiguration",),
                         Bucket=bucket)
    rule = next((r for r in (lifecycle or {}).get("Rules", []) if r.get("ID") == LIFECYCLE_RULE_ID), None)
    lock = _missing(client, "get_object_lock_configuration", ("ObjectLockConfigurationNotFoundError",),
                    Bucket=bucket)
    lock_config = (lock or {}).get("ObjectLockConfiguration", {})
    retention = lock_config.get("Rule", {}).get("DefaultRetention", {})
    return {
        "bucket": bucket,
        "versioning": versioning,
        "encryption": {"sse": sse.get("SSEAlgorithm"), "kms_key_id": sse.get("KMSMasterKeyID")},
        "public_access_block": (public or {}).get("PublicAccessBlockConfiguration"),
        "deny_insecure_transport": any(s.get("Sid") == POLICY_SID for s in statements),
        "lifecycle": {"transitions": rule.get("Transitions"), "prefix": rule.get("Filter", {}).get("Prefix"),
                      "noncurrent_days": rule.get("NoncurrentVersionExpiration", {}).get("NoncurrentDays"),
                      "expiration": rule.get("Expiration")} if rule else None,
        "object_lock": {"enabled": lock_config.get("ObjectLockEnabled") == "Enabled",
                        "mode": retention.get("Mode"), "days": retention.get("Days")},
    }


def init_s3_repository(url: str, *, sse: str = "AES256", kms_key_id: str | None = None,
                       lock_mode: str | None = None, lock_days: int | None = None,
                       region: str | None = None, archive_after_days: int | None = None,
                       retention_days: dict[str, int] | None = None) -> dict[str, Any]:
    """Create (if missing) and harden the bucket of an s3:// repository; returns what S3
    reports afterwards, with `warnings` for what the operator must know."""
    if sse not in ("AES256", "aws:kms"):
        raise ConfigError(f"--sse must be AES256 or aws:kms, not {sse!r}")
    if kms_key_id and sse != "aws:kms":
        raise ConfigError("--kms-key-id needs --sse aws:kms")
    if (lock_mode is None) != (lock_days is None):
        raise ConfigError("Object Lock needs both --object-lock-mode and --object-lock-days")
    if lock_mode is not None and (lock_mode not in LOCK_MODES or not lock_days or lock_days < 1):
        raise ConfigError("--object-lock-mode is GOVERNANCE or COMPLIANCE, "
                          "with --object-lock-days of 1 or more")
    repo = open_repository(url, sse=sse, kms_key_id=kms_key_id, region=region)
    if not isinstance(repo, S3Repository):
        raise ConfigError(f"init-repo sets up S3 buckets; {url} is not s3://bucket/prefix")
    rule = _lifecycle_rule(repo.prefix, archive_after_days)  # a bad --archive-after-days: before any change
    warnings = archive_warnings(archive_after_days, retention_days or {})
    client, bucket = repo.client, repo.bucket
    created = _ensure_bucket(client, bucket, object_lock=lock_mode is not None)

    _call(client, "put_bucket_versioning", Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    default: dict[str, Any] = {"SSEAlgorithm": sse}
    if kms_key_id:
        default["KMSMasterKeyID"] = kms_key_id
    _call(client, "put_bucket_encryption", Bucket=bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": default, "BucketKeyEnabled": sse == "aws:kms"}]})
    _call(client, "put_public_access_block", Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True})

    policy = _missing(client, "get_bucket_policy", ("NoSuchBucketPolicy",), Bucket=bucket)
    document: dict[str, Any] = (json.loads(policy["Policy"]) if policy
                                else {"Version": "2012-10-17", "Statement": []})
    document["Statement"] = [s for s in document.get("Statement", []) if s.get("Sid") != POLICY_SID]
    if is_plain_http(repo):
        # The endpoint (MinIO, a local test server) speaks no TLS: denying non-TLS requests
        # would refuse every request pgdr makes there.
        warnings.append(f"{client.meta.endpoint_url} is plain HTTP: non-TLS requests are not denied")
    else:
        document["Statement"].append(_tls_statement(bucket))
    if document["Statement"]:
        _call(client, "put_bucket_policy", Bucket=bucket, Policy=json.dumps(document))
    elif policy:
        _call(client, "delete_bucket_policy", Bucket=bucket)

    lifecycle = _missing(client, "get_bucket_lifecycle_configuration", ("NoSuchLifecycleConfiguration",),
                         Bucket=bucket)
    rules = [r for r in (lifecycle or {}).get("Rules", []) if r.get("ID") != LIFECYCLE_RULE_ID]
    # Objects under 128 KB (manifests, verified.json, audit records) stay readable: `pgdr
    # list` reads every manifest, which it cannot do from GLACIER.
    _call(client, "put_bucket_lifecycle_configuration", Bucket=bucket,
          LifecycleConfiguration={"Rules": [*rules, rule]},
          TransitionDefaultMinimumObjectSize="all_storage_classes_128K")

    if lock_mode is not None:
        wanted = {"ObjectLockEnabled": "Enabled",
                  "Rule": {"DefaultRetention": {"Mode": lock_mode, "Days": lock_days}}}
        current = read_s3_settings(repo)["object_lock"]
        if (current["mode"], current["days"]) != (lock_mode, lock_days):
            _call(client, "put_object_lock_configuration", Bucket=bucket, ObjectLockConfiguration=wanted)

    return {"repository": repo.url, "created_bucket": created, **read_s3_settings(repo), "warnings": warnings}
