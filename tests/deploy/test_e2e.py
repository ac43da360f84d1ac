"""The end-to-end kit (tests/e2e/) and the image build scripts, validated offline.

No cluster exists here: the release workflow's e2e job runs tests/e2e/run.sh on a kind cluster.
What can be checked without one is checked: the scripts pass shellcheck, the PostgreSQL
manifest validates against the Kubernetes schemas and meets the restricted Pod Security
Standard the script enforces, and the chart renders with the e2e values (Helm's own library)
into objects that validate, with the properties the run relies on.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import (
    CRD_KINDS,
    KUBE_VERSIONS,
    ROOT,
    Rendered,
    find,
    find_all,
    parse_manifests,
    pod_spec,
    render,
)

from testkit import UV_SYNC, require_binary

pytestmark = pytest.mark.deploy

E2E = ROOT / "tests" / "e2e"
SCRIPTS = [
    E2E / "run.sh",
    ROOT / ".docker" / "build-image",
    ROOT / ".docker" / "stand-in-base",
    ROOT / ".ci" / "run",
]
E2E_IMAGE = {"image": {"repository": "localhost/fastapi-app", "tag": "e2e"}}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_scripts_are_executable_and_shellcheck_clean(script: Path) -> None:
    assert os.access(script, os.X_OK), f"chmod +x {script}"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    shellcheck = require_binary("shellcheck", hint=UV_SYNC)
    result = subprocess.run(
        [shellcheck, "--shell=bash", "--external-sources", str(script)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_scripts_never_push() -> None:
    """Stand-in bases (and images built on them) stay on the machine: the only way an image
    reaches a registry is the release workflow, which refuses stand-ins."""
    for script in SCRIPTS[1:3]:
        code = "\n".join(
            line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")
        )
        assert not re.search(
            r"\b(docker|buildah|podman|skopeo)\b[^\n|;&]*\b(push|login)\b", code
        ), script
    build = (ROOT / ".docker" / "build-image").read_text()
    assert "io.github.fastapi-app.stand-in" in build
    assert "io.github.fastapi-app.stand-in" in (ROOT / ".docker" / "stand-in-base").read_text()
    release = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    assert "io.github.fastapi-app.stand-in" in release


# --- tests/e2e/postgres.yaml ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def postgres_objects() -> list[dict[str, Any]]:
    return parse_manifests((E2E / "postgres.yaml").read_text())


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_postgres_manifest_validates(
    postgres_objects: list[dict[str, Any]], kube_version: str
) -> None:
    assert {obj["kind"] for obj in postgres_objects} == {"Deployment", "Service"}
    for obj in postgres_objects:
        kubernetes_validate.validate(obj, kube_version, strict=True)


def assert_restricted(spec: dict[str, Any], where: str) -> None:
    """The restricted Pod Security Standard the e2e namespace enforces."""
    pod = spec.get("securityContext", {})
    for container in spec["containers"]:
        context = {**pod, **container.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, where
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context["capabilities"]["drop"] == ["ALL"], where
        assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        assert context.get("runAsUser", 1) != 0, where


def test_postgres_meets_restricted_pod_security(postgres_objects: list[dict[str, Any]]) -> None:
    deployment = next(obj for obj in postgres_objects if obj["kind"] == "Deployment")
    spec = pod_spec(deployment)
    assert_restricted(spec, "postgres")
    (container,) = spec["containers"]
    # The same major version as CI's service container.
    ci = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert container["image"] in ci
    env = {item["name"]: item for item in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "postgres"
    service = next(obj for obj in postgres_objects if obj["kind"] == "Service")
    assert service["metadata"]["name"] == "postgres"
    assert service["spec"]["ports"][0]["port"] == 5432


# --- the chart with tests/e2e/values.yaml ---------------------------------------------------------
@pytest.fixture(scope="module")
def e2e_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((E2E / "values.yaml").read_text())
    return {**values, **E2E_IMAGE}


@pytest.fixture(scope="module")
def e2e_render(e2e_values: dict[str, Any]) -> list[Rendered]:
    return render(e2e_values)


def test_e2e_values_pass_the_chart_schema(chart: Any, e2e_values: dict[str, Any]) -> None:
    chart.validate_schema(e2e_values)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_e2e_render_validates(e2e_render: list[Rendered], kube_version: str) -> None:
    for obj in e2e_render:
        assert (obj.obj["apiVersion"], obj.kind) not in CRD_KINDS, (
            f"{obj.kind}: a bare kind cluster has no CRD for it"
        )
        kubernetes_validate.validate(obj.obj, kube_version, strict=True)


def test_e2e_render_is_production_shaped_and_satisfiable(e2e_render: list[Rendered]) -> None:
    deployment = find(e2e_render, "Deployment")
    assert deployment.obj["spec"]["replicas"] == 2
    assert deployment.obj["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spec = pod_spec(deployment.obj)
    assert_restricted(spec, "api")
    (container,) = spec["containers"]
    assert container["image"] == "localhost/fastapi-app:e2e"
    assert {"secretRef": {"name": "fastapi-app-e2e"}} in container["envFrom"]
    assert container["lifecycle"]["preStop"], "endpoints are removed before SIGTERM"
    assert not find_all(e2e_render, "HorizontalPodAutoscaler"), "no metrics-server in kind"
    assert find(e2e_render, "PodDisruptionBudget").obj["spec"]["minAvailable"] == 1
    # The migration Job is a pre-install hook: it runs before anything else on a fresh install.
    job = find(e2e_render, "Job")
    assert "pre-install" in job.annotations["helm.sh/hook"]
    assert_restricted(pod_spec(job.obj), "migrations")
    # The helm test pod, and the API's egress to the in-cluster PostgreSQL on 5432.
    smoke = [obj for obj in find_all(e2e_render, "Pod") if obj.name.endswith("-smoke")]
    assert smoke
    assert smoke[0].annotations["helm.sh/hook"] == "test"
    assert_restricted(pod_spec(smoke[0].obj), "helm test")
    policy = find(e2e_render, "NetworkPolicy", deployment.name)
    database = [
        rule
        for rule in policy.obj["spec"]["egress"]
        if any(port["port"] == 5432 for port in rule.get("ports", []))
    ]
    assert database[0]["to"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "postgres"}}}
    ]
    # The e2e client pods get in through the label the policy admits.
    admitted = policy.obj["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {f"{deployment.name}-client": "true"}}} in admitted


# --- tests/e2e/run.sh -----------------------------------------------------------------------------
def client_pods_the_script_applies() -> list[dict[str, Any]]:
    """The Pods run.sh generates at run time (smoke and request loop), produced by its own
    `client_pod` function with `kubectl` replaced by `cat`."""
    script = (E2E / "run.sh").read_text()
    function = re.search(r"^client_pod\(\) \{\n.*?^EOF\n\}\n", script, re.M | re.S)
    assert function, "client_pod() not found"
    calls = re.findall(r"^client_pod e2e-.*?[^\\]\n", script, re.M | re.S)
    assert len(calls) >= 3, calls
    program = "\n".join(
        [
            "set -euo pipefail",
            "k() { cat; }",
            "fullname=demo-fastapi-app APP_SECRET=fastapi-app-e2e IMAGE=localhost/fastapi-app:e2e",
            "service_url=http://demo-fastapi-app:8000",
            function.group(0),
            *(f"{call}echo ---" for call in calls),
        ]
    )
    result = subprocess.run(
        ["bash", "-c", program], capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return parse_manifests(result.stdout)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_client_pods_validate_and_are_restricted(kube_version: str) -> None:
    pods = client_pods_the_script_applies()
    assert {pod["metadata"]["name"] for pod in pods} == {"e2e-smoke", "e2e-loop"}
    for pod in pods:
        kubernetes_validate.validate(pod, kube_version, strict=True)
        assert_restricted(pod["spec"], pod["metadata"]["name"])
        # Admitted to port 8000 by the chart's NetworkPolicy.
        assert pod["metadata"]["labels"]["demo-fastapi-app-client"] == "true"
        (container,) = pod["spec"]["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    smoke = next(pod for pod in pods if pod["metadata"]["name"] == "e2e-smoke")
    args = smoke["spec"]["containers"][0]["args"]
    assert args[:3] == ["smoke", "--url", "http://demo-fastapi-app:8000"]
    assert "$(API_KEY)" in args, "the key comes from the Secret, not the command line"
    assert "X-Gateway-Secret: $(GATEWAY_SHARED_SECRET)" in args
    loop = next(pod for pod in pods if pod["metadata"]["name"] == "e2e-loop")
    assert loop["spec"]["containers"][0]["command"] == ["python", "/e2e/request_loop.py"]


def test_run_script_does_every_step_in_order() -> None:
    script = (E2E / "run.sh").read_text().split("set -euo pipefail", 1)[1]  # code, not the header
    steps = [
        r"kind create cluster",
        r"kind load (docker-image|image-archive)",
        r"pod-security\.kubernetes\.io/enforce=restricted",
        r"apply -f tests/e2e/postgres\.yaml",
        r"helm upgrade --install",
        r"SELECT version_num FROM alembic_version",
        r"helm test",
        r"client_pod e2e-smoke",
        r"client_pod e2e-loop",
        r"helm upgrade \"\$RELEASE\"",
        r"helm rollback",
        r"zero failed requests",
    ]
    positions = []
    for pattern in steps:
        match = re.search(pattern, script)
        assert match, pattern
        positions.append(match.start())
    assert positions == sorted(positions), "the steps run in this order"
    assert '--values "$VALUES"' in script
    assert "trap finish EXIT" in script, "the cluster is deleted and diagnostics printed"
