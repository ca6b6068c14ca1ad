"""CloudWatch metrics, when configured (PGDR_CLOUDWATCH=1 or PGDR_CLOUDWATCH_NAMESPACE):
the numbers the runbook's alarms watch, with a Database dimension. Credentials, region
and endpoint come from the standard AWS chain."""

from __future__ import annotations

from collections.abc import Mapping

from pgdr.ops.errors import ConfigError

DEFAULT_NAMESPACE = "UVIS/Backup"

# Metric name -> CloudWatch unit. CloudWatch has no hours unit: "None".
UNITS: dict[str, str] = {
    "BackupFailureCount": "Count",
    "HoursSinceLastBackup": "None",
    "BackupSizeBytes": "Bytes",
    "BackupDurationSeconds": "Seconds",
    "RestoreDurationSeconds": "Seconds",
    "VerifyFailureCount": "Count",
    "DrillRTOSeconds": "Seconds",
    "DrillRPOSeconds": "Seconds",
    "DrillFailed": "Count",
}


def metric_data(database: str, values: Mapping[str, float]) -> list[dict[str, object]]:
    """put_metric_data's MetricData for one database; unknown names are refused (a typo
    would otherwise create a metric no alarm watches)."""
    unknown = sorted(set(values) - set(UNITS))
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}")
    return [{"MetricName": name, "Dimensions": [{"Name": "Database", "Value": database}],
             "Value": float(value), "Unit": UNITS[name]} for name, value in values.items()]


def put_metrics(namespace: str, database: str, values: Mapping[str, float],
                region: str | None = None) -> None:
    from pgdr.storage import aws

    aws.client("cloudwatch", region).put_metric_data(
        Namespace=namespace, MetricData=metric_data(database, values))
