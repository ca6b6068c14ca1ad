"""prefect.yaml's deployments and schedules, and a deployment run by a real worker."""

from __future__ import annotations

import asyncio
import re
import subprocess
import tomllib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.server.schemas.schedules import CronSchedule as ServerCronSchedule

from deployments.register import available_specs, deploy, register
from deployments.serve import runner_deployments
from deployments.specs import PREFECT_YAML, ROOT, WORK_POOL, DeploymentSpec, load_specs, split_available
from pgdr.catalog.scan import list_backups
from pgdr.storage.repository import open_repository
from tests.support.worker import PREFECT, process_worker, worker_env

EXPECTED = {
    "backup/daily": ("flows/backup.py:backup", "0 2 * * *"),
    "backup/weekly": ("flows/backup.py:backup", "0 3 * * 0"),
    "backup/monthly": ("flows/backup.py:backup", "0 4 1 * *"),
    "verify/daily": ("flows/verify.py:verify", "0 6 * * *"),
    "prune/daily": ("flows/prune.py:prune", "0 5 * * *"),
    "drill/monthly": ("flows/drill.py:drill", "0 10 1-7 * 6"),
    "basebackup/nightly": ("flows/basebackup.py:basebackup", "0 1 * * *"),
    "check/daily": ("flows/check.py:check", "30 6 * * *"),
    "replicate/frequent": ("flows/replicate.py:replicate", "*/5 * * * *"),
    "backup/manual": ("flows/backup.py:backup", None),
    "backup/pre-deploy": ("flows/backup.py:backup", None),
    "restore/manual": ("flows/restore.py:restore", None),
    "restore-to-temp/manual": ("flows/restore.py:restore_to_temp", None),
    "recover-table/manual": ("flows/recover_table.py:recover_table", None),
    "failover/manual": ("flows/failover.py:failover", None),
    "pitr/manual": ("flows/pitr.py:pitr", None),
    "fleet/manual": ("flows/fleet.py:fleet", None),
    "backup/fleet": ("flows/backup.py:backup", None),
    "verify/fleet": ("flows/verify.py:verify", None),
}


def specs_in(timezone: str, tmp_path: Path) -> dict[str, DeploymentSpec]:
    """prefect.yaml with its time zone anchor set as an operator would set it."""
    text = PREFECT_YAML.read_text()
    assert "timezone: &timezone UTC" in text
    copy = tmp_path / "prefect.yaml"
    copy.write_text(text.replace("timezone: &timezone UTC", f"timezone: &timezone {timezone}"))
    specs = load_specs(copy)
    return {spec.label: spec for spec in specs}


def next_runs(spec: DeploymentSpec, count: int, start: datetime) -> list[datetime]:
    """The schedule's next runs as the Prefect server computes them."""
    (schedule,) = spec.cron_schedules()
    server_schedule = ServerCronSchedule(**schedule.model_dump())
    return asyncio.run(server_schedule.get_dates(n=count, start=start))


def test_prefect_yaml_passes_prefects_own_schema_and_lists_every_deployment():
    raw = yaml.safe_load(PREFECT_YAML.read_text())
    model = PrefectYamlModel.model_validate(raw)
    assert len(model.deployments) == len(EXPECTED)
    for deployment in model.deployments:
        assert deployment.work_pool.name == WORK_POOL
        for schedule in deployment.schedules or []:
            # A dict that is not a valid RawScheduleConfig would silently become another type.
            assert isinstance(schedule, RawScheduleConfig), schedule
    specs = {spec.label: spec for spec in load_specs()}
    assert {label: (spec.entrypoint, spec.schedules[0]["cron"] if spec.schedules else None)
            for label, spec in specs.items()} == EXPECTED
    assert specs["backup/daily"].parameters == {"tier": "daily"}
    assert specs["backup/pre-deploy"].parameters == {"tier": "pre-deploy"}
    # The nightly base backup follows the default policy (incrementals on PostgreSQL 17+).
    assert specs["basebackup/nightly"].parameters == {"tier": "hot", "kind": "auto"}


def test_python_reads_the_same_schedules_as_prefect_deploy():
    """One source of truth: `prefect deploy` and deployments.serve build equal schedules."""
    for spec in load_specs():
        built = [_schedule_config_to_deployment_schedule(item)["schedule"] for item in spec.schedules]
        assert spec.cron_schedules() == built, spec.label


