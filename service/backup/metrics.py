"""What the backup and drill jobs tell Prometheus: pushed to a Pushgateway, when one is set.

A CronJob's pod is gone before Prometheus could scrape it, so the jobs push. Only success
pushes: the alert compares ``time()`` with the last success, so a failing job (or one that
never runs) shows up as an ageing timestamp, which is exactly what the alert measures.
Without a Pushgateway the chart's alerts read kube-state-metrics'
``kube_cronjob_status_last_successful_time`` instead (the job's exit status), which says a run
succeeded but not how big the backup was.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

BACKUP_JOB = "backup"
DRILL_JOB = "restore_drill"


def push_backup_success(
    gateway: str, *, app: str, finished_at: float, size_bytes: int, duration_s: float
) -> None:
    registry = CollectorRegistry()
    Gauge(
        "backup_last_success_timestamp_seconds",
        "Unix time the last successful backup finished",
        registry=registry,
    ).set(finished_at)
    Gauge("backup_size_bytes", "Size of the last successful backup", registry=registry).set(
        size_bytes
    )
    Gauge(
        "backup_duration_seconds", "Run time of the last successful backup", registry=registry
    ).set(duration_s)
    push_to_gateway(
        gateway, job=BACKUP_JOB, grouping_key={"app": app}, registry=registry, timeout=10
    )


def push_drill_success(
    gateway: str, *, app: str, finished_at: float, duration_s: float, backup_age_s: float
) -> None:
    registry = CollectorRegistry()
    Gauge(
        "restore_drill_last_success_timestamp_seconds",
        "Unix time the last restore drill verified a backup",
        registry=registry,
    ).set(finished_at)
    Gauge(
        "restore_drill_duration_seconds",
        "Run time of the last successful drill (restore, verify, migrate, smoke): the RTO's floor",
        registry=registry,
    ).set(duration_s)
    Gauge(
        "restore_drill_backup_age_seconds",
        "Age of the backup the last successful drill restored",
        registry=registry,
    ).set(backup_age_s)
    push_to_gateway(
        gateway, job=DRILL_JOB, grouping_key={"app": app}, registry=registry, timeout=10
    )
