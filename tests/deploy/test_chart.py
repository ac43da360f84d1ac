"""The Helm chart, rendered with Helm v4's own library: lint, schema, Kubernetes schemas, and the
properties an operator relies on (probes, security, hooks, scaling, network isolation)."""

from __future__ import annotations

import copy
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from conftest import (
    CHART_DIR,
    CRD_KINDS,
    FULLNAME,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    WORKLOAD_KINDS,
    Rendered,
    find,
    find_all,
    pod_labels,
    pod_spec,
    render,
    render_notes,
    value_sets,
)

pytestmark = pytest.mark.deploy

VALUE_SETS = list(value_sets())
HOOK_POLICY = "before-hook-creation,hook-succeeded"

# A complete, valid set of values that switches on every optional object, for the assertions that
# need them all at once.
EVERYTHING: dict[str, Any] = {
    "autoscaling": {"enabled": True},
    "ingress": {
        "enabled": True,
        "tls": [{"secretName": "api-tls", "hosts": ["api.example.com"]}],
    },
    "networkPolicy": {"enabled": True},
    "pgbouncer": {
        "enabled": True,
        "postgres": {"host": "postgres.db.svc"},
        "auth": {"existingSecret": "pgbouncer-userlist"},
    },
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    },
    "tests": {"checkMetrics": True},
    "backup": {"enabled": True, "beforeMigrate": True},
    "databaseTLS": {"enabled": True, "secretName": "postgres-ca", "clientCertificate": True},
}


# Credentials inline in values (a throwaway environment): the chart renders the Secrets itself,
# PgBouncer's userlist and the schema owner's Secret included.
INLINE_CREDENTIALS: dict[str, Any] = {
    "secrets": {
        "DATABASE_URL": "postgresql://app:pw@demo-fastapi-app-pgbouncer:6432/app",
        "DATABASE_MIGRATION_URL": "postgresql://owner:pw@postgres:5432/app",
    },
    "pgbouncer": {
        "enabled": True,
        "postgres": {"host": "postgres"},
        "auth": {"userlist": '"app" "SCRAM-SHA-256$4096:c2FsdA==$a:b"'},
    },
    "backup": {"enabled": True},
}


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def container(obj: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return dict(pod_spec(obj)["containers"][index])


def api_deployment(objects: list[Rendered]) -> dict[str, Any]:
    return find(objects, "Deployment", FULLNAME).obj


# --- helm lint / render ---------------------------------------------------------------------------


def test_helm_library_version() -> None:
    # The tests exercise Helm v4 (the SDK the deploy workflow's helm CLI matches).
    assert helm_python.helm_sdk_version().startswith("v4.")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_is_clean(value_set: str) -> None:
    report = helm_python.lint(
        str(CHART_DIR), value_sets()[value_set], strict=True, namespace=NAMESPACE
    )
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"], report["errors"]
    # Only informational messages (e.g. "icon is recommended") may remain.
    assert not findings, findings


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_value_set_renders(value_set: str, renders: dict[str, list[Rendered]]) -> None:
    objects = renders[value_set]
    kinds = {o.kind for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "Job", "Pod"} <= kinds
    for obj in objects:
        if obj.kind not in {"Namespace"}:
            assert obj.obj["metadata"]["namespace"], f"{obj.kind}/{obj.name} has no namespace"


def test_every_template_renders_something_somewhere(renders: dict[str, list[Rendered]]) -> None:
    rendered = {o.template for objects in renders.values() for o in objects}
    rendered |= {o.template for o in render(EVERYTHING)}
    rendered |= {o.template for o in render(INLINE_CREDENTIALS)}
    templates = {
        f"fastapi-app/{path.relative_to(CHART_DIR)}"
        for path in (CHART_DIR / "templates").rglob("*.yaml")
    }
    assert templates - rendered == set(), "templates no value set exercises"


def test_notes_render_for_every_value_set() -> None:
    for values in value_sets().values():
        notes = render_notes(values)
        assert f"{FULLNAME}-migrations" in notes
    assert "WARNING" in render_notes({})
    assert "WARNING" not in render_notes({"existingSecret": "app"})


# --- Kubernetes schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_objects_validate_against_kubernetes_schema(
    value_set: str, kube_version: str, renders: dict[str, list[Rendered]]
) -> None:
    validate_objects(renders[value_set], kube_version)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_everything_enabled_validates_against_kubernetes_schema(kube_version: str) -> None:
    validate_objects(render(EVERYTHING), kube_version)


