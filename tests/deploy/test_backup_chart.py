"""The chart's data-safety objects: backup and restore-drill CronJobs, the pre-upgrade backup
hook, separate owner credentials, TLS files, and the alerts on backup and drill age."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from conftest import (
    FULLNAME,
    K8S_DIR,
    NAMESPACE,
    Rendered,
    find,
    find_all,
    kustomize_build,
    pod_spec,
    render,
    value_sets,
)
from test_prometheus_rules import promtool

from service.settings import load_settings

pytestmark = pytest.mark.deploy

SECRETS = {
    "DATABASE_URL": "postgresql://app:app-pw@postgres.db:5432/app?sslmode=require",
    "DATABASE_MIGRATION_URL": "postgresql://owner:owner-pw@postgres.db:5432/app?sslmode=require",
    "GATEWAY_SHARED_SECRET": "s" * 40,
}
BACKUP = {"backup": {"enabled": True, "beforeMigrate": True}, "secrets": SECRETS}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(pod_spec(obj)["containers"][0])


def env_from(obj: dict[str, Any]) -> list[str]:
    refs = container(obj).get("envFrom", [])
    return [next(iter(ref.values()))["name"] for ref in refs]


def secret_keys(obj: Rendered) -> set[str]:
    return set(obj.obj.get("data") or {})


def test_backups_are_off_by_default() -> None:
    kinds = {(o.kind, o.name) for o in render()}
    assert not [k for k in kinds if k[0] in {"CronJob", "PersistentVolumeClaim"}]
    assert ("Job", f"{FULLNAME}-backup-pre-upgrade") not in kinds


def test_cronjobs_run_like_the_app_bounded_and_never_twice() -> None:
    objects = render(value_sets()["backup-values"])
    deployment = find(objects, "Deployment", FULLNAME).obj
    cronjobs = {o.name: o.obj for o in find_all(objects, "CronJob")}
    assert set(cronjobs) == {f"{FULLNAME}-backup", f"{FULLNAME}-restore-drill"}
    for name, cronjob in cronjobs.items():
        spec = cronjob["spec"]
        assert spec["concurrencyPolicy"] == "Forbid"
        assert spec["timeZone"] == "Etc/UTC"
        job = spec["jobTemplate"]["spec"]
        assert job["activeDeadlineSeconds"] == 3600
        pod = pod_spec(cronjob)
        assert pod["securityContext"] == pod_spec(deployment)["securityContext"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["restartPolicy"] == "Never"
        app = container(deployment)
        job_container = container(cronjob)
        assert job_container["securityContext"] == app["securityContext"]
        assert job_container["securityContext"]["readOnlyRootFilesystem"] is True
        assert job_container["args"] == [name.removeprefix(f"{FULLNAME}-")]
        env = {e["name"]: e.get("value") for e in job_container["env"]}
        assert env["BACKUP_DIR"] == "/backups"
        assert env["BACKUP_TIMEOUT_SECONDS"] == "3600"
        assert env["PUSHGATEWAY_URL"] == "http://prometheus-pushgateway.monitoring:9091"
        assert env["PG_BIN_DIR"] == "/usr/lib/postgresql/16/bin"
        mounts = {m["mountPath"]: m["name"] for m in job_container["volumeMounts"]}
        assert mounts["/backups"] == "backups"
        assert mounts["/etc/fastapi-app/db-tls"] == "db-tls"
        assert mounts["/tmp"] == "tmp"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["backups"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-backups"
        # Both credentials: the owner's for pg_dump, the app's for the production guards.
        assert env_from(cronjob) == [
            FULLNAME,
            "fastapi-app-data-safety",
            "fastapi-app-database-owner",
        ]
    pvc = find(objects, "PersistentVolumeClaim", f"{FULLNAME}-backups")
    assert pvc.annotations["helm.sh/resource-policy"] == "keep"


def test_pre_upgrade_backup_runs_after_the_hook_config_and_before_the_migration() -> None:
    objects = render(BACKUP, is_upgrade=True)
    weights = {
        (o.kind, o.name): int(o.annotations["helm.sh/hook-weight"])
        for o in objects
        if "helm.sh/hook-weight" in o.annotations and o.annotations.get("helm.sh/hook") != "test"
    }
    backup = find(objects, "Job", f"{FULLNAME}-backup-pre-upgrade")
    assert backup.annotations["helm.sh/hook"] == "pre-upgrade"  # nothing to back up on install
    assert "hook-succeeded" in backup.annotations["helm.sh/hook-delete-policy"]
    config = weights[("ConfigMap", f"{FULLNAME}-migrations")]
    secret = weights[("Secret", f"{FULLNAME}-migrations")]
    assert max(config, secret) < weights[("Job", f"{FULLNAME}-backup-pre-upgrade")]
    assert (
        weights[("Job", f"{FULLNAME}-backup-pre-upgrade")]
        < weights[("Job", f"{FULLNAME}-migrations")]
    )
    # It reads the hook copies (the release's own objects may not hold this release's values).
    assert env_from(backup.obj) == [f"{FULLNAME}-migrations", f"{FULLNAME}-migrations"]
    assert container(backup.obj)["args"] == ["backup", "--kind", "pre-upgrade"]
    assert backup.obj["spec"]["backoffLimit"] == 1  # fail the upgrade, do not retry for long


def test_backup_jobs_run_the_app_image_by_its_digest_with_the_tools_on_its_path() -> None:
    """The app image carries PostgreSQL 16's pg_dump/pg_restore (tests/image proves they do the
    job): by default every backup job runs exactly the API's image, digest included, and leaves
    PG_BIN_DIR to the image. An override (another major) replaces both."""
    digest = "sha256:" + "a" * 64
    values = {**BACKUP, "image": {"repository": "ghcr.io/acme/fastapi-app", "digest": digest}}
    objects = render(values, is_upgrade=True)
    api_image = container(find(objects, "Deployment", FULLNAME).obj)["image"]
    assert api_image == f"ghcr.io/acme/fastapi-app@{digest}"
    jobs = [
        *find_all(objects, "CronJob"),
        find(objects, "Job", f"{FULLNAME}-backup-pre-upgrade"),
    ]
    assert len(jobs) == 3
    for job in jobs:
        assert container(job.obj)["image"] == api_image
        assert "PG_BIN_DIR" not in {e["name"] for e in container(job.obj)["env"]}

    pg17 = {"repository": "ghcr.io/acme/fastapi-app-pg17", "tag": "1.4.2"}
    backup = {**cast(dict[str, Any], BACKUP["backup"]), "image": pg17}
    backup["pgBinDir"] = "/usr/lib/postgresql/17/bin"
    objects = render({**values, "backup": backup})
    for job in find_all(objects, "CronJob"):
        assert container(job.obj)["image"] == "ghcr.io/acme/fastapi-app-pg17:1.4.2"
        env = {e["name"]: e.get("value") for e in container(job.obj)["env"]}
        assert env["PG_BIN_DIR"] == "/usr/lib/postgresql/17/bin"


def test_the_api_pods_never_receive_the_owner_credential() -> None:
    objects = render(BACKUP)
    app_secret = find(objects, "Secret", FULLNAME)
    assert secret_keys(app_secret) == {"DATABASE_URL", "GATEWAY_SHARED_SECRET"}
    owner = find(objects, "Secret", f"{FULLNAME}-database-owner")
    assert secret_keys(owner) == {"DATABASE_MIGRATION_URL"}
    decoded = base64.b64decode(owner.obj["data"]["DATABASE_MIGRATION_URL"]).decode()
    assert decoded == SECRETS["DATABASE_MIGRATION_URL"]
    hook_secret = find(objects, "Secret", f"{FULLNAME}-migrations")
    assert secret_keys(hook_secret) == set(SECRETS)  # migrate also learns the app's role
    deployment = find(objects, "Deployment", FULLNAME).obj
    assert f"{FULLNAME}-database-owner" not in env_from(deployment)


def test_an_owner_secret_goes_to_the_migration_job_only() -> None:
    values = value_sets()["backup-values"]
    objects = render(values)
    assert "fastapi-app-database-owner" in env_from(
        find(objects, "Job", f"{FULLNAME}-migrations").obj
    )
    assert "fastapi-app-database-owner" not in env_from(find(objects, "Deployment", FULLNAME).obj)


def test_database_tls_reaches_every_connecting_pod_and_pgbouncer() -> None:
    objects = render(value_sets()["backup-values"])
    config = find(objects, "ConfigMap", FULLNAME).obj["data"]
    assert config["DATABASE_SSL_ROOT_CERT"] == "/etc/fastapi-app/db-tls/ca.crt"
    for obj in objects:
        if obj.kind in {"Deployment", "Job", "CronJob"} and "pgbouncer" not in obj.name:
            mounts = {m["name"] for m in container(obj.obj).get("volumeMounts", [])}
            assert "db-tls" in mounts, obj.name
    ini = find(objects, "ConfigMap", f"{FULLNAME}-pgbouncer").obj["data"]["pgbouncer.ini"]
    assert "server_tls_sslmode = verify-full" in ini
    assert "server_tls_ca_file = /etc/pgbouncer-tls/ca.crt" in ini


def test_pgbouncer_in_the_cluster_is_an_allowed_plaintext_host_for_the_app() -> None:
    objects = render(value_sets()["backup-values"])
    config = find(objects, "ConfigMap", FULLNAME).obj["data"]
    hosts = config["DATABASE_PLAINTEXT_ALLOWED_HOSTS"]
    # The app, started with this config and a DATABASE_URL at the chart's PgBouncer, accepts it.
    settings = load_settings(
        environment="production",
        database_url=f"postgresql://app:pw@{FULLNAME}-pgbouncer.{NAMESPACE}.svc:6432/app",
        database_plaintext_allowed_hosts=hosts,
        gateway_shared_secret="s" * 40,
    )
    assert settings.database_url is not None


def test_s3_only_backups_stage_on_an_empty_dir_and_read_the_credentials_secret() -> None:
    from test_chart import validate_objects

    values: dict[str, Any] = {
        "backup": {
            "enabled": True,
            "persistence": {"enabled": False, "size": "10Gi"},
            "s3": {
                "bucket": "b",
                "prefix": "p",
                "endpointUrl": "https://minio.storage:9000",
                "existingSecret": "minio-credentials",
            },
        },
        "secrets": SECRETS,
    }
    objects = render(values)
    assert not find_all(objects, "PersistentVolumeClaim")
    for cronjob in find_all(objects, "CronJob"):
        volumes = {v["name"]: v for v in pod_spec(cronjob.obj)["volumes"]}
        assert volumes["backups"]["emptyDir"] == {"sizeLimit": "10Gi"}
        env = {e["name"]: e.get("value") for e in container(cronjob.obj)["env"]}
        assert env["BACKUP_S3_BUCKET"] == "b"
        assert env["BACKUP_S3_ENDPOINT_URL"] == "https://minio.storage:9000"
        assert env_from(cronjob.obj)[-1] == "minio-credentials"
    validate_objects(objects, "1.33")
    from helm_python.errors import HelmError

    values["backup"]["s3"]["bucket"] = ""
    with pytest.raises(HelmError, match="vanish with their pod"):
        render(values)


def test_cronjob_names_fit_the_52_character_limit() -> None:
    long_name = {"fullnameOverride": "a" * 52, **BACKUP}
    for cronjob in find_all(render(long_name), "CronJob"):
        assert len(cronjob.name) <= 52, cronjob.name


def test_verifying_pgbouncer_tls_needs_the_ca() -> None:
    from helm_python.errors import HelmError

    values = {
        "pgbouncer": {
            "enabled": True,
            "postgres": {"host": "db"},
            "auth": {"existingSecret": "u"},
            "serverTlsSslmode": "verify-full",
        }
    }
    with pytest.raises(HelmError, match="needs the CA"):
        render(values)


# --- alerts -------------------------------------------------------------------------------------

DAY = 86400


def alert_rules(values: dict[str, Any]) -> list[dict[str, Any]]:
    rule = find(render(values), "PrometheusRule").obj
    rules = [
        r
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") in {"FastAPIAppBackupTooOld", "FastAPIAppRestoreDrillTooOld"}
    ]
    for r in rules:
        r.pop("annotations")
    return rules


def run_rule_tests(rules: list[dict[str, Any]], tests: list[dict[str, Any]], tmp: Path) -> None:
    (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "t", "rules": rules}]}))
    (tmp / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
    )
    result = subprocess.run(
        [promtool(), "test", "rules", "tests.yaml"], capture_output=True, text=True, cwd=tmp
    )
    assert result.returncode == 0, result.stdout + result.stderr


def pushed(metric: str, job: str, values: str) -> dict[str, str]:
    return {"series": f'{metric}{{job="{job}",app="{FULLNAME}"}}', "values": values}


def test_pushgateway_alerts_fire_when_too_old_or_never_and_stay_quiet_when_fresh(
    tmp_path: Path,
) -> None:
    rules = alert_rules(value_sets()["backup-values"])
    # promtool's clock starts at 0: a backup at t=0 is 27 h old at 27h, fresh at 20h. Samples
    # every minute, as a Pushgateway scraped once a minute yields them.
    tests: list[dict[str, Any]] = [
        {
            "interval": "1m",
            "input_series": [
                pushed("backup_last_success_timestamp_seconds", "backup", "0x1700"),
                pushed("restore_drill_last_success_timestamp_seconds", "restore_drill", "0x1700"),
            ],
            "alert_rule_test": [
                {"eval_time": "20h", "alertname": "FastAPIAppBackupTooOld", "exp_alerts": []},
                {
                    "eval_time": "27h",
                    "alertname": "FastAPIAppBackupTooOld",
                    "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
                },
                {"eval_time": "27h", "alertname": "FastAPIAppRestoreDrillTooOld", "exp_alerts": []},
            ],
        },
        {  # a daily backup that keeps succeeding never alerts
            "interval": "1m",
            "input_series": [
                pushed(
                    "backup_last_success_timestamp_seconds",
                    "backup",
                    " ".join(f"{day * DAY}x1439" for day in range(3)),
                ),
            ],
            "alert_rule_test": [
                {"eval_time": "50h", "alertname": "FastAPIAppBackupTooOld", "exp_alerts": []},
            ],
        },
        {  # nothing ever pushed: both alert (after their `for`)
            "interval": "1m",
            "input_series": [{"series": 'up{job="other"}', "values": "1x30"}],
            "alert_rule_test": [
                {
                    "eval_time": "15m",
                    "alertname": "FastAPIAppBackupTooOld",
                    "exp_alerts": [
                        {"exp_labels": {"severity": "critical", "job": "backup", "app": FULLNAME}}
                    ],
                },
                {
                    "eval_time": "15m",
                    "alertname": "FastAPIAppRestoreDrillTooOld",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "job": "restore_drill",
                                "app": FULLNAME,
                            }
                        }
                    ],
                },
            ],
        },
    ]
    run_rule_tests(rules, tests, tmp_path)


def test_without_a_pushgateway_alerts_read_kube_state_metrics(tmp_path: Path) -> None:
    values = json.loads(json.dumps(value_sets()["backup-values"]))
    values["backup"]["metrics"]["pushgatewayUrl"] = ""
    rules = alert_rules(values)
    assert all("kube_cronjob_status_last_successful_time" in r["expr"] for r in rules)
    labels = f'namespace="{NAMESPACE}",cronjob="{FULLNAME}-restore-drill"'
    series = f"kube_cronjob_status_last_successful_time{{{labels}}}"
    tests: list[dict[str, Any]] = [
        {
            "interval": "1m",
            "input_series": [{"series": series, "values": "0x12000"}],
            "alert_rule_test": [
                {
                    "eval_time": "100h",
                    "alertname": "FastAPIAppRestoreDrillTooOld",
                    "exp_alerts": [],
                },
                {
                    "eval_time": "193h",
                    "alertname": "FastAPIAppRestoreDrillTooOld",
                    "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
                },
            ],
        }
    ]
    run_rule_tests(rules, tests, tmp_path)


# --- kustomize ----------------------------------------------------------------------------------


def test_kustomize_backup_component_in_production() -> None:

    objects = kustomize_build(K8S_DIR / "overlays" / "production")
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    deployment = by_name[("Deployment", "fastapi-app")]
    migrate = by_name[("Job", "fastapi-app-migrate")]
    assert "fastapi-app-database-owner" not in env_from(deployment)
    assert "fastapi-app-database-owner" in env_from(migrate)
    for name in ("fastapi-app-backup", "fastapi-app-restore-drill"):
        cronjob = by_name[("CronJob", name)]
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
        assert cronjob["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > 0
        refs = env_from(cronjob)
        # The generated (hash-suffixed) ConfigMaps, both Secrets.
        assert refs[0].startswith("fastapi-app-")
        assert refs[0] in {n for _, n in by_name}
        assert refs[2:] == ["fastapi-app", "fastapi-app-database-owner"]
        assert container(cronjob)["securityContext"] == container(deployment)["securityContext"]
        assert container(cronjob)["image"] == container(deployment)["image"]
    assert ("PersistentVolumeClaim", "fastapi-app-backups") in by_name
    staging = kustomize_build(K8S_DIR / "overlays" / "staging")
    assert not [o for o in staging if o["kind"] == "CronJob"]  # opt-in per overlay


def test_kustomize_app_env_lets_the_app_reach_its_pgbouncer_in_production() -> None:

    env = dict(
        line.split("=", 1)
        for line in (K8S_DIR / "base" / "app.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    settings = load_settings(
        environment="production",
        database_url="postgresql://app:pw@fastapi-app-pgbouncer:6432/app",
        database_plaintext_allowed_hosts=env["DATABASE_PLAINTEXT_ALLOWED_HOSTS"],
        gateway_shared_secret="s" * 40,
    )
    assert settings.database_url is not None