@pytest.mark.parametrize("timezone", ["UTC", "Asia/Seoul"])
def test_next_runs_fall_on_the_runbook_times_in_the_configured_time_zone(timezone, tmp_path):
    specs = specs_in(timezone, tmp_path)
    zone = ZoneInfo(timezone)
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def local(runs: list[datetime]) -> list[datetime]:
        return [run.astimezone(zone) for run in runs]

    daily = local(next_runs(specs["backup/daily"], 10, start))
    assert all((r.hour, r.minute) == (2, 0) for r in daily)
    assert len({r.date() for r in daily}) == 10
    weekly = local(next_runs(specs["backup/weekly"], 8, start))
    assert all(r.weekday() == 6 and r.hour == 3 for r in weekly)
    monthly = local(next_runs(specs["backup/monthly"], 12, start))
    assert all(r.day == 1 and r.hour == 4 for r in monthly)
    assert all(r.hour == 6 for r in local(next_runs(specs["verify/daily"], 3, start)))
    assert all(r.hour == 5 for r in local(next_runs(specs["prune/daily"], 3, start)))

    drills = local(next_runs(specs["drill/monthly"], 12, start))
    # Exactly the first Saturday of each of the next twelve months, at 10:00 local time.
    first_saturdays = []
    for month in range(12):
        year, month_no = 2026 + month // 12, month % 12 + 1
        day = next(d for d in range(1, 8) if datetime(year, month_no, d).weekday() == 5)
        first_saturdays.append(datetime(year, month_no, day, 10, 0, tzinfo=zone))
    assert drills == first_saturdays
    assert str(drills[0].tzinfo) == timezone


def test_deployments_whose_flow_is_missing_are_skipped_and_named(tmp_path, caplog):
    """A checkout with only the backup flow: every other deployment is skipped, and named."""
    copy = tmp_path / "prefect.yaml"
    copy.write_text(PREFECT_YAML.read_text())
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "backup.py").write_text("")
    backups = {label for label, (entrypoint, _) in EXPECTED.items()
               if entrypoint.startswith("flows/backup.py:")}
    present, missing = split_available(load_specs(copy))
    assert {spec.label for spec in present} == backups
    assert {spec.label for spec in missing} == set(EXPECTED) - backups
    with caplog.at_level("WARNING", logger="pgdr.deployments"):
        assert [spec.label for spec in available_specs(path=copy)] == [spec.label for spec in present]
    assert all(f"skipping {spec.label}:" in caplog.text for spec in missing)


def test_serve_builds_every_available_deployment_with_its_schedules():
    served = {f"{d.flow_name}/{d.name}": d for d in runner_deployments(timezone="Asia/Seoul")}
    assert set(served) == {spec.label for spec in available_specs()}
    daily = served["backup/daily"]
    assert daily.parameters == {"tier": "daily"}
    assert [s.schedule.cron for s in daily.schedules] == ["0 2 * * *"]
    assert daily.schedules[0].schedule.timezone == "Asia/Seoul"
    assert served["backup/manual"].schedules in (None, [])


def test_register_creates_the_deployments_on_the_server():
    asyncio.run(_ensure_pool())
    ids = register(["backup/weekly", "verify/daily"], timezone="Asia/Seoul")
    assert set(ids) == {"backup/weekly", "verify/daily"}

    async def read() -> tuple:
        async with get_client() as client:
            return (await client.read_deployment_by_name("backup/weekly"),
                    await client.read_deployment_by_name("verify/daily"))

    weekly, verify = asyncio.run(read())
    assert weekly.id == ids["backup/weekly"] and weekly.work_pool_name == WORK_POOL
    assert weekly.parameters == {"tier": "weekly"}
    (schedule,) = weekly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * 0", "Asia/Seoul")
    assert verify.entrypoint.endswith("flows/verify.py:verify")


async def _ensure_pool() -> None:
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"), overwrite=True)


