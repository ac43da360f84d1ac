"""The Zuplo project in zuplo/: routes generated from the service's own OpenAPI (and kept so),
policies that agree with the service, a pinned CLI. `zuplo lint` and the real gateway run in
tests/stack/test_zuplo_gateway.py (they need the CLI from `make zuplo-install`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from limits import parse

from service.settings import Settings
from testkit import load_module

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
ZUPLO = REPO / "zuplo"
render_routes = load_module(ZUPLO / "render_routes.py", "zuplo_render_routes")


def routes() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((ZUPLO / "config" / "routes.oas.json").read_text())
    return document


def policies() -> dict[str, dict[str, Any]]:
    document = json.loads((ZUPLO / "config" / "policies.json").read_text())
    return {policy["name"]: policy for policy in document["policies"]}


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if not method.startswith("x-")
    }


def test_routes_file_is_what_the_generator_writes() -> None:
    """Stale after an API change: run `make zuplo-routes`."""
    committed = (ZUPLO / "config" / "routes.oas.json").read_text()
    assert committed == render_routes.expected_text(), "run `make zuplo-routes`"


def test_the_check_mode_fails_on_a_stale_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "routes.oas.json"
    stale.write_text("{}\n")
    # As CI or a developer runs it: a separate process, exit status 1.
    command = [sys.executable, str(ZUPLO / "render_routes.py"), "--check", "--out", str(stale)]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert failed.returncode == 1
    assert "make zuplo-routes" in failed.stderr
    assert render_routes.main(["--out", str(stale)]) == 0
    assert render_routes.main(["--check", "--out", str(stale)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_every_public_operation_is_routed_and_no_probe_or_metrics() -> None:
    service = render_routes.service_openapi()
    public = {
        key
        for key in operations(service)
        if not key[1].startswith("/health") and not key[1].startswith("/metrics")
    }
    routed = operations(routes())
    assert set(routed) == public
    assert not [path for _, path in routed if path.startswith(("/health", "/metrics"))]
    for key, operation in routed.items():
        # Documented in Zuplo's portal with the service's own words and schemas.
        assert operation["operationId"] == operations(service)[key]["operationId"]
        assert operation["responses"] == operations(service)[key]["responses"]
    routed_schemas = routes()["components"]["schemas"]
    assert {"Problem", "TaskCreate", "TaskPatch"} <= set(routed_schemas)
    for name, definition in routed_schemas.items():
        assert definition == service["components"]["schemas"][name]
    assert set(routes()["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
    # The probes' models stay out with the probes.
    assert not {"LiveStatus", "ReadyStatus", "HealthSummary"} & set(routed_schemas)
    text = json.dumps(routes())
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text):
        assert ref in routed_schemas, ref


def test_every_route_forwards_to_the_backend_through_every_policy() -> None:
    defined = policies()
    for (method, path), operation in operations(routes()).items():
        route = operation["x-zuplo-route"]
        handler = route["handler"]
        assert handler["export"] == "urlForwardHandler", (method, path)
        assert handler["options"]["baseUrl"] == "${env.BASE_URL}"
        inbound = route["policies"]["inbound"]
        assert inbound == render_routes.INBOUND_POLICIES, (method, path)
        assert set(inbound) <= set(defined)
    for path, item in routes()["paths"].items():
        assert item["x-zuplo-path"] == {"pathMode": "open-api"}, path


def test_the_gateway_secret_comes_from_a_zuplo_variable_and_overwrites() -> None:
    policy = policies()["gateway-secret"]
    assert policy["policyType"] == "set-headers-inbound"
    (header,) = policy["handler"]["options"]["headers"]
    assert header["value"] == "$env(GATEWAY_SHARED_SECRET)"
    # A client-sent value is replaced, never kept next to ours.
    assert header["overwrite"] is True


def test_api_keys_are_zuplos_and_the_services_own_keep_working() -> None:
    policy = policies()["api-key-auth"]
    assert policy["policyType"] == "api-key-inbound"
    assert policy["handler"]["export"] == "ApiKeyInboundPolicy"
    # Requests without a Zuplo key go on to the service, whose own keys then decide (401 there).
    assert policy["handler"]["options"]["allowUnauthenticatedRequests"] is True


def test_rate_limit_is_per_consumer_with_an_ip_fallback() -> None:
    handler = policies()["rate-limit"]["handler"]
    options = handler["options"]
    assert options["rateLimitBy"] == "function"
    module = re.fullmatch(r"\$import\(\./(modules/[\w-]+)\)", options["identifier"]["module"])
    assert module is not None
    source = (ZUPLO / f"{module.group(1)}.ts").read_text()
    assert f"export function {options['identifier']['export']}(" in source
    assert "request.user?.sub" in source
    assert "incomingRequestProperties.ip" in source
    # The same budget the service gives a principal (RATE_LIMIT_DEFAULT).
    service_limit = parse(Settings.model_fields["rate_limit_default"].default)
    assert options["requestsAllowed"] == service_limit.amount
    assert options["timeWindowMinutes"] * 60 == service_limit.get_expiry()


def test_the_size_limit_matches_the_service() -> None:
    options = policies()["request-size-limit"]["handler"]["options"]
    assert options["maxSizeInBytes"] == Settings.model_fields["max_request_body_bytes"].default
    # Count the body, not the client's Content-Length claim.
    assert options["trustContentLengthHeader"] is False


def test_consumer_headers_match_the_services_defaults() -> None:
    options = policies()["forward-consumer"]["handler"]["options"]
    fields = Settings.model_fields
    assert options["consumerHeader"] == fields["gateway_consumer_header"].default.lower()
    assert options["scopesHeader"] == fields["gateway_consumer_scopes_header"].default.lower()


def test_every_module_a_policy_imports_exists() -> None:
    for name, policy in policies().items():
        for found in re.findall(r"\$import\(\./([\w/-]+)\)", json.dumps(policy)):
            assert (ZUPLO / f"{found}.ts").is_file(), (name, found)


def test_every_variable_the_config_reads_is_in_env_example() -> None:
    config = "".join(path.read_text() for path in (ZUPLO / "config").glob("*.json"))
    used = set(re.findall(r"\$env\((\w+)\)", config)) | set(re.findall(r"\$\{env\.(\w+)\}", config))
    example = (ZUPLO / ".env.example").read_text()
    documented = set(re.findall(r"^(\w+)=", example, re.M))
    assert used == documented


def test_the_cli_is_pinned_exactly_and_needs_node_24() -> None:
    package = json.loads((ZUPLO / "package.json").read_text())
    version = package["devDependencies"]["zuplo"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "pin an exact version"
    lock = json.loads((ZUPLO / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/zuplo"]["version"] == version
    assert package["engines"]["node"] == ">=24"


def test_tsconfig_uses_string_options() -> None:
    # The tsconfig `zuplo dev` writes on first start breaks every later start.
    options = json.loads((ZUPLO / "tsconfig.json").read_text())["compilerOptions"]
    assert options["module"] == "ESNext"
    assert options["target"] == "ES2022"
    assert options["moduleResolution"] == "Bundler"
