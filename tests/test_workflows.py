"""The GitHub Actions workflows: valid YAML, the expected triggers, inputs and commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from deployments.specs import load_specs

WORKFLOWS = Path(__file__).resolve().parents[1] / ".github" / "workflows"


def workflow(name: str) -> dict:
    document = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as true.
    document["on"] = document.pop(True, None) or document.get("on")
    return document


def commands(document: dict) -> str:
    return "\n".join(step.get("run", "") for job in document["jobs"].values() for step in job["steps"])


def test_ci_runs_make_test_on_pushes_and_pull_requests():
    ci = workflow("ci.yml")
    assert set(ci["on"]) == {"push", "pull_request"}
    assert re.search(r"^make test$", commands(ci), re.M)


@pytest.mark.parametrize("name", ["backup.yml", "pre-deploy-backup.yml", "drill.yml"])
def test_prefect_workflows_use_only_github_secrets_and_watch_an_existing_deployment(name):
    document = workflow(name)
    text = (WORKFLOWS / name).read_text()
    for job in document["jobs"].values():
        assert job["env"]["PREFECT_API_URL"] == "${{ secrets.PREFECT_API_URL }}"
        assert job["env"]["PREFECT_API_KEY"] == "${{ secrets.PREFECT_API_KEY }}"
    assert not re.search(r"pnu_|https?://\S*prefect", text)  # no key or server written down
    labels = {spec.label for spec in load_specs()}
    runs = re.findall(r'prefect deployment run "([^"]+)"', commands(document))
    assert runs
    for label in runs:
        assert "--watch" in commands(document)
        if "$" not in label:
            assert label in labels
        else:  # backup/$TIER: every tier the workflow offers is a deployment
            tiers = document["on"]["workflow_dispatch"]["inputs"]["tier"]["options"]
            assert {f"backup/{tier}" for tier in tiers} <= labels


def test_backup_workflow_is_scheduled_and_dispatched_with_tier_and_database():
    backup = workflow("backup.yml")
    assert backup["on"]["schedule"] == [{"cron": "0 2 * * *"}]
    inputs = backup["on"]["workflow_dispatch"]["inputs"]
    assert set(inputs) == {"tier", "database"}
    assert inputs["tier"]["default"] == "manual"
    script = commands(backup)
    assert '--param "tier=$TIER"' in script and '--param "db=$DATABASE"' in script


def test_pre_deploy_backup_is_a_reusable_workflow():
    called = workflow("pre-deploy-backup.yml")
    assert set(called["on"]) == {"workflow_call"}
    assert set(called["on"]["workflow_call"]["secrets"]) == {"PREFECT_API_URL", "PREFECT_API_KEY"}
    assert 'prefect deployment run "backup/pre-deploy"' in commands(called)
    assert '--param "tier=pre-deploy"' in commands(called)


def test_drill_workflow_can_be_dispatched_and_goes_red_when_the_drill_fails():
    drill = workflow("drill.yml")
    assert "workflow_dispatch" in drill["on"]
    # `--watch` exits non-zero unless the run Completed, and a drill that missed a target
    # ends Failed (tests/test_failover.py): nothing may swallow that exit status.
    assert re.search(r'^prefect deployment run "drill/monthly" --watch\b[^|;&]*$', commands(drill), re.M)
    for job in drill["jobs"].values():
        assert not job.get("continue-on-error") and not any(s.get("continue-on-error") for s in job["steps"])