def _prefect(*argv: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_prefect_deploy_then_a_worker_runs_a_real_backup_with_parameters(fleet_db, tmp_path):
    """prefect deploy (the CLI, from prefect.yaml) -> prefect deployment run --watch with
    parameters -> a process worker runs the flow -> the backup is in the repository."""
    env = worker_env()
    asyncio.run(_ensure_pool())
    present, missing = split_available(load_specs())
    if missing:
        print("not deployed, flow not in this checkout:", ", ".join(spec.label for spec in missing))
    names = [arg for spec in present for arg in ("--name", spec.label)]
    deployed = _prefect("deploy", "--no-prompt", *names, env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    repo_url = f"file://{tmp_path}/repo"
    with process_worker(WORK_POOL, tmp_path, env) as log:
        run = _prefect("deployment", "run", "backup/manual", "--param", f"db={fleet_db}",
                       "--param", f"repo={repo_url}", "--param", "tier=pre-deploy",
                       "--watch", "--watch-timeout", "240", env=env)
    assert run.returncode == 0, run.stdout + run.stderr + log.read_text()[-3000:]
    assert "Completed" in run.stdout
    (backup,) = list_backups(open_repository(repo_url))
    assert (backup.database, backup.tier) == ("fleet", "pre-deploy")
    assert sum(backup.row_counts.values()) > 0


def specs_on_engine(engine: str, tmp_path: Path) -> dict[str, DeploymentSpec]:
    """prefect.yaml with its ENGINE line pointed at another engine, as docs/fleet.md says."""
    text = PREFECT_YAML.read_text()
    line = "<<: *process_pool  # ENGINE"
    assert line in text
    copy = tmp_path / "prefect.yaml"
    copy.write_text(text.replace(line, f"<<: *{engine}_pool  # ENGINE"))
    return {spec.label: spec for spec in load_specs(copy)}


def test_one_line_moves_every_deployment_to_the_docker_or_ecs_engine(tmp_path):
    image = re.search(r"docker build -t (pgdr:[\w.-]+) \.", (ROOT / "Dockerfile").read_text()).group(1)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image == f"pgdr:{version}"
    for engine, pool in (("docker", "pgdr-docker"), ("ecs", "pgdr-ecs")):
        specs = specs_on_engine(engine, tmp_path)
        assert set(specs) == set(EXPECTED)
        assert {spec.work_pool for spec in specs.values()} == {pool}
        assert {spec.job_variables["image"].rsplit("/", 1)[-1] for spec in specs.values()} == {image}
    docker = specs_on_engine("docker", tmp_path)["backup/fleet"].job_variables
    # The Docker worker's job variables (prefect-docker's DockerWorkerJobConfiguration).
    assert set(docker) <= {"image", "image_pull_policy", "auto_remove", "env", "networks", "network_mode",
                           "labels", "name", "command", "volumes", "stream_output", "mem_limit", "privileged"}


def test_the_ecs_engine_is_accepted_by_a_real_ecs_work_pool(tmp_path):
    """prefect-aws's ECS worker template: the server validates the job variables."""
    from prefect_aws.workers.ecs_worker import ECSWorker

    template = ECSWorker.get_default_base_job_template()
    spec = specs_on_engine("ecs", tmp_path)["backup/fleet"]
    assert set(spec.job_variables) <= set(template["variables"]["properties"])

    async def create_pool() -> None:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="pgdr-ecs", type="ecs",
                                                         base_job_template=template), overwrite=True)

    asyncio.run(create_pool())
    ids = deploy([replace(spec, root=ROOT)])

    async def read() -> Any:
        async with get_client() as client:
            return await client.read_deployment(ids["backup/fleet"])

    deployment = asyncio.run(read())
    assert deployment.work_pool_name == "pgdr-ecs"
    assert deployment.job_variables["launch_type"] == "FARGATE"


def test_the_worker_image_installs_exactly_the_locked_packages_and_they_satisfy_pyproject():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir --no-deps -r requirements.lock" in dockerfile
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm$", dockerfile, re.M)  # a pinned base
    for package in ("GNUPG", "ZSTD", "PG_CLIENT"):
        assert re.search(rf"^ARG {package}_VERSION=\S+$", dockerfile, re.M), package
    locked = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            locked[canonicalize_name(name)] = version
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in requirements.lock: run make lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (name, locked[name])
    assert "psycopg-binary" in locked  # the extra is locked too
    assert not {"pytest", "moto", "ruff", "hypothesis"} & set(locked)  # nothing from dev
