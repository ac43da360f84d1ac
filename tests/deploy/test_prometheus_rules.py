"""The PrometheusRule the chart renders and the Grafana dashboard it ships.

`promtool check rules` validates the rendered groups, and `promtool test rules` feeds synthetic
series through the alert expressions: each alert fires on the failure it is named after and stays
quiet on the look-alike it must ignore (probe traffic, other pods, too little traffic).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    DASHBOARD,
    FULLNAME,
    KUBE_STATE_METRICS,
    NAMESPACE,
    PUSHED_METRICS,
    contract_series,
    dashboard_metric_names,
    dashboard_queries,
    find,
    missing_tool,
    promql_metric_names,
    render,
    value_sets,
)

pytestmark = pytest.mark.deploy

API = f'job="{FULLNAME}",namespace="{NAMESPACE}"'
ALERTS = {
    "FastAPIAppHighErrorRatio",
    "FastAPIAppHighLatencyP99",
    "FastAPIAppReadinessFlapping",
    "FastAPIAppDatabaseUnavailable",
    "FastAPIAppRateLimitSaturation",
    "FastAPIAppRateLimitBackendErrors",
    "FastAPIAppPodRestarting",
    "FastAPIAppReplicaLagging",
    "FastAPIAppReplicaUnavailable",
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing_tool("promtool not found (Debian package `prometheus`)")
    return str(found)


def rule_groups(values: dict[str, Any]) -> list[dict[str, Any]]:
    rule = find(render(values), "PrometheusRule").obj
    return list(rule["spec"]["groups"])


@pytest.fixture(scope="module")
def production_groups() -> list[dict[str, Any]]:
    return rule_groups(value_sets()["production-values"])


def run_promtool(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def test_promtool_check_rules(production_groups: list[dict[str, Any]], tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": production_groups}))
    run_promtool("check", "rules", str(rules), cwd=tmp_path)


def test_every_alert_is_rendered_and_switchable(production_groups: list[dict[str, Any]]) -> None:
    alerts = {r["alert"] for g in production_groups for r in g["rules"] if "alert" in r}
    assert alerts == ALERTS
    for group in production_groups:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"]
    quiet = {"errorRatio": {"enabled": False}, "podRestarts": {"enabled": False}}
    groups = rule_groups({"metrics": {"prometheusRule": {"enabled": True, "rules": quiet}}})
    remaining = {r["alert"] for g in groups for r in g["rules"]}
    assert remaining == ALERTS - {"FastAPIAppHighErrorRatio", "FastAPIAppPodRestarting"}


def test_alerts_use_only_exported_metrics(production_groups: list[dict[str, Any]]) -> None:
    allowed = contract_series() | KUBE_STATE_METRICS
    for group in production_groups:
        for rule in group["rules"]:
            names = promql_metric_names(rule["expr"])
            assert names, rule["alert"]
            assert names <= allowed, f"{rule['alert']}: {sorted(names - allowed)}"


@pytest.mark.parametrize("pushgateway", ["http://pushgateway.monitoring:9091", ""])
def test_backup_alerts_use_only_what_the_jobs_push_or_kube_state_metrics(
    pushgateway: str, tmp_path: Path
) -> None:
    values = {
        "backup": {"enabled": True, "metrics": {"pushgatewayUrl": pushgateway}},
        "metrics": {"prometheusRule": {"enabled": True}},
    }
    groups = rule_groups(values)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    run_promtool("check", "rules", str(rules), cwd=tmp_path)
    backup_rules = [
        r
        for g in groups
        for r in g["rules"]
        if r["alert"] in {"FastAPIAppBackupTooOld", "FastAPIAppRestoreDrillTooOld"}
    ]
    assert len(backup_rules) == 2
    for rule in backup_rules:
        names = promql_metric_names(rule["expr"])
        expected = PUSHED_METRICS if pushgateway else KUBE_STATE_METRICS
        assert names <= expected, names
        assert rule["annotations"]["description"].count("docs/backup-restore.md#runbook-") == 1


def test_the_jobs_push_the_series_the_alerts_read() -> None:
    from backupkit import pushgateway

    from service.backup.metrics import push_backup_success, push_drill_success

    with pushgateway() as gateway:
        push_backup_success(gateway.url, app="x", finished_at=1.0, size_bytes=2, duration_s=3.0)
        push_drill_success(gateway.url, app="x", finished_at=1.0, duration_s=2.0, backup_age_s=3.0)
    pushed = set()
    for _, path, body in gateway.received:
        assert path in {"/metrics/job/backup/app/x", "/metrics/job/restore_drill/app/x"}
        pushed |= {
            line.split()[0] for line in body.splitlines() if line and not line.startswith("#")
        }
    assert pushed == PUSHED_METRICS


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    base = {"job": FULLNAME, "namespace": NAMESPACE}
    if name.startswith("kube_"):
        base = {"namespace": NAMESPACE}
    rendered = ",".join(f'{k}="{v}"' for k, v in {**base, **labels}.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


API_POD = f"{FULLNAME}-7d9f8b6c5d-x2k9q"
PGBOUNCER_POD = f"{FULLNAME}-pgbouncer-5c6d7e8f9a-abcde"


def request_series(route: str, status: str, per_minute: int) -> dict[str, str]:
    return series(
        "http_requests_total",
        f"0+{per_minute}x40",
        method="GET",
        route=route,
        status_code=status,
    )


ALERT_TESTS: list[dict[str, Any]] = [
    {  # 5xx on the API fires; 503s of the readiness probe while draining do not count
        "interval": "1m",
        "input_series": [
            request_series("/v1/tasks", "200", 600),
            request_series("/v1/tasks", "500", 120),
            request_series("/health/ready", "503", 6000),
        ],
        "alert_rule_test": [
            {
                "eval_time": "20m",
                "alertname": "FastAPIAppHighErrorRatio",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            },
        ],
    },
    {  # probe failures alone, and a trickle of errors at night, stay quiet
        "interval": "1m",
        "input_series": [
            request_series("/health/ready", "503", 600),
            request_series("/v1/tasks", "200", 6),
            request_series("/v1/tasks", "500", 6),
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "FastAPIAppHighErrorRatio", "exp_alerts": []},
        ],
    },
    {  # slow route: all requests land in the 2.5 s bucket
        "interval": "1m",
        "input_series": [
            series(
                "http_request_duration_seconds_bucket",
                "0+60x40",
                method="GET",
                route="/v1/tasks",
                le=le,
            )
            for le in ("2.5", "5", "+Inf")
        ]
        + [
            series(
                "http_request_duration_seconds_bucket",
                "0x40",
                method="GET",
                route="/v1/tasks",
                le="1",
            )
        ],
        "alert_rule_test": [
            {
                "eval_time": "30m",
                "alertname": "FastAPIAppHighLatencyP99",
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": "warning", "route": "/v1/tasks"},
                    }
                ],
            },
        ],
    },
    {  # every pod reports the database down
        "interval": "1m",
        "input_series": [
            series("db_up", "1 1 0x10", pod=API_POD),
            series("db_up", "1 1 0x10", pod=f"{FULLNAME}-7d9f8b6c5d-abcde"),
        ],
        "alert_rule_test": [
            {
                "eval_time": "8m",
                "alertname": "FastAPIAppDatabaseUnavailable",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            },
        ],
    },
    {  # one pod with a broken connection is not an outage
        "interval": "1m",
        "input_series": [
            series("db_up", "0x10", pod=API_POD),
            series("db_up", "1x10", pod=f"{FULLNAME}-7d9f8b6c5d-abcde"),
        ],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "FastAPIAppDatabaseUnavailable", "exp_alerts": []},
        ],
    },
    {  # a quarter of the requests are rate limited, and Redis errors
        "interval": "1m",
        "input_series": [
            request_series("/v1/tasks", "200", 600),
            request_series("/v1/tasks", "429", 200),
            series("rate_limit_exceeded_total", "0+200x40", scope="key"),
            series("rate_limit_backend_errors_total", "0+5x40"),
        ],
        "alert_rule_test": [
            {
                "eval_time": "25m",
                "alertname": "FastAPIAppRateLimitSaturation",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
            {
                "eval_time": "25m",
                "alertname": "FastAPIAppRateLimitBackendErrors",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
        ],
    },
    {  # an API pod restarting fires; PgBouncer's pods are not the API's business
        "interval": "1m",
        "input_series": [
            series(
                "kube_pod_container_status_restarts_total",
                "0 0 1 1 2 2 3 3 4 4",
                pod=API_POD,
                container="fastapi-app",
            ),
            series(
                "kube_pod_container_status_restarts_total",
                "0 0 1 1 2 2 3 3 4 4",
                pod=PGBOUNCER_POD,
                container="pgbouncer",
            ),
        ],
        "alert_rule_test": [
            {
                "eval_time": "9m",
                "alertname": "FastAPIAppPodRestarting",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": NAMESPACE,
                            "pod": API_POD,
                        }
                    }
                ],
            },
        ],
    },
    {  # replay lag grows past DATABASE_READ_MAX_LAG_SECONDS (5) on the pods and stays there
        "interval": "1m",
        "input_series": [
            series("db_replica_lag_seconds", "0 0 30+60x15", pod=API_POD),
            series("db_replica_lag_seconds", "0 0 25+60x15", pod=f"{FULLNAME}-7d9f8b6c5d-abcde"),
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "FastAPIAppReplicaLagging", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "FastAPIAppReplicaLagging",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
        ],
    },
    {  # a replica that keeps up within the threshold, with a blip above it, stays quiet
        "interval": "1m",
        "input_series": [
            series("db_replica_lag_seconds", "0 1 0 2 9 0 1 0 0 0 0 0 0 0 0", pod=API_POD),
        ],
        "alert_rule_test": [
            {"eval_time": "12m", "alertname": "FastAPIAppReplicaLagging", "exp_alerts": []},
        ],
    },
    {  # no pod reaches the replica: fires; one pod that cannot (its network) does not
        "interval": "1m",
        "input_series": [
            series("db_replica_up", "1 1 0x12", pod=API_POD),
            series("db_replica_up", "1 1 0x12", pod=f"{FULLNAME}-7d9f8b6c5d-abcde"),
            series("db_replica_up", "0x14", pod=f"{FULLNAME}-other-release", job="other"),
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "FastAPIAppReplicaUnavailable",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            series("db_replica_up", "0x14", pod=API_POD),
            series("db_replica_up", "1x14", pod=f"{FULLNAME}-7d9f8b6c5d-abcde"),
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "FastAPIAppReplicaUnavailable", "exp_alerts": []},
        ],
    },
    {  # readiness toggling every minute
        "interval": "1m",
        "input_series": [
            series("kube_pod_status_ready", "1 0 1 0 1 0 1 0 1 0", pod=API_POD, condition="true"),
            series(
                "kube_pod_status_ready",
                "1x10",
                pod=f"{FULLNAME}-7d9f8b6c5d-abcde",
                condition="true",
            ),
        ],
        "alert_rule_test": [
            {
                "eval_time": "9m",
                "alertname": "FastAPIAppReadinessFlapping",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": NAMESPACE,
                            "pod": API_POD,
                        }
                    }
                ],
            },
        ],
    },
]


def test_alerts_fire_on_their_failure_and_only_then(
    production_groups: list[dict[str, Any]], tmp_path: Path
) -> None:
    # promtool compares annotations exactly; the expressions are what is under test here.
    groups = json.loads(json.dumps(production_groups))
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump(
            {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": ALERT_TESTS}
        )
    )
    run_promtool("test", "rules", "tests.yaml", cwd=tmp_path)


# --- dashboard ------------------------------------------------------------------------------------


def test_dashboard_is_valid_json_with_unique_panels() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "fastapi-app"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "job", "route"} <= variables
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]


def test_dashboard_covers_red_pool_workers_and_rate_limits() -> None:
    names = dashboard_metric_names()
    assert {
        "http_requests_total",  # rate and errors per route
        "http_request_duration_seconds_bucket",  # duration per route
        "http_requests_in_progress",  # workers
        "db_pool_checked_out",
        "db_pool_size",
        "db_pool_overflow",
        "rate_limit_exceeded_total",
    } <= names


def test_dashboard_queries_only_exported_metrics() -> None:
    names = dashboard_metric_names()
    assert names <= contract_series(), sorted(names - contract_series())


def test_dashboard_queries_are_scoped_to_one_release() -> None:
    for query in dashboard_queries():
        if query.startswith("label_values(app_info,"):
            continue
        assert 'namespace="$namespace"' in query, query


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket"
        '{job="x", route=~"$route"}[$__rate_interval]))) / on() group_left sum(up{a="b"}) > 1'
    )
    assert promql_metric_names(expr) == {"http_request_duration_seconds_bucket", "up"}
    assert promql_metric_names('label_values(app_info{namespace="$ns"}, job)') == {"app_info"}
