""".github/workflows: schema-valid, zizmor-clean, pinned, least-privilege, and saying what they
must (CI gates, release artefacts, atomic deploys with smoke tests and rollback).

Nothing here can run the workflows (no GitHub); they are checked statically. The CI workflow
itself runs zizmor online, which also verifies that every pinned SHA is a real commit of the
named action.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit import UV_SYNC, require_binary

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
NAMES = ("ci.yml", "release.yml", "deploy.yml")
# Hardening checks apply to every workflow, including ones added later.
ALL = tuple(sorted(path.name for path in WORKFLOWS.glob("*.y*ml")))
_SHA_PIN = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def load(name: str) -> dict[str, Any]:
    data: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    if True in data:  # YAML 1.1 reads the key `on` as a boolean
        data["on"] = data.pop(True)
    return data


def text(name: str) -> str:
    return (WORKFLOWS / name).read_text()


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps", []))


def step_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [step for step in steps(job) if str(step.get("uses", "")).startswith(action + "@")]


def all_run(job: dict[str, Any]) -> str:
    return "\n".join(str(step.get("run", "")) for step in steps(job))


# --- linters -----------------------------------------------------------------------------------
def test_workflows_exist() -> None:
    assert set(NAMES) <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_github_workflow_schema(name: str) -> None:
    tool = require_binary("check-jsonschema", hint=UV_SYNC)
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.github-workflows", str(WORKFLOWS / name)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_offline_has_no_medium_or_high_findings() -> None:
    tool = require_binary("zizmor", hint=UV_SYNC)
    result = subprocess.run(
        [tool, "--offline", "--format", "json", str(WORKFLOWS)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert result.stdout.strip(), result.stderr
    findings = json.loads(result.stdout)
    serious = [
        {
            "audit": finding["ident"],
            "severity": finding["determinations"]["severity"],
            "where": [
                location["concrete"]["location"]["start_point"]["row"] + 1
                for location in finding["locations"]
            ],
            "desc": finding.get("desc"),
        }
        for finding in findings
        if finding["determinations"]["severity"] in {"Medium", "High"}
    ]
    assert serious == [], json.dumps(serious, indent=2)
    # zizmor exits non-zero for findings; only low/informational ones may remain.
    assert result.returncode in {0, 11, 12}, result.stderr


@pytest.mark.parametrize("name", ALL)
def test_run_scripts_pass_shellcheck(name: str, tmp_path: Path) -> None:
    tool = require_binary("shellcheck", hint=UV_SYNC)
    for job_name, job in load(name)["jobs"].items():
        for index, step in enumerate(steps(job)):
            if "run" not in step:
                continue
            # Expressions are substituted by the runner before bash sees the script.
            script = re.sub(r"\$\{\{[^}]*\}\}", "placeholder", str(step["run"]))
            path = tmp_path / f"{job_name}-{index}.sh"
            path.write_text("#!/usr/bin/env bash\nset -eo pipefail\n" + script)
            result = subprocess.run(
                [tool, "--shell=bash", "--severity=warning", str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, f"{name} {job_name} step {index}:\n{result.stdout}"


# --- hardening ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_every_action_is_pinned_to_a_commit_sha(name: str) -> None:
    lines = text(name).splitlines()
    uses = [line for line in lines if re.match(r"^\s*(-\s*)?uses:", line)]
    assert uses
    for line in uses:
        reference = line.split("uses:", 1)[1].split("#", 1)[0].strip()
        if reference.startswith("./"):
            continue  # this repository's reusable workflow, same commit
        assert _SHA_PIN.match(reference), f"{name}: {reference} is not pinned to a commit"
        assert re.search(r"#\s*v\d+\.\d+\.\d+\s*$", line), f"{name}: say which release: {line}"


def test_same_action_same_pin_everywhere() -> None:
    pins: dict[str, set[str]] = {}
    for name in ALL:
        for match in re.finditer(r"uses:\s*([\w.-]+/[\w./-]+)@([0-9a-f]{40})", text(name)):
            pins.setdefault(match[1], set()).add(match[2])
    assert pins
    assert {action: shas for action, shas in pins.items() if len(shas) > 1} == {}


@pytest.mark.parametrize("name", ALL)
def test_top_level_permissions_are_read_only(name: str) -> None:
    permissions = load(name)["permissions"]
    assert permissions in ({}, {"contents": "read"}), permissions
    for job_name, job in load(name)["jobs"].items():
        granted = job.get("permissions", {})
        assert granted != "write-all", job_name
        assert "id-token" not in granted, f"{job_name}: no job here needs OIDC"
        writes = {scope for scope, level in granted.items() if level == "write"}
        assert writes <= {"packages"}, f"{job_name}: {writes}"


@pytest.mark.parametrize("name", ALL)
def test_checkouts_do_not_persist_credentials_and_jobs_time_out(name: str) -> None:
    for job_name, job in load(name)["jobs"].items():
        if "uses" in job:
            continue  # a reusable-workflow call: its jobs carry their own limits
        assert isinstance(job.get("timeout-minutes"), int), f"{job_name}: timeout-minutes"
        for step in step_using(job, "actions/checkout"):
            assert step.get("with", {}).get("persist-credentials") is False, job_name


# --- ci.yml --------------------------------------------------------------------------------------
def test_ci_triggers_and_concurrency() -> None:
    ci = load("ci.yml")
    assert "pull_request" in ci["on"]
    # Pushes to main and tags run it through release.yml (workflow_call), not a second time.
    assert "workflow_call" in ci["on"]
    assert "push" not in ci["on"]
    concurrency = ci["concurrency"]
    assert "github.event.pull_request.number" in concurrency["group"]
    assert "pull_request" in str(concurrency["cancel-in-progress"])


def test_ci_jobs_cover_lint_tests_chart_hadolint_and_workflows() -> None:
    jobs = load("ci.yml")["jobs"]
    assert "make lint" in all_run(jobs["lint"])
    test = jobs["test"]
    assert test["services"]["postgres"]["image"].startswith("postgres:16")
    assert test["env"]["TEST_DATABASE_URL"].startswith("postgresql://")
    assert test["env"]["CI"] == "true", "nothing may skip in CI"
    script = all_run(test)
    for package in ("nginx", "pgbouncer", "redis-server", "prometheus"):
        assert re.search(rf"\b{package}\b", script), package
    assert "make test" in script
    makefile = (ROOT / "Makefile").read_text()
    assert "pytest --cov " in makefile, "`make test` measures coverage"
    # The gate lives in the coverage config, so every runner (make, bare pytest --cov,
    # coverage report) enforces it.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["coverage"]["report"]["fail_under"] >= 90
    assert step_using(test, "actions/upload-artifact")
    assert "make test-deploy" in all_run(jobs["chart"])
    assert "hadolint" in all_run(jobs["hadolint"])
    lint = all_run(jobs["workflows"])
    assert "zizmor" in lint
    assert "check-jsonschema --builtin-schema vendor.github-workflows" in lint
    for job in jobs.values():
        for step in step_using(job, "astral-sh/setup-uv"):
            assert step["with"]["python-version"]


# --- release.yml ---------------------------------------------------------------------------------
def test_release_triggers() -> None:
    release = load("release.yml")
    assert release["on"]["push"]["tags"] == ["v*"]
    assert release["on"]["push"]["branches"] == ["main"]


def test_release_builds_scans_and_pushes_with_sbom_and_provenance() -> None:
    image = load("release.yml")["jobs"]["image"]
    assert image["permissions"]["packages"] == "write"
    builds = step_using(image, "docker/build-push-action")
    scan, publish = builds
    assert scan["with"]["push"] is False
    assert scan["with"]["load"] is True
    assert publish["with"]["push"] is True
    assert publish["with"]["sbom"] is True
    assert publish["with"]["provenance"] == "mode=max"
    for build in builds:
        assert build["with"]["file"] == ".docker/Dockerfile"
        assert "type=gha" in build["with"]["cache-from"]
    assert "type=gha" in scan["with"]["cache-to"]
    for arg in ("VERSION=", "REVISION=", "CREATED="):
        assert arg in publish["with"]["build-args"]
    order = [step.get("uses", "").split("@")[0] for step in steps(image)]
    assert order.index("aquasecurity/trivy-action") < len(order) - 1 - order[::-1].index(
        "docker/build-push-action"
    ), "scan before push"
    (trivy,) = step_using(image, "aquasecurity/trivy-action")
    assert trivy["with"]["severity"] == "CRITICAL"
    assert trivy["with"]["ignore-unfixed"] is True
    assert str(trivy["with"]["exit-code"]) == "1"
    assert trivy["with"]["image-ref"] == scan["with"]["tags"]


def test_release_tags_sha_semver_and_latest_only_on_release_tags() -> None:
    image = load("release.yml")["jobs"]["image"]
    (meta,) = step_using(image, "docker/metadata-action")
    tags = meta["with"]["tags"]
    assert "type=sha,prefix=sha-,format=short" in tags
    assert "type=semver,pattern={{version}}" in tags
    assert "latest=false" in meta["with"]["flavor"]
    (latest,) = [line for line in tags.splitlines() if "latest" in line]
    assert "enable=${{ startsWith(github.ref, 'refs/tags/v')" in latest
    assert "!contains(github.ref, '-')" in latest, "no latest for prereleases"


def test_release_pushes_the_chart_to_an_oci_registry() -> None:
    chart = load("release.yml")["jobs"]["chart"]
    script = all_run(chart)
    assert "helm package charts/fastapi-app" in script
    assert "helm push" in script
    assert "oci://ghcr.io/" in script
    assert "--password-stdin" in script


def test_release_deploys_staging_from_main_and_production_from_tags() -> None:
    jobs = load("release.yml")["jobs"]
    staging, production = jobs["deploy-staging"], jobs["deploy-production"]
    assert staging["uses"] == production["uses"] == "./.github/workflows/deploy.yml"
    assert staging["if"] == "github.ref == 'refs/heads/main'"
    assert staging["with"]["environment"] == "staging"
    assert production["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert production["with"]["environment"] == "production"
    for job in (staging, production):
        assert job["needs"] == ["image", "e2e", "chart"]
        assert "image.outputs.digest" in job["with"]["image-digest"], "deploy what was scanned"
        assert "secrets" not in job, "environment secrets are read by the deploy job itself"


# --- the release graph: nothing published or deployed that did not pass -------------------------
_STATUS_FUNCTIONS = re.compile(r"\b(always|failure|cancelled)\s*\(")


def needs_of(job: dict[str, Any]) -> list[str]:
    needs = job.get("needs", [])
    return [needs] if isinstance(needs, str) else list(needs)


def upstream(jobs: dict[str, Any], name: str) -> set[str]:
    found: set[str] = set()
    pending = needs_of(jobs[name])
    while pending:
        current = pending.pop()
        if current not in found:
            found.add(current)
            pending.extend(needs_of(jobs[current]))
    return found


def jobs_that_run(jobs: dict[str, Any], failing: set[str]) -> set[str]:
    """The jobs that start in a run where the ``failing`` ones fail, by GitHub's rule: a job
    whose `if` uses no status function (always/failure/cancelled) starts only when every job it
    needs succeeded; otherwise it is skipped. Branch conditions count as true (the worst case)."""
    outcome: dict[str, str] = {}
    while len(outcome) < len(jobs):
        decided = len(outcome)
        for name, job in jobs.items():
            needs = needs_of(job)
            if name in outcome or any(need not in outcome for need in needs):
                continue
            assert not _STATUS_FUNCTIONS.search(str(job.get("if", ""))), name
            if all(outcome[need] == "success" for need in needs):
                outcome[name] = "failure" if name in failing else "success"
            else:
                outcome[name] = "skipped"
        assert len(outcome) > decided, "the needs graph has a cycle"
    return {name for name, result in outcome.items() if result != "skipped"}


def publishes(job: dict[str, Any]) -> bool:
    pushes_image = any(step.get("with", {}).get("push") is True for step in steps(job))
    return (
        job.get("permissions", {}).get("packages") == "write"
        or pushes_image
        or bool(re.search(r"\b(docker|helm|oras|crane) push\b", all_run(job)))
    )


def deploys(job: dict[str, Any]) -> bool:
    return job.get("uses") == "./.github/workflows/deploy.yml" or "helm upgrade" in all_run(job)


def test_release_runs_the_whole_ci_first() -> None:
    jobs = load("release.yml")["jobs"]
    (ci_job,) = [
        name for name, job in jobs.items() if job.get("uses") == "./.github/workflows/ci.yml"
    ]
    assert needs_of(jobs[ci_job]) == [], "CI starts the chain"
    ci = load("ci.yml")
    assert "workflow_call" in ci["on"]
    assert not ci["on"]["workflow_call"], "no inputs that could select or skip CI jobs"
    for name, job in ci["jobs"].items():
        # A job that may be skipped or may fail without failing the call would let a red
        # commit through.
        assert "if" not in job, name
        assert "continue-on-error" not in job, name
        for step in steps(job):
            assert "continue-on-error" not in step, (name, step.get("name"))
            if "make test" in str(step.get("run", "")) or "make lint" in str(step.get("run", "")):
                assert "if" not in step, (name, step.get("name"))
    assert {"lint", "test"} <= set(ci["jobs"])


def test_release_publishes_nothing_before_ci_and_deploys_nothing_before_e2e() -> None:
    jobs = load("release.yml")["jobs"]
    publishers = {name for name, job in jobs.items() if publishes(job)}
    deployers = {name for name, job in jobs.items() if deploys(job)}
    assert publishers == {"image", "chart"}
    assert deployers == {"deploy-staging", "deploy-production"}
    for name in publishers | deployers:
        assert "ci" in upstream(jobs, name), f"{name} can run before CI passed"
    for name in deployers | {"chart"}:
        assert "e2e" in upstream(jobs, name), f"{name} can run before e2e passed"
    assert "image" in upstream(jobs, "e2e"), "e2e tests the image that was pushed"
    for name in publishers | deployers | {"e2e"}:
        for gate in upstream(jobs, name) | {name}:
            assert not _STATUS_FUNCTIONS.search(str(jobs[gate].get("if", ""))), gate
            assert "continue-on-error" not in jobs[gate], gate
            for step in steps(jobs[gate]):
                assert "continue-on-error" not in step, (gate, step.get("name"))


@pytest.mark.parametrize("failing", ["ci", "image", "e2e"])
def test_a_failure_stops_everything_downstream(failing: str) -> None:
    """The graph, simulated: with CI red nothing is pushed; with e2e red nothing is deployed
    (and the chart is not published)."""
    jobs = load("release.yml")["jobs"]
    ran = jobs_that_run(jobs, {failing})
    publishers = {name for name, job in jobs.items() if publishes(job)}
    deployers = {name for name, job in jobs.items() if deploys(job)}
    if failing == "ci":
        assert not (ran & (publishers | deployers | {"e2e"})), ran
    else:
        assert not (ran & (deployers | {"chart"})), ran
    # And when nothing fails, everything runs.
    assert jobs_that_run(jobs, set()) >= publishers | deployers | {"ci", "e2e"}


def test_release_builds_arm64_and_refuses_stand_in_bases() -> None:
    image = load("release.yml")["jobs"]["image"]
    order = [step.get("uses", "").split("@")[0] or step.get("name", "") for step in steps(image)]
    _, publish = step_using(image, "docker/build-push-action")
    assert set(publish["with"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert order.index("docker/setup-qemu-action") < order.index("docker/setup-buildx-action")
    refuse = next(s for s in steps(image) if "stand-in" in str(s.get("run", "")))
    assert "io.github.fastapi-app.stand-in" in refuse["run"]
    assert steps(image).index(refuse) < steps(image).index(publish), "checked before the push"


def test_release_e2e_installs_the_pushed_image_on_kind_with_the_repository_script() -> None:
    e2e = load("release.yml")["jobs"]["e2e"]
    assert e2e["permissions"] == {"contents": "read", "packages": "read"}
    (kind,) = step_using(e2e, "helm/kind-action")
    assert kind["with"]["install_only"] is True, "the script creates the cluster itself"
    assert step_using(e2e, "azure/setup-helm")
    pull = next(s for s in steps(e2e) if "docker pull" in str(s.get("run", "")))
    assert "needs.image.outputs.digest" in pull["env"]["DIGEST"]
    run = next(s for s in steps(e2e) if "tests/e2e/run.sh" in str(s.get("run", "")))
    assert run["run"].strip() == "tests/e2e/run.sh"
    assert (ROOT / "tests" / "e2e" / "run.sh").exists()


# --- deploy.yml ----------------------------------------------------------------------------------
def test_deploy_is_atomic_tested_and_rolls_back() -> None:
    deploy = load("deploy.yml")
    assert set(deploy["on"]) == {"workflow_call", "workflow_dispatch"}
    assert deploy["on"]["workflow_dispatch"]["inputs"]["environment"]["options"] == [
        "staging",
        "production",
    ]
    job = deploy["jobs"]["deploy"]
    # Approval and allowed refs come from the environment's protection rules.
    assert job["environment"]["name"] == "${{ inputs.environment }}"
    script = all_run(job)
    upgrade = next(str(s["run"]) for s in steps(job) if "helm upgrade" in str(s.get("run")))
    for flag in ("--install", "--atomic", "--wait", "--timeout 10m", "image.digest"):
        assert flag in upgrade, flag
    assert "helm test" in script
    assert "python -m service smoke" in script
    assert "helm rollback" in script
    assert deploy["concurrency"]["cancel-in-progress"] is False
    raw = text("deploy.yml")
    assert "helm rollback" in raw.split("name: deploy", 1)[0], "rollback documented up top"
    assert "migration" in raw.split("name: deploy", 1)[0].lower()


def test_expressions_never_expand_inside_run_scripts() -> None:
    """Untrusted values reach scripts through env, never by template expansion."""
    for name in ALL:
        for job in load(name)["jobs"].values():
            for step in steps(job):
                assert "${{" not in str(step.get("run", "")), (name, step.get("name"))
