"""The deployments of prefect.yaml, read for Python.

prefect.yaml is the one source of truth for names, parameters and schedules: `prefect
deploy` reads it, and so do `python -m deployments.serve` and `deployments.register`
through this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pgdr.ops.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
WORK_POOL = "pgdr-process"


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of prefect.yaml's `deployments:`."""

    name: str
    entrypoint: str
    description: str = ""
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[dict[str, Any], ...] = ()
    work_pool: str = WORK_POOL
    work_queue: str | None = None
    job_variables: dict[str, Any] = field(default_factory=dict)
    root: Path = ROOT

    @property
    def path(self) -> Path:
        return self.root / self.entrypoint.partition(":")[0]

    @property
    def flow_function(self) -> str:
        return self.entrypoint.partition(":")[2]

    @property
    def label(self) -> str:
        """`flow/deployment`, as `prefect deploy -n` and `prefect deployment run` take it
        (our flows are named after their function, with dashes)."""
        return f"{self.flow_function.replace('_', '-')}/{self.name}"

    def available(self) -> bool:
        """Whether the flow's module is in this checkout."""
        return self.path.is_file()

    def cron_schedules(self, timezone: str | None = None) -> list[Any]:
        """Prefect schedule objects, as `prefect deploy` builds them from the same keys."""
        from prefect.client.schemas.schedules import CronSchedule

        result = []
        for item in self.schedules:
            if "cron" not in item:
                raise ConfigError(f"{self.label}: only cron schedules are supported, not {item}")
            options: dict[str, Any] = {"timezone": timezone or item.get("timezone"),
                                       "day_or": item.get("day_or")}
            result.append(CronSchedule(cron=item["cron"], **{k: v for k, v in options.items()
                                                               if v is not None}))
        return result

    def load_flow(self) -> Any:
        from prefect.flows import load_flow_from_entrypoint

        return load_flow_from_entrypoint(f"{self.path}:{self.flow_function}")


def load_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """Every deployment in prefect.yaml (YAML anchors resolved)."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    specs = []
    for entry in document.get("deployments") or []:
        pool = entry.get("work_pool") or {}
        specs.append(DeploymentSpec(
            name=entry["name"],
            entrypoint=entry["entrypoint"],
            description=entry.get("description") or "",
            tags=tuple(entry.get("tags") or ()),
            parameters=dict(entry.get("parameters") or {}),
            schedules=tuple(entry.get("schedules") or ()),
            work_pool=pool.get("name") or WORK_POOL,
            work_queue=pool.get("work_queue_name"),
            job_variables=dict(pool.get("job_variables") or {}),
            root=path.resolve().parent,
        ))
    return specs


def select(specs: list[DeploymentSpec], names: list[str] | None = None) -> list[DeploymentSpec]:
    """The specs named `flow/deployment` (all when no names), refusing unknown names."""
    if not names:
        return specs
    known = {spec.label: spec for spec in specs}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"unknown deployment(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return [known[name] for name in names]


def split_available(specs: list[DeploymentSpec]) -> tuple[list[DeploymentSpec], list[DeploymentSpec]]:
    """(the specs whose flow module exists here, those whose module is missing)."""
    present = [spec for spec in specs if spec.available()]
    return present, [spec for spec in specs if not spec.available()]