def validate_objects(objects: list[Rendered], kube_version: str) -> None:
    errors = []
    for obj in objects:
        if (obj.obj["apiVersion"], obj.kind) in CRD_KINDS:
            check_custom_resource(obj.obj)
            continue
        try:
            # strict: unknown fields (typos such as "readinesProbe") are errors, not ignored.
            kubernetes_validate.validate(obj.obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            errors.append(f"{obj.kind}/{obj.name} ({obj.template}): {path}: {error.message}")
    assert not errors, "\n".join(errors)


def check_custom_resource(obj: dict[str, Any]) -> None:
    """The fields the CRDs' own schemas require (kubernetes-validate has none for them)."""
    kind, spec = obj["kind"], obj["spec"]
    assert obj["metadata"]["name"]
    assert obj["metadata"]["namespace"]
    if kind == "ServiceMonitor":
        assert spec["selector"]["matchLabels"]
        assert spec["endpoints"], "ServiceMonitor without endpoints"
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] == "metrics"
            assert endpoint["path"] == "/metrics"
    elif kind == "PrometheusRule":
        assert spec["groups"]
        for group in spec["groups"]:
            assert group["name"]
            assert group["rules"]
            for rule in group["rules"]:
                assert rule["expr"]
                assert ("alert" in rule) != ("record" in rule)
    elif kind == "ExternalSecret":
        assert spec["secretStoreRef"]["name"]
        assert spec["secretStoreRef"]["kind"] in {"SecretStore", "ClusterSecretStore"}
        assert spec["target"]["name"]
        assert spec.get("data") or spec.get("dataFrom")
        for item in spec.get("data", []):
            assert item["secretKey"]
            assert item["remoteRef"]["key"]
    else:  # pragma: no cover - CRD_KINDS and this function must agree
        raise AssertionError(f"no check for {kind}")


# --- values.schema.json ---------------------------------------------------------------------------


def schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        paths.add(path)
        paths |= schema_paths(sub, path)
    return paths


def value_paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        paths.add(path)
        if isinstance(value, dict) and value:
            paths |= value_paths(value, path)
    return paths


# Maps of Kubernetes objects or free-form labels, typed as such rather than key by key.
FREE_FORM = ("affinity", "nodeSelector", "podSelector", "extraConfig", "behavior", "labels")


def test_schema_covers_every_value(chart: Any) -> None:
    declared = schema_paths(chart.schema)
    undeclared = {
        path
        for path in value_paths(chart.values)
        if path not in declared and not any(part in FREE_FORM for part in path.split(".")[:-1])
    }
    assert not undeclared, sorted(undeclared)


