"""render.yaml: the structure Render needs, settings that exist and suffice for production,
commands that exist, and agreement with the Zuplo project in front of it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from limits import parse
from renderkit import REPO, blueprint, env_entries, resolved_env, web_service

from service.entrypoints.cli import build_parser, cmd_migrate, cmd_serve
from service.middleware.probes import PROBE_PATHS
from service.settings import ConfigError, Settings, load_settings

pytestmark = pytest.mark.deploy

SETTINGS_VARS = {name.upper() for name in Settings.model_fields}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Only the blueprint's values may decide what load_settings sees.
    for name in list(os.environ):
        if name.upper() in SETTINGS_VARS or name.upper() == "SECRETS_DIR":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return blueprint()


def test_the_web_service_builds_the_real_image(document: dict[str, Any]) -> None:
    service = web_service(document)
    assert service["runtime"] == "docker"
    assert (REPO / service["dockerfilePath"]).is_file()
    assert (REPO / service["dockerContext"]).resolve() == REPO
    # The image's own command, not a copy of it that could drift.
    assert "dockerCommand" not in service
    # Pre-deploy commands and the shutdown delay are refused on the free plan.
    assert service["plan"] not in {"free", None}


def test_every_variable_is_a_real_setting(document: dict[str, Any]) -> None:
    keys = [entry["key"] for entry in env_entries(document)]
    assert len(keys) == len(set(keys)), "a variable is set twice"
    unknown = set(keys) - SETTINGS_VARS
    assert not unknown, f"not Settings fields: {sorted(unknown)}"


def test_secrets_are_never_committed(document: dict[str, Any]) -> None:
    secret_fields = {
        name.upper()
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    for entry in env_entries(document):
        if entry["key"] in secret_fields:
            assert "value" not in entry, f"{entry['key']} has a committed value"
    generated = {e["key"] for e in env_entries(document) if e.get("generateValue")}
    assert generated == {"GATEWAY_SHARED_SECRET"}


def test_the_blueprint_is_a_complete_production_configuration(document: dict[str, Any]) -> None:
    env = resolved_env(document)
    settings = load_settings(**{key.lower(): value for key, value in env.items()})
    assert settings.environment.value == "production"
    assert settings.host == "0.0.0.0"  # Render's proxy connects from outside
    assert settings.database_pool_mode == "pgbouncer-transaction"
    # Neon's URLs as Neon gives them, normalised for asyncpg; migrations skip the pooler.
    assert "-pooler" in settings.require_database_url()
    assert "-pooler" not in settings.migration_url()
    assert settings.redis_url is not None
    assert settings.gateway_identity_enabled
    assert settings.forwarded_allow_ips == ["*"]


@pytest.mark.parametrize("required", ["DATABASE_URL", "GATEWAY_SHARED_SECRET"])
def test_production_refuses_the_blueprint_without_what_render_supplies(
    document: dict[str, Any], required: str
) -> None:
    env = resolved_env(document)
    del env[required]
    with pytest.raises(ConfigError, match=required):
        load_settings(**{key.lower(): value for key, value in env.items()})


def test_shutdown_delay_covers_gunicorns_graceful_timeout(document: dict[str, Any]) -> None:
    service = web_service(document)
    graceful = int(resolved_env(document)["GUNICORN_GRACEFUL_TIMEOUT"])
    # SIGKILL must not come before gunicorn has let in-flight requests finish.
    assert service["maxShutdownDelaySeconds"] >= graceful + 5
    assert service["maxShutdownDelaySeconds"] <= 300  # Render's maximum


def test_health_check_is_the_startup_probe(document: dict[str, Any]) -> None:
    path = web_service(document)["healthCheckPath"]
    assert path == "/health/startup"
    # A probe: never behind the gateway secret, never rate limited.
    assert path in PROBE_PATHS


def test_redis_comes_from_the_blueprints_key_value_instance(document: dict[str, Any]) -> None:
    (redis,) = [e for e in env_entries(document) if e["key"] == "REDIS_URL"]
    source = redis["fromService"]
    (keyvalue,) = [s for s in document["services"] if s["name"] == source["name"]]
    assert source["type"] == keyvalue["type"] == "keyvalue"
    assert source["property"] == "connectionString"
    assert keyvalue["ipAllowList"] == []  # private network only
    assert keyvalue["region"] == web_service(document)["region"]


def test_the_pre_deploy_command_is_the_migration(document: dict[str, Any]) -> None:
    command = web_service(document)["preDeployCommand"].split()
    assert command[:3] == ["python", "-m", "service"]
    args = build_parser().parse_args(command[3:])
    assert args.handler is cmd_migrate
    assert args.revision == "head"


def test_the_images_command_is_serve() -> None:
    dockerfile = (REPO / ".docker" / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    assert entrypoint == ["python", "-m", "service"]
    assert build_parser().parse_args(cmd).handler is cmd_serve


@pytest.mark.parametrize("command", [["migrate", "--help"], ["serve", "--help"]])
def test_the_commands_run(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert command[0] in result.stdout


def test_the_gateway_project_agrees_with_the_blueprint(document: dict[str, Any]) -> None:
    env = resolved_env(document)
    policies = json.loads((REPO / "zuplo" / "config" / "policies.json").read_text())
    by_name = {policy["name"]: policy["handler"] for policy in policies["policies"]}
    (header,) = by_name["gateway-secret"]["options"]["headers"]
    assert header["name"].lower() == env["GATEWAY_SECRET_HEADER"].lower()
    forward = by_name["forward-consumer"]["options"]
    assert forward["consumerHeader"].lower() == env["GATEWAY_CONSUMER_HEADER"].lower()
    assert forward["scopesHeader"].lower() == env["GATEWAY_CONSUMER_SCOPES_HEADER"].lower()
    # The gateway refuses what the service would refuse, before it costs a request.
    settings = load_settings(**{key.lower(): value for key, value in env.items()})
    limit = by_name["request-size-limit"]["options"]["maxSizeInBytes"]
    assert limit == settings.max_request_body_bytes
    # All traffic comes from Zuplo's edge: the service's per-IP budget must be far above the
    # gateway's per-client one, or clients sharing an edge node would starve each other.
    per_client = by_name["rate-limit"]["options"]["requestsAllowed"]
    per_edge = parse(settings.rate_limit_per_ip)
    assert per_edge.get_expiry() == 60
    assert per_edge.amount >= 50 * per_client
