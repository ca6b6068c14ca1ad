"""DR drills and failovers, measured: phase timings, RTO/RPO arithmetic, targets, checklist.

Pure: no database, no network, no Prefect. The clock is passed in (a function returning
an aware UTC datetime), so every number here can be tested exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgdr.ops.errors import ConfigError, first_line

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class Targets:
    rto_minutes: float
    rpo_minutes: float


DEFAULT_SCENARIO = "database-corruption"
# The runbook's recovery objectives per scenario (minutes).
SCENARIO_TARGETS: dict[str, Targets] = {
    "database-corruption": Targets(rto_minutes=30, rpo_minutes=5),
    "accidental-deletion": Targets(rto_minutes=30, rpo_minutes=5),
    "region-failure": Targets(rto_minutes=60, rpo_minutes=15),
    "ransomware": Targets(rto_minutes=240, rpo_minutes=60),
}

# The runbook's drill checklist, in order: (key, what an operator reads).
CHECKLIST: tuple[tuple[str, str], ...] = (
    ("backup_found", "Backup chosen as a failover would"),
    ("checksum_verified", "Backup checksum verified"),
    ("restored", "Restored into a scratch database"),
    ("row_counts_validated", "Row counts match the manifest"),
    ("health_checks_passed", "Health checks passed"),
    ("failover_dry_run_ok", "Failover dry-run succeeded"),
    ("rto_met", "RTO target met"),
    ("rpo_met", "RPO target met"),
    ("scratch_dropped", "Scratch database dropped"),
)


def targets_for(scenario: str, rto_minutes: float | None = None, rpo_minutes: float | None = None) -> Targets:
    """The scenario's targets, with either one overridden."""
    if scenario not in SCENARIO_TARGETS:
        raise ConfigError(f"unknown scenario {scenario!r}: choose one of {', '.join(SCENARIO_TARGETS)}")
    base = SCENARIO_TARGETS[scenario]
    for value in (rto_minutes, rpo_minutes):
        if value is not None and value < 0:
            raise ConfigError("RTO and RPO targets are minutes, zero or more")
    return Targets(base.rto_minutes if rto_minutes is None else rto_minutes,
                   base.rpo_minutes if rpo_minutes is None else rpo_minutes)


def iso(moment: datetime) -> str:
    """Sub-second precision: phases of a drill are often shorter than a second."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Phase:
    name: str
    started: datetime
    finished: datetime | None = None
    ok: bool | None = None
    detail: str = ""

    @property
    def seconds(self) -> float | None:
        return None if self.finished is None else (self.finished - self.started).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "started_at": iso(self.started),
                "finished_at": iso(self.finished) if self.finished else None,
                "duration_seconds": None if self.seconds is None else round(self.seconds, 3),
                "ok": self.ok, "detail": self.detail}


@dataclass
class Timeline:
    """The phases of one operation, timed with the given clock."""

    clock: Clock
    started: datetime = field(init=False)
    phases: list[Phase] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started = self.clock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        """Time one phase; it is marked failed (with the error) if the block raises."""
        current = Phase(name, self.clock())
        self.phases.append(current)
        try:
            yield current
        except BaseException as exc:
            current.ok = False
            if not current.detail:
                current.detail = first_line(exc)
            raise
        finally:
            current.finished = self.clock()
        if current.ok is None:
            current.ok = True

    def elapsed(self, until: datetime | None = None) -> float:
        return ((until or self.clock()) - self.started).total_seconds()

    def to_list(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.phases]


def restored_point(snapshot_at: datetime, replayed_at: datetime | None = None,
                   pitr: bool = False) -> tuple[datetime, str]:
    """The newest moment the drill actually brought back, and what it comes from: the
    dump's snapshot, or, when it rehearsed point-in-time recovery, the last transaction
    PostgreSQL replayed from the WAL archive (only a base backup and an unbroken WAL chain
    get it there; without a replayed transaction, the base backup's own point stands)."""
    if pitr and replayed_at is not None and replayed_at > snapshot_at:
        return replayed_at, "replayed-wal"
    return snapshot_at, "base-backup" if pitr else "backup-snapshot"


def rto_seconds(started: datetime, recovered: datetime) -> float:
    """Recovery time: from the start to a verified, healthy restore."""
    return (recovered - started).total_seconds()


def rpo_seconds(started: datetime, restorable: datetime) -> float:
    """Data that would be lost: from the newest restorable point to the start."""
    return (started - restorable).total_seconds()


def met(seconds: float | None, target_minutes: float) -> bool:
    return seconds is not None and seconds <= target_minutes * 60


def checklist(items: dict[str, bool | None]) -> list[dict[str, Any]]:
    """The runbook's checklist, ticked: True done, False failed, None not run."""
    unknown = set(items) - {key for key, _ in CHECKLIST}
    if unknown:
        raise ValueError(f"not on the checklist: {sorted(unknown)}")
    return [{"item": key, "label": label, "done": items.get(key)} for key, label in CHECKLIST]


def missed_targets(report: dict[str, Any]) -> list[str]:
    """One sentence per missed objective of a drill report (empty when both were met)."""
    missed = []
    for kind in ("rto", "rpo"):
        seconds, target = report[f"{kind}_seconds"], report["targets"][f"{kind}_minutes"]
        if not report[f"{kind}_met"]:
            measured = "not reached" if seconds is None else f"{seconds / 60:.2f} min"
            missed.append(f"{kind.upper()} {measured} exceeds the target of {target:g} min")
    return missed


def drill_key(started: datetime) -> str:
    """`drills/<timestamp>.json` in the repository."""
    return f"drills/{started.astimezone(UTC):%Y%m%dT%H%M%S%fZ}.json"


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.2f} min ({seconds:.1f} s)"