def test_schema_closes_every_chart_owned_object(chart: Any) -> None:
    # additionalProperties: false wherever the chart defines the keys, so typos fail loudly.
    open_objects = []

    def walk(schema: dict[str, Any], path: str) -> None:
        # remoteRef belongs to the External Secrets Operator, which grows fields over time.
        closed = schema.get("additionalProperties") is False or path.endswith(".remoteRef")
        if "properties" in schema and not closed:
            open_objects.append(path)
        for key, sub in schema.get("properties", {}).items():
            walk(sub, f"{path}.{key}")

    walk(chart.schema, "")
    assert not open_objects, open_objects


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_schema_accepts_every_value_set(chart: Any, value_set: str) -> None:
    chart.validate_schema(value_sets()[value_set])


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        pytest.param({"replicaCount": -1}, "/replicaCount", id="negative-replicas"),
        pytest.param({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", id="pull-policy"),
        pytest.param({"image": {"tag": "latest"}}, "/image/tag", id="latest-tag"),
        pytest.param({"image": {"digest": "sha256:abc"}}, "/image/digest", id="bad-digest"),
        pytest.param({"replicas": 3}, "replicas", id="unknown-top-level-key"),
        pytest.param({"config": {"LOGLEVEL": "INFO"}}, "LOGLEVEL", id="unknown-config-key"),
        pytest.param({"config": {"PORT": 8080}}, "PORT", id="chart-owned-config-key"),
        pytest.param({"config": {"ENVIRONMENT": "prod"}}, "ENVIRONMENT", id="environment-enum"),
        pytest.param({"config": {"WEB_CONCURRENCY": 0}}, "WEB_CONCURRENCY", id="zero-workers"),
        pytest.param({"config": {"CORS_ORIGINS": "*"}}, "CORS_ORIGINS", id="cors-wildcard"),
        pytest.param({"secrets": {"DATABASE_URL": "mysql://x/y"}}, "DATABASE_URL", id="db-url"),
        pytest.param(
            {"secrets": {"GATEWAY_SHARED_SECRET": "short"}}, "GATEWAY_SHARED_SECRET", id="short"
        ),
        pytest.param({"secrets": {"API_TOKEN": "x"}}, "API_TOKEN", id="unknown-secret-key"),
        pytest.param({"podSecurityContext": {"runAsUser": 1000}}, "runAsUser", id="low-uid-pod"),
        pytest.param({"securityContext": {"runAsUser": 0}}, "runAsUser", id="root-uid"),
        pytest.param(
            {"securityContext": {"runAsNonRoot": False}}, "runAsNonRoot", id="run-as-root"
        ),
        pytest.param(
            {"securityContext": {"allowPrivilegeEscalation": True}},
            "allowPrivilegeEscalation",
            id="privilege-escalation",
        ),
        pytest.param({"securityContext": {"privileged": True}}, "privileged", id="privileged"),
        pytest.param(
            {"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
            "capabilities",
            id="capabilities-not-dropped",
        ),
        pytest.param(
            {"securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}},
            "add",
            id="capabilities-added",
        ),
        pytest.param(
            {"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
            "seccompProfile",
            id="unconfined-seccomp",
        ),
        pytest.param(
            {"resources": {"requests": {"memory": None}}}, "memory", id="no-memory-request"
        ),
        pytest.param({"resources": {"limits": {"memory": None}}}, "memory", id="no-memory-limit"),
        pytest.param({"service": {"port": 70000}}, "/service/port", id="port-range"),
        pytest.param({"service": {"type": "ExternalName"}}, "/service/type", id="service-type"),
        pytest.param(
            {"ingress": {"hosts": [{"host": "a.example.com", "paths": [{"path": "/"}]}]}},
            "pathType",
            id="ingress-path-type-required",
        ),
        pytest.param({"autoscaling": {"minReplicas": 0}}, "minReplicas", id="hpa-min-zero"),
        pytest.param(
            {"autoscaling": {"targetCPUUtilizationPercentage": 150}},
            "targetCPUUtilizationPercentage",
            id="hpa-cpu-over-100",
        ),
        pytest.param(
            {"podDisruptionBudget": {"maxUnavailable": "fifty"}},
            "maxUnavailable",
            id="pdb-not-int-or-percent",
        ),
        pytest.param(
            {"livenessProbe": {"successThreshold": 2}}, "successThreshold", id="liveness-success"
        ),
        pytest.param({"lifecycle": {"preStopSleepSeconds": -1}}, "preStop", id="negative-sleep"),
        pytest.param({"migrations": {"backoffLimit": -1}}, "backoffLimit", id="backoff"),
        pytest.param(
            {"migrations": {"activeDeadlineSeconds": 0}}, "activeDeadlineSeconds", id="deadline"
        ),
        pytest.param({"pgbouncer": {"poolMode": "statement"}}, "poolMode", id="pool-mode"),
        pytest.param(
            {"networkPolicy": {"ingressController": {"namespace": "Ingress_NGINX"}}},
            "namespace",
            id="namespace-name",
        ),
        pytest.param(
            {"networkPolicy": {"egress": {"database": {"ports": []}}}},
            "ports",
            id="no-database-ports",
        ),
        pytest.param(
            {"externalSecret": {"secretStoreRef": {"name": "v", "kind": "Vault"}}},
            "kind",
            id="secret-store-kind",
        ),
        pytest.param(
            {"metrics": {"prometheusRule": {"rules": {"errorRatio": {"threshold": 5}}}}},
            "threshold",
            id="ratio-above-one",
        ),
        pytest.param(
            {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "interval", id="duration"
        ),
        pytest.param({"tests": {"apiKeySecret": {"key": ""}}}, "key", id="empty-secret-key"),
    ],
)
def test_schema_rejects(chart: Any, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as raised:
        chart.validate_schema(values)
    assert complaint in str(raised.value)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        pytest.param(
            {"terminationGracePeriodSeconds": 30},
            "terminationGracePeriodSeconds (30) must be greater than",
            id="grace-period-too-short",
        ),
        pytest.param(
            {"config": {"GUNICORN_GRACEFUL_TIMEOUT": 35}},
            "GUNICORN_GRACEFUL_TIMEOUT (35)",
            id="graceful-timeout-too-long",
        ),
        pytest.param(
            {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
            "minReplicas (5) must not exceed",
            id="hpa-min-above-max",
        ),
        pytest.param(
            {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}},
            "not both",
            id="pdb-both",
        ),
        pytest.param(
            {"existingSecret": "a", "externalSecret": {"enabled": True}},
            "alternatives",
            id="two-secret-sources",
        ),
        pytest.param(
            {"existingSecret": "a", "secrets": {"DATABASE_URL": "postgresql://u:p@h/db"}},
            "secrets.DATABASE_URL is set but ignored",
            id="inline-secret-ignored",
        ),
        pytest.param(
            {"externalSecret": {"enabled": True, "secretStoreRef": {"name": "vault"}}},
            "set data or dataFrom",
            id="external-secret-without-data",
        ),
        pytest.param(
            {"pgbouncer": {"enabled": True, "auth": {"existingSecret": "u"}}},
            "pgbouncer.postgres.host is required",
            id="pgbouncer-without-host",
        ),
        pytest.param(
            {"pgbouncer": {"enabled": True, "postgres": {"host": "db"}}},
            "pgbouncer.auth.existingSecret",
            id="pgbouncer-without-userlist",
        ),
    ],
)
def test_render_refuses_inconsistent_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmRenderError) as raised:
        render(values)
    assert complaint in str(raised.value)


def test_inline_credentials_render_their_secrets() -> None:
    import base64

    objects = render(INLINE_CREDENTIALS)
    owner = find(objects, "Secret", f"{FULLNAME}-database-owner").obj["data"]
    assert set(owner) == {"DATABASE_MIGRATION_URL"}
    assert (
        base64.b64decode(owner["DATABASE_MIGRATION_URL"]).decode().startswith("postgresql://owner")
    )
    app = find(objects, "Secret", FULLNAME).obj["data"]
    assert "DATABASE_MIGRATION_URL" not in app  # least privilege: the API never holds it
    userlist = find(objects, "Secret", f"{FULLNAME}-pgbouncer").obj["data"]["userlist.txt"]
    assert base64.b64decode(userlist).decode().startswith('"app" "SCRAM-SHA-256$')
    validate_objects(objects, KUBE_VERSIONS[-1])


def test_render_reports_every_inconsistency_at_once() -> None:
    # Six independent mistakes: one render names them all, so nobody fixes values one failed
    # `helm install` at a time.
    values = {
        "terminationGracePeriodSeconds": 30,
        "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2},
        "podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1},
        "existingSecret": "app",
        "secrets": {"DATABASE_URL": "postgresql://u:p@h/db", "REDIS_URL": "redis://r:6379"},
        "databaseTLS": {"enabled": True},
    }
    with pytest.raises(helm_python.HelmRenderError) as raised:
        render(values)
    message = str(raised.value)
    for complaint in (
        "terminationGracePeriodSeconds (30) must be greater than",
        "minReplicas (5) must not exceed",
        "not both",
        "secrets.DATABASE_URL is set but ignored",
        "secrets.REDIS_URL is set but ignored",
        "databaseTLS.secretName is required",
    ):
        assert complaint in message
    assert "6 problem(s) with the values" in message


@pytest.mark.parametrize("value_set", ["default", "everything"])
def test_one_kind_per_template_file(value_set: str, renders: dict[str, list[Rendered]]) -> None:
    objects = render(EVERYTHING) if value_set == "everything" else renders[value_set]
    kinds: dict[str, set[str]] = {}
    for obj in objects:
        kinds.setdefault(obj.template, set()).add(obj.kind)
    mixed = {template: sorted(k) for template, k in kinds.items() if len(k) > 1}
    assert not mixed, f"templates rendering several kinds (split them): {mixed}"


# --- labels and selectors -------------------------------------------------------------------------

SELECTOR = {"app.kubernetes.io/name": "fastapi-app", "app.kubernetes.io/instance": RELEASE}


def test_standard_labels_on_every_object() -> None:
    for obj in render(EVERYTHING):
        labels = obj.obj["metadata"]["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/component",
            "helm.sh/chart",
        ):
            assert labels.get(key), f"{obj.kind}/{obj.name} lacks {key}"


def test_selectors_are_name_and_instance_only() -> None:
    objects = render(EVERYTHING)
    deployment = api_deployment(objects)
    assert deployment["spec"]["selector"]["matchLabels"] == SELECTOR
    assert find(objects, "Service", FULLNAME).obj["spec"]["selector"] == SELECTOR
    assert find(objects, "PodDisruptionBudget", FULLNAME).obj["spec"]["selector"] == {
        "matchLabels": SELECTOR
    }
    assert find(objects, "NetworkPolicy", FULLNAME).obj["spec"]["podSelector"] == {
        "matchLabels": SELECTOR
    }
    monitor = find(objects, "ServiceMonitor").obj
    assert monitor["spec"]["selector"] == {"matchLabels": SELECTOR}


def test_only_api_pods_match_the_api_service_selector() -> None:
    # A migration, test or PgBouncer pod matching it would become an endpoint of the API Service.
    for obj in render(EVERYTHING):
        if obj.kind not in WORKLOAD_KINDS:
            continue
        labels = pod_labels(obj.obj)
        matches = all(labels.get(k) == v for k, v in SELECTOR.items())
        assert matches == (obj.name == FULLNAME and obj.kind == "Deployment"), obj.name


def test_service_monitor_selects_only_the_api_service() -> None:
    objects = render(EVERYTHING)
    selector = find(objects, "ServiceMonitor").obj["spec"]["selector"]["matchLabels"]
    services = [
        s.name
        for s in find_all(objects, "Service")
        if all(s.obj["metadata"]["labels"].get(k) == v for k, v in selector.items())
    ]
    assert services == [FULLNAME]


# --- the API Deployment ---------------------------------------------------------------------------


def test_probes_use_the_contract_endpoints() -> None:
    app = container(api_deployment(render()))
    assert app["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert app["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert app["startupProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    ports = {p["name"]: p["containerPort"] for p in app["ports"]}
    assert ports == {"http": 8000, "metrics": 9000}
    # A slow start gets failureThreshold x periodSeconds before liveness takes over.
    startup = app["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 30


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_restricted_security_context(value_set: str, renders: dict[str, list[Rendered]]) -> None:
    for obj in renders[value_set]:
        if obj.kind not in WORKLOAD_KINDS:
            continue
        spec = pod_spec(obj.obj)
        assert spec["automountServiceAccountToken"] is False, obj.name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] >= 10000
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        for item in spec["containers"]:
            security = item["securityContext"]
            assert security["runAsNonRoot"] is True
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["privileged"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert "add" not in security["capabilities"]
            assert security["seccompProfile"]["type"] == "RuntimeDefault"
            assert item["resources"]["requests"]["cpu"]
            assert item["resources"]["requests"]["memory"]
            assert item["resources"]["limits"]["memory"]


def test_api_runs_as_the_image_user_with_writable_tmp_and_metrics_dir() -> None:
    deployment = api_deployment(render())
    spec = pod_spec(deployment)
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["runAsGroup"] == 10001
    assert spec["securityContext"]["fsGroup"] == 10001
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    assert mounts == {"/tmp": "tmp", "/tmp/prometheus-multiproc": "prometheus-multiproc"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["tmp"]["emptyDir"]["sizeLimit"]
    assert volumes["prometheus-multiproc"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Mi"}
    config = find(render(), "ConfigMap", FULLNAME).obj["data"]
    assert config["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/prometheus-multiproc"
    assert config["PORT"] == "8000"
    assert config["METRICS_PORT"] == "9000"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_grace_period_covers_prestop_and_graceful_timeout(
    value_set: str, renders: dict[str, list[Rendered]]
) -> None:
    objects = renders[value_set]
    deployment = api_deployment(objects)
    spec = pod_spec(deployment)
    pre_stop = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    graceful = int(find(objects, "ConfigMap", FULLNAME).obj["data"]["GUNICORN_GRACEFUL_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > int(pre_stop[1]) + graceful


def test_env_from_configmap_and_secret() -> None:
    app = container(api_deployment(render()))
    assert app["envFrom"] == [
        {"configMapRef": {"name": FULLNAME}},
        {"secretRef": {"name": FULLNAME}},
    ]
    existing = container(api_deployment(render({"existingSecret": "app-credentials"})))
    assert existing["envFrom"][1] == {"secretRef": {"name": "app-credentials"}}
    kinds = {o.kind for o in render({"existingSecret": "app-credentials"}) if o.name == FULLNAME}
    assert "Secret" not in kinds


def test_config_values_render_as_plain_strings() -> None:
    # YAML numbers reach templates as float64: 1048576 must not become "1.048576e+06".
    data = find(
        render({"config": {"MAX_REQUEST_BODY_BYTES": 1048576, "SENTRY_TRACES_SAMPLE_RATE": 0.25}}),
        "ConfigMap",
        FULLNAME,
    ).obj["data"]
    assert data["MAX_REQUEST_BODY_BYTES"] == "1048576"
    assert data["SENTRY_TRACES_SAMPLE_RATE"] == "0.25"
    assert data["RATE_LIMIT_ENABLED"] == "true"
    assert all(isinstance(v, str) for v in data.values())


def test_replicas_omitted_when_the_hpa_owns_them() -> None:
    assert api_deployment(render({"replicaCount": 3}))["spec"]["replicas"] == 3
    objects = render({"autoscaling": {"enabled": True}})
    assert "replicas" not in api_deployment(objects)["spec"]
    hpa = find(objects, "HorizontalPodAutoscaler").obj
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    resources = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"]}
    assert resources["cpu"] == {"type": "Utilization", "averageUtilization": 70}
    assert resources["memory"] == {"type": "Utilization", "averageUtilization": 80}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def test_checksum_config_changes_with_config() -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        return api_deployment(render(values))["spec"]["template"]["metadata"]["annotations"]

    base = annotations({})
    assert annotations({})["checksum/config"] == base["checksum/config"]  # deterministic
    changed = annotations({"config": {"LOG_LEVEL": "DEBUG"}})
    assert changed["checksum/config"] != base["checksum/config"]
    assert changed["checksum/secret"] == base["checksum/secret"]
    rotated = annotations({"secrets": {"DATABASE_URL": "postgresql://u:p@db/app"}})
    assert rotated["checksum/secret"] != base["checksum/secret"]
    assert rotated["checksum/config"] == base["checksum/config"]


def test_topology_spread_across_nodes_and_zones() -> None:
    constraints = pod_spec(api_deployment(render()))["topologySpreadConstraints"]
    by_key = {c["topologyKey"]: c for c in constraints}
    assert by_key["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert by_key["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    for constraint in constraints:
        assert constraint["labelSelector"] == {"matchLabels": SELECTOR}
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]


def test_image_reference() -> None:
    app = container(api_deployment(render()))
    assert app["image"] == "ghcr.io/example/fastapi-app:0.1.0"  # appVersion by default
    digest = "sha256:" + "a" * 64
    pinned = container(api_deployment(render({"image": {"digest": digest}})))
    assert pinned["image"] == f"ghcr.io/example/fastapi-app@{digest}"


def test_service_and_ingress_expose_only_the_api_port() -> None:
    objects = render(EVERYTHING)
    service = find(objects, "Service", FULLNAME).obj
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (8000, "http"),
        "metrics": (9000, "metrics"),
    }
    ingress = find(objects, "Ingress").obj
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["api.example.com"], "secretName": "api-tls"}]
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["pathType"] == "Prefix"
            assert path["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}}


def test_pod_disruption_budget() -> None:
    assert find(render(), "PodDisruptionBudget").obj["spec"]["maxUnavailable"] == 1
    spec = find(render({"podDisruptionBudget": {"minAvailable": "50%"}}), "PodDisruptionBudget")
    assert spec.obj["spec"]["minAvailable"] == "50%"
    assert "maxUnavailable" not in spec.obj["spec"]


# --- migrations hook ------------------------------------------------------------------------------


def hooks(objects: list[Rendered]) -> dict[tuple[str, str], dict[str, str]]:
    return {(o.kind, o.name): o.annotations for o in objects if "helm.sh/hook" in o.annotations}


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook() -> None:
    objects = render()
    job = find(objects, "Job")
    assert job.annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job.annotations["helm.sh/hook-delete-policy"] == HOOK_POLICY
    spec = job.obj["spec"]
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] == 600
    assert spec["ttlSecondsAfterFinished"] > 0
    migrate = container(job.obj)
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == container(api_deployment(objects))["image"]
    assert migrate["securityContext"] == container(api_deployment(objects))["securityContext"]
    assert pod_spec(job.obj)["restartPolicy"] == "Never"


@pytest.mark.parametrize(
    ("values", "secret_kind"),
    [
        pytest.param({}, "Secret", id="inline-secrets"),
        pytest.param(
            {
                "externalSecret": {
                    "enabled": True,
                    "secretStoreRef": {"name": "vault"},
                    "dataFrom": [{"extract": {"key": "apps/api"}}],
                }
            },
            "ExternalSecret",
            id="external-secret",
        ),
        pytest.param({"networkPolicy": {"enabled": True}}, "Secret", id="with-network-policy"),
    ],
)
def test_migration_job_has_its_own_earlier_hook_config(
    values: dict[str, Any], secret_kind: str
) -> None:
    # First install: hooks run before the release's ConfigMap/Secret/ServiceAccount exist.
    objects = render(values)
    job = find(objects, "Job")
    spec = pod_spec(job.obj)
    job_weight = int(job.annotations["helm.sh/hook-weight"])
    needed = {
        ("ConfigMap", spec["containers"][0]["envFrom"][0]["configMapRef"]["name"]),
        (secret_kind, spec["containers"][0]["envFrom"][1]["secretRef"]["name"]),
        ("ServiceAccount", spec["serviceAccountName"]),
    }
    if values.get("networkPolicy", {}).get("enabled"):
        needed.add(("NetworkPolicy", f"{FULLNAME}-migrations"))
    hook_objects = hooks(objects)
    for kind, name in needed:
        assert name == f"{FULLNAME}-migrations"
        annotations = hook_objects[(kind, name)]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(annotations["helm.sh/hook-weight"]) < job_weight
        assert annotations["helm.sh/hook-delete-policy"] == HOOK_POLICY
    # The hook ConfigMap is the release ConfigMap's twin.
    assert (
        find(objects, "ConfigMap", f"{FULLNAME}-migrations").obj["data"]
        == find(objects, "ConfigMap", FULLNAME).obj["data"]
    )


def test_migration_job_reads_an_existing_secret_directly() -> None:
    objects = render({"existingSecret": "app-credentials"})
    job = find(objects, "Job")
    assert container(job.obj)["envFrom"][1] == {"secretRef": {"name": "app-credentials"}}
    assert ("Secret", f"{FULLNAME}-migrations") not in hooks(objects)


def test_nothing_but_the_migration_job_and_tests_are_hooks() -> None:
    for (kind, name), hook in hooks(render(EVERYTHING)).items():
        if hook["helm.sh/hook"] == "test":
            assert name.startswith(f"{FULLNAME}-"), name
            continue
        allowed = {f"{FULLNAME}-migrations", f"{FULLNAME}-backup-pre-upgrade"}
        assert name in allowed, f"{kind}/{name} is an unexpected hook"


def test_helm_test_pod_runs_the_smoke_command() -> None:
    objects = render(EVERYTHING)
    pod = find(objects, "Pod")
    assert pod.annotations["helm.sh/hook"] == "test"
    smoke = container(pod.obj)
    args = smoke["args"]
    url = f"http://{FULLNAME}:8000"
    assert args[:5] == ["smoke", "--url", url, "--api-key", "$(SMOKE_API_KEY)"]
    assert "--metrics-url" in args
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in smoke["env"]}
    assert env["SMOKE_API_KEY"] == {"name": f"{FULLNAME}-smoke", "key": "api-key"}
    assert env["GATEWAY_SHARED_SECRET"]["optional"] is True
    custom = render({"tests": {"apiKeySecret": {"name": "smoke-key", "key": "token"}}})
    custom_env = container(find(custom, "Pod").obj)["env"][0]["valueFrom"]["secretKeyRef"]
    assert custom_env == {"name": "smoke-key", "key": "token"}
    # The test pod is an admitted client of port 8000.
    assert pod.obj["metadata"]["labels"][f"{FULLNAME}-client"] == "true"


# --- network policies -----------------------------------------------------------------------------


def rule_ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p["protocol"], p["port"]) for p in rule.get("ports", [])}


def test_api_network_policy() -> None:
    policy = find(render(EVERYTHING), "NetworkPolicy", FULLNAME).obj["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    ingress = {frozenset(rule_ports(r)): r["from"] for r in policy["ingress"]}
    assert set(ingress) == {frozenset({("TCP", 8000)}), frozenset({("TCP", 9000)})}
    from_8000 = ingress[frozenset({("TCP", 8000)})]
    assert from_8000[0] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    }
    assert from_8000[1] == {"podSelector": {"matchLabels": {f"{FULLNAME}-client": "true"}}}
    assert ingress[frozenset({("TCP", 9000)})] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress_ports = [rule_ports(r) for r in policy["egress"]]
    assert egress_ports == [
        {("UDP", 53), ("TCP", 53)},  # DNS
        {("TCP", 6432)},  # the chart's PgBouncer
        {("TCP", 6432), ("TCP", 5432)},  # database ports
        {("TCP", 6379)},  # Redis
    ]
    dns = policy["egress"][0]["to"][0]
    assert dns["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}


def test_network_policy_narrowing_in_production_values(
    renders: dict[str, list[Rendered]],
) -> None:
    policy = find(renders["production-values"], "NetworkPolicy", FULLNAME).obj["spec"]
    from_8000 = policy["ingress"][0]["from"][0]
    assert from_8000["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}
    database = next(r for r in policy["egress"] if rule_ports(r) == {("TCP", 5432)})
    assert database["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]


def test_every_workload_is_covered_by_a_network_policy() -> None:
    objects = render(EVERYTHING)
    policies = find_all(objects, "NetworkPolicy")
    selectors = [p.obj["spec"]["podSelector"]["matchLabels"] for p in policies]
    for obj in objects:
        if obj.kind in WORKLOAD_KINDS:
            labels = pod_labels(obj.obj)
            assert any(all(labels.get(k) == v for k, v in s.items()) for s in selectors), obj.name


def test_pgbouncer_is_reachable_only_from_the_api() -> None:
    objects = render(EVERYTHING)
    policy = find(objects, "NetworkPolicy", f"{FULLNAME}-pgbouncer").obj["spec"]
    assert policy["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": SELECTOR}}],
            "ports": [{"protocol": "TCP", "port": 6432}],
        }
    ]
    egress = [rule_ports(r) for r in policy["egress"]]
    assert egress == [{("UDP", 53), ("TCP", 53)}, {("TCP", 5432)}]


# --- PgBouncer ------------------------------------------------------------------------------------


def test_pgbouncer_deployment(renders: dict[str, list[Rendered]]) -> None:
    objects = renders["pgbouncer-values"]
    name = f"{FULLNAME}-pgbouncer"
    ini = find(objects, "ConfigMap", name).obj["data"]["pgbouncer.ini"]
    assert "pool_mode = transaction" in ini
    assert "* = host=postgres.databases.svc.cluster.local port=5432" in ini
    # The replica under its own name, before the wildcard (PgBouncer takes the first match).
    replica_entry = "app_replica = host=postgres-replica.databases.svc.cluster.local port=5432"
    assert f"{replica_entry} dbname=app" in ini
    assert ini.index(replica_entry) < ini.index("* = host=")
    assert "server_idle_timeout = 600" in ini
    deployment = find(objects, "Deployment", name).obj
    assert container(deployment)["command"] == ["pgbouncer", "/etc/pgbouncer/pgbouncer.ini"]
    # The image values.yaml pins (Renovate bumps it there; the chart must use it as written).
    pinned = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["pgbouncer"]["image"]
    assert container(deployment)["image"] == f"{pinned['repository']}:{pinned['tag']}"
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "fastapi-app-pgbouncer-userlist"
    service = find(objects, "Service", name).obj
    assert service["spec"]["ports"][0]["port"] == 6432
    # The API switches to PgBouncer-safe settings; migrations still connect directly. The
    # shipped PgBouncer (1.25) tracks prepared statements, so the app keeps its caches.
    assert "max_prepared_statements = 200" in ini
    config = find(objects, "ConfigMap", FULLNAME).obj["data"]
    assert config["DATABASE_POOL_MODE"] == "pgbouncer-prepared"
    assert config["DATABASE_READ_MAX_LAG_SECONDS"] == "2"
    external = find(objects, "ExternalSecret", f"{FULLNAME}-migrations").obj["spec"]
    keys = {item["secretKey"] for item in external["data"]}
    assert "DATABASE_MIGRATION_URL" in keys


def test_pgbouncer_without_prepared_statements_turns_the_app_caches_off() -> None:
    values = merged(INLINE_CREDENTIALS, {"pgbouncer": {"maxPreparedStatements": 0}})
    objects = render(values)
    ini = find(objects, "ConfigMap", f"{FULLNAME}-pgbouncer").obj["data"]["pgbouncer.ini"]
    assert "max_prepared_statements = 0" in ini
    config = find(objects, "ConfigMap", FULLNAME).obj["data"]
    assert config["DATABASE_POOL_MODE"] == "pgbouncer-transaction"
    # A mode set by hand wins over the chart's choice.
    pinned = merged(values, {"config": {"DATABASE_POOL_MODE": "pgbouncer-prepared"}})
    config = find(render(pinned), "ConfigMap", FULLNAME).obj["data"]
    assert config["DATABASE_POOL_MODE"] == "pgbouncer-prepared"


def test_pgbouncer_checksum_follows_its_config() -> None:
    base = {"pgbouncer": {"enabled": True, "postgres": {"host": "db"}, "auth": {"userlist": "x"}}}
    name = f"{FULLNAME}-pgbouncer"

    def checksum(values: dict[str, Any]) -> str:
        deployment = find(render(values), "Deployment", name).obj
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum(base) != checksum(merged(base, {"pgbouncer": {"defaultPoolSize": 40}}))


# --- monitoring objects ---------------------------------------------------------------------------


def test_monitoring_objects_are_behind_flags() -> None:
    kinds = {o.kind for o in render()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ExternalSecret", "Ingress"}
    assert "NetworkPolicy" not in kinds
    assert "HorizontalPodAutoscaler" not in kinds
    assert not [o for o in render() if o.name.endswith("-dashboard")]


def test_dashboard_configmap_carries_the_sidecar_label(
    renders: dict[str, list[Rendered]],
) -> None:
    dashboard = find(renders["production-values"], "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard.obj["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard.obj["metadata"]["namespace"] == "monitoring"
    assert dashboard.obj["metadata"]["annotations"] == {"grafana_folder": "APIs"}
    assert (CHART_DIR / "dashboards" / "fastapi-app.json").read_text().strip() == (
        dashboard.obj["data"]["fastapi-app.json"].strip()
    )


def test_service_monitor_scrapes_the_metrics_port(renders: dict[str, list[Rendered]]) -> None:
    monitor = find(renders["production-values"], "ServiceMonitor").obj
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
