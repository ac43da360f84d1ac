"""The Helm chart and the kustomize manifests are parallel descriptions of one deployment: rendered
for the same settings, they must agree on what the image and the operator rely on (container
ports, probes, security contexts, the environment's variable names, the shape of resources).

The chart is rendered with the values that match k8s/base (PgBouncer in front, HPA, network
policies, the names kustomize uses); the backup CronJobs are compared with the production overlay,
the one that includes the backup component."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import K8S_DIR, Rendered, kustomize_build, pod_spec, render

pytestmark = pytest.mark.deploy

NAME = "fastapi-app"
# The chart's values for what k8s/base deploys.
AS_KUSTOMIZE: dict[str, Any] = {
    "fullnameOverride": NAME,
    "autoscaling": {"enabled": True},
    "ingress": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "pgbouncer": {
        "enabled": True,
        "postgres": {"host": "postgres"},
        "auth": {"existingSecret": f"{NAME}-pgbouncer"},
    },
    "backup": {"enabled": True},
}
# Workloads: (kind, chart name, kustomize name, built from).
WORKLOADS = [
    ("Deployment", NAME, NAME, "base"),
    ("Deployment", f"{NAME}-pgbouncer", f"{NAME}-pgbouncer", "base"),
    ("Job", f"{NAME}-migrations", f"{NAME}-migrate", "base"),
    ("CronJob", f"{NAME}-backup", f"{NAME}-backup", "production"),
    ("CronJob", f"{NAME}-restore-drill", f"{NAME}-restore-drill", "production"),
]
# What Kubernetes fills in for a probe field left out.
PROBE_DEFAULTS = {
    "initialDelaySeconds": 0,
    "periodSeconds": 10,
    "timeoutSeconds": 1,
    "successThreshold": 1,
    "failureThreshold": 3,
}


def chart_objects() -> list[Rendered]:
    return render(AS_KUSTOMIZE)


def kustomize_objects(source: str) -> list[dict[str, Any]]:
    path = K8S_DIR / "base" if source == "base" else K8S_DIR / "overlays" / source
    return kustomize_build(path)


def chart_object(kind: str, name: str) -> dict[str, Any]:
    matches = [o.obj for o in chart_objects() if o.kind == kind and o.name == name]
    assert len(matches) == 1, f"chart: {kind}/{name}"
    return matches[0]


def kustomize_object(source: str, kind: str, name: str) -> dict[str, Any]:
    matches = [
        o for o in kustomize_objects(source) if o["kind"] == kind and o["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"{source}: {kind}/{name}"
    return matches[0]


def generated_config_map(source: str, name: str) -> dict[str, Any]:
    matches = [
        o
        for o in kustomize_objects(source)
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].rsplit("-", 1)[0] == name
    ]
    assert len(matches) == 1, name
    return matches[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def probe(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    return {**PROBE_DEFAULTS, **spec}


def ports(spec: dict[str, Any]) -> list[tuple[Any, ...]]:
    return sorted(
        (p.get("name"), p["containerPort"], p.get("protocol", "TCP")) for p in spec.get("ports", [])
    )


def resources_shape(spec: dict[str, Any]) -> dict[str, list[str]]:
    return {kind: sorted(amounts) for kind, amounts in spec.get("resources", {}).items()}


def explicit_env(spec: dict[str, Any]) -> set[str]:
    return {variable["name"] for variable in spec.get("env", [])}


def pair(kind: str, chart_name: str, kustomize_name: str, source: str) -> tuple[Any, Any]:
    return chart_object(kind, chart_name), kustomize_object(source, kind, kustomize_name)


@pytest.mark.parametrize(("kind", "chart_name", "kustomize_name", "source"), WORKLOADS)
def test_security_contexts_agree(
    kind: str, chart_name: str, kustomize_name: str, source: str
) -> None:
    chart, kustomize = pair(kind, chart_name, kustomize_name, source)
    assert pod_spec(chart)["securityContext"] == pod_spec(kustomize)["securityContext"]
    assert container(chart)["securityContext"] == container(kustomize)["securityContext"]
    assert pod_spec(chart).get("automountServiceAccountToken") is False
    assert pod_spec(kustomize).get("automountServiceAccountToken") is False


@pytest.mark.parametrize(("kind", "chart_name", "kustomize_name", "source"), WORKLOADS)
def test_ports_probes_and_resources_shape_agree(
    kind: str, chart_name: str, kustomize_name: str, source: str
) -> None:
    chart, kustomize = pair(kind, chart_name, kustomize_name, source)
    ours, theirs = container(chart), container(kustomize)
    assert ports(ours) == ports(theirs)
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe(ours.get(name)) == probe(theirs.get(name)), name
    assert resources_shape(ours) == resources_shape(theirs)
    assert ours.get("args") == theirs.get("args")
    assert ours.get("lifecycle") == theirs.get("lifecycle")


def test_api_deployment_agrees_on_shutdown_and_writable_paths() -> None:
    chart, kustomize = pair("Deployment", NAME, NAME, "base")
    grace = "terminationGracePeriodSeconds"
    assert pod_spec(chart)[grace] == pod_spec(kustomize)[grace]
    mounts = [
        sorted(m["mountPath"] for m in container(o)["volumeMounts"]) for o in (chart, kustomize)
    ]
    assert mounts[0] == mounts[1]
    # The same defaults in both: app.env is generated from the chart's values (config contract).
    assert container(chart)["resources"] == container(kustomize)["resources"]


def test_api_environment_has_the_same_variables() -> None:
    chart = chart_object("ConfigMap", NAME)["data"]
    kustomize = generated_config_map("base", NAME)["data"]
    assert sorted(chart) == sorted(kustomize)
    # The variables the image's ports, probes and volumes depend on have the same values.
    for key in ("HOST", "PORT", "METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR", "DATABASE_POOL_MODE"):
        assert chart[key] == kustomize[key], key
    for workload in (
        chart_object("Deployment", NAME),
        kustomize_object("base", "Deployment", NAME),
    ):
        sources = [next(iter(source)) for source in container(workload)["envFrom"]]
        assert sources == ["configMapRef", "secretRef"]
        assert not explicit_env(container(workload))


def test_migration_job_gets_nothing_the_chart_would_not_give_it() -> None:
    chart, kustomize = pair("Job", f"{NAME}-migrations", f"{NAME}-migrate", "base")
    # kustomize's Job is a PreSync hook and cannot read the hash-named ConfigMap; it takes the two
    # variables migrate needs explicitly (components/migration-env) and both Secrets.
    config = set(chart_object("ConfigMap", f"{NAME}-migrations")["data"])
    assert explicit_env(container(kustomize)) <= config
    assert {"ENVIRONMENT", "LOG_LEVEL"} <= config
    for field in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert chart["spec"][field] == kustomize["spec"][field], field


@pytest.mark.parametrize("job", ["backup", "restore-drill"])
def test_backup_jobs_have_the_same_variables(job: str) -> None:
    chart, kustomize = pair("CronJob", f"{NAME}-{job}", f"{NAME}-{job}", "production")
    backup_env = set(generated_config_map("production", f"{NAME}-backup")["data"])
    theirs = explicit_env(container(kustomize)) | backup_env
    assert explicit_env(container(chart)) <= theirs
    assert chart["spec"]["concurrencyPolicy"] == kustomize["spec"]["concurrencyPolicy"]


def test_services_expose_the_same_ports() -> None:
    for name in (NAME, f"{NAME}-pgbouncer"):
        chart = chart_object("Service", name)["spec"]["ports"]
        kustomize = kustomize_object("base", "Service", name)["spec"]["ports"]
        assert sorted((p["name"], p["port"], str(p["targetPort"])) for p in chart) == sorted(
            (p["name"], p["port"], str(p["targetPort"])) for p in kustomize
        )