def _ticked(item: dict[str, Any]) -> str:
    return {True: f"[x] {item['label']}", False: f"[ ] {item['label']}: **FAILED**",
            None: f"[ ] {item['label']} (not run)"}[item["done"]]


def phases_markdown(phases: list[dict[str, Any]]) -> str:
    lines = ["| phase | start (UTC) | end (UTC) | duration (s) | result |", "|---|---|---|---|---|"]
    for p in phases:
        result = {True: "ok", False: "FAILED", None: "-"}[p["ok"]]
        detail = f": {p['detail']}" if p["detail"] else ""
        lines.append(f"| {p['name']} | {p['started_at']} | {p['finished_at'] or '-'} | "
                     f"{p['duration_seconds'] if p['duration_seconds'] is not None else '-'} | "
                     f"{result}{detail} |")
    return "\n".join(lines)


def drill_markdown(report: dict[str, Any]) -> str:
    targets = report["targets"]
    lines = [
        f"## DR drill {report['started_at']} ({report['scenario']}): "
        f"{'all targets met' if report['ok'] else 'ATTENTION'}",
        "",
        f"- backup: {report['backup_id'] or '-'} of {report['database'] or '-'} in {report['repository']}",
        f"- RTO: {_minutes(report['rto_seconds'])}, target {targets['rto_minutes']:g} min: "
        f"{'met' if report['rto_met'] else 'MISSED'}",
        f"- RPO: {_minutes(report['rpo_seconds'])}, target {targets['rpo_minutes']:g} min: "
        f"{'met' if report['rpo_met'] else 'MISSED'} (restored point "
        f"{report['restored_point'] or '-'}, from the {report['rpo_source']})",
        "",
        "### Checklist",
        "",
        *[f"- {_ticked(item)}" for item in report["checklist"]],
        "",
        "### Phases",
        "",
        phases_markdown(report["phases"]),
    ]
    if report["problems"]:
        lines += ["", "### Problems", "", *[f"- {p}" for p in report["problems"]]]
    return "\n".join(lines) + "\n"


def drill_report(*, scenario: str, targets: Targets, started: datetime, finished: datetime,
                 disaster_at: datetime | None = None,
                 recovered: datetime | None, restored: tuple[datetime, str] | None,
                 items: dict[str, bool | None],
                 phases: list[dict[str, Any]], repository: str, database: str | None,
                 backup_id: str | None, problems: list[str]) -> dict[str, Any]:
    """The drill's report: RTO from the start (pgdr's own start-up included) to a verified,
    healthy restore (`recovered`), RPO from the point it restored (`restored`: see
    restored_point) to the rehearsed disaster (`disaster_at`, when the drill itself began;
    default the start), each against its target, and the checklist with both ticked."""
    point, source = restored or (None, None)
    rto = rto_seconds(started, recovered) if recovered else None
    disaster_at = disaster_at or started
    rpo = rpo_seconds(disaster_at, point) if point else None
    report: dict[str, Any] = {
        "scenario": scenario,
        "targets": {"rto_minutes": targets.rto_minutes, "rpo_minutes": targets.rpo_minutes},
        "started_at": iso(started),
        "disaster_at": iso(disaster_at),
        "finished_at": iso(finished),
        "repository": repository,
        "database": database,
        "backup_id": backup_id,
        "restored_point": iso(point) if point else None,
        "rpo_source": source,
        "rto_seconds": None if rto is None else round(rto, 3),
        "rpo_seconds": None if rpo is None else round(rpo, 3),
        "rto_met": met(rto, targets.rto_minutes),
        "rpo_met": met(rpo, targets.rpo_minutes),
        "phases": phases,
        "problems": list(problems),
    }
    report["checklist"] = checklist({**items, "rto_met": report["rto_met"], "rpo_met": report["rpo_met"]})
    report["missed"] = missed_targets(report)
    report["ok"] = not report["missed"] and not problems and all(
        item["done"] is not False for item in report["checklist"])
    return report


def drill_metrics(report: dict[str, Any]) -> dict[str, float]:
    """What CloudWatch gets from a drill: DrillFailed always (an alarm on it catches a
    drill that could not even restore), RTO and RPO when they were measured."""
    values = {"DrillFailed": 0.0 if report["ok"] else 1.0}
    for name, key in (("DrillRTOSeconds", "rto_seconds"), ("DrillRPOSeconds", "rpo_seconds")):
        if report[key] is not None:
            values[name] = float(report[key])
    return values
