"""Policy scan: checkov's Kubernetes checks over everything the chart and the overlays render.

checkov has heavy, conflicting dependencies, so it is not in the project's lock: it runs in its own
environment through `uv tool run`, pinned so that a new checkov release cannot change the verdict
without a commit. Failures are allowed only where ALLOWED below says so, each with its reason and
a rule for exactly which objects it covers; everything else must pass.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    FULLNAME,
    K8S_DIR,
    OVERLAYS,
    Rendered,
    kustomize_build,
    render,
    uv_tool_run,
    value_sets,
)

from testkit import find_binary, skip_or_fail

pytestmark = pytest.mark.deploy

CHECKOV = "checkov==3.3.30"


@dataclass(frozen=True)
class Allowed:
    reason: str
    applies: Callable[[str, str], bool]  # (scanned file name, checkov resource id) -> allowed?


def everywhere(_file: str, _resource: str) -> bool:
    return True


ALLOWED: dict[str, Allowed] = {
    "CKV_K8S_15": Allowed(
        "imagePullPolicy IfNotPresent, not Always: every image is referenced by an immutable tag "
        "(the schema refuses 'latest') or a digest, so Always only adds a registry round trip to "
        "each pod start and lets a registry outage block scale-out. The check guards against "
        "mutable tags and multi-tenant nodes reusing cached private images; neither applies.",
        everywhere,
    ),
    "CKV_K8S_35": Allowed(
        "Secrets as environment variables: the service's configuration contract is env vars "
        "(envFrom the Secret), settings are read once at start-up so mounted files would not "
        "add live rotation, and no child process or crash dump exposes the environment. "
        "Platforms that require files can mount the Secret and set SECRETS_DIR instead.",
        everywhere,
    ),
    "CKV_K8S_43": Allowed(
        "Image by tag, not digest, in the development and staging-like value sets and overlays: "
        "the release pipeline publishes immutable tags and the deploy workflow pins digests. The "
        "production value set pins the API image by digest and is not covered by this entry.",
        lambda file, _resource: "production-values" not in file,
    ),
    "CKV_K8S_8": Allowed(
        "No liveness probe on the `helm test` pod: it runs one smoke check and exits.",
        lambda _file, resource: resource.startswith("Pod.") and resource.endswith("-smoke"),
    ),
    "CKV_K8S_9": Allowed(
        "No readiness probe on the `helm test` pod: it serves nothing.",
        lambda _file, resource: resource.startswith("Pod.") and resource.endswith("-smoke"),
    ),
}

# Everything optional switched on, so no template escapes the scan.
EVERYTHING: dict[str, Any] = {
    "autoscaling": {"enabled": True},
    "ingress": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "pgbouncer": {
        "enabled": True,
        "postgres": {"host": "postgres.db.svc"},
        "auth": {"existingSecret": "pgbouncer-userlist"},
    },
    "backup": {"enabled": True, "beforeMigrate": True},
    "databaseTLS": {"enabled": True, "secretName": "postgres-ca"},
}


def write_all(path: Path, objects: list[dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))


def objects_of(rendered: list[Rendered]) -> list[dict[str, Any]]:
    return [r.obj for r in rendered]


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if find_binary("uv") is None:
        skip_or_fail("uv is needed to run checkov (`uv tool run --from checkov checkov`)")
    directory = tmp_path_factory.mktemp("checkov")
    for name, values in value_sets().items():
        write_all(directory / f"chart-{name}.yaml", objects_of(render(values)))
    write_all(directory / "chart-everything.yaml", objects_of(render(EVERYTHING)))
    for overlay in OVERLAYS:
        write_all(
            directory / f"kustomize-{overlay}.yaml",
            kustomize_build(K8S_DIR / "overlays" / overlay),
        )
    command = [
        *uv_tool_run(CHECKOV), "checkov",
        "--directory", str(directory),
        "--framework", "kubernetes",
        "--output", "json",
        "--compact",
        "--skip-download",  # no calls to the vendor platform
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        skip_or_fail(f"checkov could not run: {error}")
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        skip_or_fail(
            f"checkov produced no report (exit {result.returncode}): {result.stderr[-2000:]}"
        )
    reports = report if isinstance(report, list) else [report]
    kubernetes = [r for r in reports if r.get("check_type") == "kubernetes"]
    assert kubernetes, f"checkov ran no Kubernetes checks: {result.stdout[:2000]}"
    return dict(kubernetes[0])


def test_checkov_scanned_every_rendering(scan: dict[str, Any]) -> None:
    summary = scan["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] >= 100, summary
    scanned = {Path(c["file_path"]).name for c in scan["results"]["passed_checks"]}
    expected = {f"chart-{name}.yaml" for name in value_sets()} | {"chart-everything.yaml"}
    expected |= {f"kustomize-{overlay}.yaml" for overlay in OVERLAYS}
    assert expected <= scanned


def test_checkov_finds_nothing_unjustified(scan: dict[str, Any]) -> None:
    unjustified = []
    for failure in scan["results"]["failed_checks"]:
        allowed = ALLOWED.get(failure["check_id"])
        file, resource = Path(failure["file_path"]).name, failure["resource"]
        if allowed is None or not allowed.applies(file, resource):
            unjustified.append(f"{failure['check_id']} {failure['check_name']}: {file} {resource}")
    assert not unjustified, "\n".join(sorted(unjustified))


def test_every_allowance_is_still_needed(scan: dict[str, Any]) -> None:
    # A justification nothing needs any more is removed, so the list stays the truth.
    used = {failure["check_id"] for failure in scan["results"]["failed_checks"]}
    assert set(ALLOWED) <= used, f"no longer needed: {sorted(set(ALLOWED) - used)}"


def test_production_values_pass_the_digest_check(scan: dict[str, Any]) -> None:
    passed = {
        (Path(c["file_path"]).name, c["resource"])
        for c in scan["results"]["passed_checks"]
        if c["check_id"] == "CKV_K8S_43"
    }
    assert ("chart-production-values.yaml", f"Deployment.fastapi-app.{FULLNAME}") in passed
