"""The kustomize base and overlays: they build with `kubectl kustomize`, validate against the
Kubernetes schemas, differ only where an environment must, and keep the chart's guarantees."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import (
    K8S_DIR,
    KUBE_VERSIONS,
    OVERLAYS,
    WORKLOAD_KINDS,
    kustomize_build,
    pod_labels,
    pod_spec,
)

pytestmark = pytest.mark.deploy

SELECTOR = {"app.kubernetes.io/name": "fastapi-app", "app.kubernetes.io/instance": "fastapi-app"}
NAMESPACES = {"staging": "fastapi-app-staging", "production": "fastapi-app"}


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def generated(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """A configMapGenerator output: <name>-<hash>."""
    matches = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].rsplit("-", 1)[0] == name
    ]
    assert len(matches) == 1, name
    return matches[0]


def test_base_builds_on_its_own() -> None:
    kinds = {o["kind"] for o in kustomize_build(K8S_DIR / "base")}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "Job",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceAccount",
        "Ingress",
    } <= kinds


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schema(
    overlay: str, kube_version: str, overlays: dict[str, list[dict[str, Any]]]
) -> None:
    errors = []
    for obj in overlays[overlay]:
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")
    assert not errors, "\n".join(errors)


def test_overlays_only_patch_the_base() -> None:
    # No copy-paste: an overlay consists of its kustomization and small per-environment inputs,
    # never a second copy of a manifest.
    for overlay in OVERLAYS:
        directory = K8S_DIR / "overlays" / overlay
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        assert kustomization["resources"] == ["../../base"]
        for path in directory.iterdir():
            if path.suffix in {".yaml", ".yml"} and path.name != "kustomization.yaml":
                pytest.fail(f"{path} duplicates manifests; patch the base instead")
        for generator in kustomization.get("configMapGenerator", []):
            assert generator["behavior"] == "merge", generator["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_lands_in_the_overlay_namespace(
    overlay: str, overlays: dict[str, list[dict[str, Any]]]
) -> None:
    for obj in overlays[overlay]:
        assert obj["metadata"]["namespace"] == NAMESPACES[overlay], obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/environment"] == overlay


def test_overlays_differ_where_environments_do(
    overlays: dict[str, list[dict[str, Any]]],
) -> None:
    staging, production = overlays["staging"], overlays["production"]

    def hpa(objects: list[dict[str, Any]]) -> tuple[int, int]:
        spec = one(objects, "HorizontalPodAutoscaler", "fastapi-app")["spec"]
        return spec["minReplicas"], spec["maxReplicas"]

    assert hpa(staging) == (1, 3)
    assert hpa(production) == (3, 20)
    assert generated(staging, "fastapi-app")["data"]["ENVIRONMENT"] == "staging"
    assert generated(production, "fastapi-app")["data"]["ENVIRONMENT"] == "production"
    staging_db = generated(staging, "fastapi-app-pgbouncer")["data"]["databases.ini"]
    production_db = generated(production, "fastapi-app-pgbouncer")["data"]["databases.ini"]
    assert "databases-staging" in staging_db
    assert "prod.internal" in production_db
    image = {
        name: pod_spec(one(objects, "Deployment", "fastapi-app"))["containers"][0]["image"]
        for name, objects in overlays.items()
    }
    assert image["staging"].startswith("ghcr.io/example/fastapi-app:sha-")
    assert image["production"] == "ghcr.io/example/fastapi-app:0.1.0"
    hosts = {
        name: one(objects, "Ingress", "fastapi-app")["spec"]["rules"][0]["host"]
        for name, objects in overlays.items()
    }
    assert hosts == {"staging": "api.staging.example.com", "production": "api.example.com"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_deployment(overlay: str, overlays: dict[str, list[dict[str, Any]]]) -> None:
    objects = overlays[overlay]
    deployment = one(objects, "Deployment", "fastapi-app")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["selector"]["matchLabels"] == SELECTOR
    assert one(objects, "Service", "fastapi-app")["spec"]["selector"] == SELECTOR
    spec = pod_spec(deployment)
    app = spec["containers"][0]
    assert app["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert app["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert app["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert {p["name"]: p["containerPort"] for p in app["ports"]} == {"http": 8000, "metrics": 9000}
    config = generated(objects, "fastapi-app")
    assert app["envFrom"] == [
        {"configMapRef": {"name": config["metadata"]["name"]}},
        {"secretRef": {"name": "fastapi-app"}},
    ]
    pre_stop = int(app["lifecycle"]["preStop"]["exec"]["command"][1])
    graceful = int(config["data"]["GUNICORN_GRACEFUL_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + graceful


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_restricted_security_context(
    overlay: str, overlays: dict[str, list[dict[str, Any]]]
) -> None:
    for obj in overlays[overlay]:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        spec = pod_spec(obj)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] >= 10000
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for item in spec["containers"]:
            security = item["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert item["resources"]["limits"]["memory"]
            assert item["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_job(overlay: str, overlays: dict[str, list[dict[str, Any]]]) -> None:
    objects = overlays[overlay]
    job = one(objects, "Job", "fastapi-app-migrate")
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreSync"
    spec = pod_spec(job)
    migrate = spec["containers"][0]
    assert migrate["args"] == ["migrate"]
    assert (
        migrate["image"]
        == pod_spec(one(objects, "Deployment", "fastapi-app"))["containers"][0]["image"]
    )
    # Filled by components/migration-env from the environment's ConfigMap.
    env = {e["name"]: e["value"] for e in migrate["env"]}
    config = generated(objects, "fastapi-app")["data"]
    assert env == {"ENVIRONMENT": config["ENVIRONMENT"], "LOG_LEVEL": config["LOG_LEVEL"]}
    # A PreSync hook runs before the ServiceAccount exists on the first sync.
    assert "serviceAccountName" not in spec
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not all(labels.get(k) == v for k, v in SELECTOR.items()), "would be an API endpoint"
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["activeDeadlineSeconds"] > 0
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay: str, overlays: dict[str, list[dict[str, Any]]]) -> None:
    objects = overlays[overlay]
    api = one(objects, "NetworkPolicy", "fastapi-app")["spec"]
    ingress = {
        rule["ports"][0]["port"]: rule["from"][0]["namespaceSelector"]["matchLabels"][
            "kubernetes.io/metadata.name"
        ]
        for rule in api["ingress"]
    }
    assert ingress == {8000: "ingress-nginx", 9000: "monitoring"}
    egress_ports = [sorted((p["protocol"], p["port"]) for p in r["ports"]) for r in api["egress"]]
    assert egress_ports == [[("TCP", 53), ("UDP", 53)], [("TCP", 6432)], [("TCP", 6379)]]
    selectors = [
        p["spec"]["podSelector"]["matchLabels"] for p in objects if p["kind"] == "NetworkPolicy"
    ]
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            labels = pod_labels(obj)
            covered = any(all(labels.get(k) == v for k, v in s.items()) for s in selectors)
            assert covered, obj["metadata"]["name"]


def test_production_narrows_database_egress(overlays: dict[str, list[dict[str, Any]]]) -> None:
    for name in (
        "fastapi-app-pgbouncer",
        "fastapi-app-migrate",
        "fastapi-app-backup",
        "fastapi-app-restore-drill",
    ):
        policy = one(overlays["production"], "NetworkPolicy", name)["spec"]
        database = policy["egress"][1]
        assert database["ports"] == [{"protocol": "TCP", "port": 5432}]
        assert database["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]


def test_pgbouncer_config_includes_the_environment_databases(
    overlays: dict[str, list[dict[str, Any]]],
) -> None:
    for objects in overlays.values():
        config = generated(objects, "fastapi-app-pgbouncer")
        assert "%include /etc/pgbouncer/databases.ini" in config["data"]["pgbouncer.ini"]
        assert "pool_mode = transaction" in config["data"]["pgbouncer.ini"]
        deployment = one(objects, "Deployment", "fastapi-app-pgbouncer")
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
