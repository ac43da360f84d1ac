"""The Renovate config (.github/renovate.json): valid against Renovate's schema, and it covers what
must be kept current: the Python lock, the Dockerfile's base (both stages and the base.name label
in one PR), the workflows' actions and the chart's PgBouncer image (with k8s/base's copy)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit import UV_SYNC, require_binary

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PATH = ROOT / ".github" / "renovate.json"
DOCKERFILE = ROOT / ".docker" / "Dockerfile"
VALUES = ROOT / "charts" / "fastapi-app" / "values.yaml"
KUSTOMIZATION = ROOT / "k8s" / "base" / "kustomization.yaml"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(CONFIG_PATH.read_text())
    return loaded


def renovate_regex(pattern: str) -> re.Pattern[str]:
    """A Renovate regex (re2 with JavaScript's (?<name>...) groups; /.../ around file
    patterns) as a Python one."""
    if pattern.startswith("/") and pattern.endswith("/"):
        pattern = pattern[1:-1]
    return re.compile(pattern.replace("(?<", "(?P<"))


def rules_for(config: dict[str, Any], manager: str) -> list[dict[str, Any]]:
    return [rule for rule in config["packageRules"] if manager in rule.get("matchManagers", [])]


def from_images() -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)


def test_valid_against_renovates_schema() -> None:
    tool = require_binary("check-jsonschema", hint=UV_SYNC)
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.renovate", str(CONFIG_PATH)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_python_lock_is_updated_and_maintained(config: dict[str, Any]) -> None:
    assert "pep621" in config["enabledManagers"], "the manager that reads pyproject.toml + uv.lock"
    assert (ROOT / "uv.lock").is_file()
    assert config["lockFileMaintenance"]["enabled"] is True
    strategies = {rule.get("rangeStrategy") for rule in rules_for(config, "pep621")}
    assert "update-lockfile" in strategies, "updates land in uv.lock, the ranges stay"


def test_both_dockerfile_stages_and_the_base_label_move_in_one_group(
    config: dict[str, Any],
) -> None:
    assert "dockerfile" in config["enabledManagers"]
    images = from_images()
    assert len(images) >= 2, "builder and runtime"
    names = {image.split(":")[0] for image in images}
    assert names == {"python"}
    (current,) = {image.split(":")[1].split("@")[0] for image in images}

    # The label is not a FROM line: a regex manager finds it, with the version of the FROMs.
    (label_manager,) = [m for m in config["customManagers"] if m["customType"] == "regex"]
    assert any(
        renovate_regex(pattern).search(str(DOCKERFILE.relative_to(ROOT)))
        for pattern in label_manager["managerFilePatterns"]
    )
    found = [
        match.groupdict()
        for pattern in label_manager["matchStrings"]
        for match in renovate_regex(pattern).finditer(DOCKERFILE.read_text())
    ]
    assert found == [{"depName": "python", "currentValue": current}]

    grouped = [
        rule
        for rule in config["packageRules"]
        if "python" in rule.get("matchPackageNames", []) and "groupName" in rule
    ]
    assert len(grouped) == 1
    (rule,) = grouped
    assert {"dockerfile", "custom.regex"} <= set(rule["matchManagers"])
    # Patch releases of the same minor and variant only (the tests pin python:3.11.x-slim-bookworm).
    assert renovate_regex(rule["allowedVersions"]).match(current)
    assert not renovate_regex(rule["allowedVersions"]).match("3.12.0-slim-bookworm")
    assert not renovate_regex(rule["allowedVersions"]).match(current.replace("bookworm", "trixie"))


def test_the_actions_are_bumped_and_stay_pinned_to_commits(config: dict[str, Any]) -> None:
    assert "github-actions" in config["enabledManagers"]
    assert "helpers:pinGitHubActionDigests" in config["extends"]
    assert any("groupName" in rule for rule in rules_for(config, "github-actions"))


def test_the_charts_pgbouncer_image_is_bumped_with_k8s_bases_copy(config: dict[str, Any]) -> None:
    values = yaml.safe_load(VALUES.read_text())
    image = values["pgbouncer"]["image"]
    # helm-values finds an image by its repository and tag keys.
    assert image["repository"]
    assert image["tag"]
    kustomize_images = yaml.safe_load(KUSTOMIZATION.read_text())["images"]
    copies = [i for i in kustomize_images if i.get("newName") == image["repository"]]
    assert copies, "k8s/base ships the same PgBouncer image"
    assert {copy["newTag"] for copy in copies} == {image["tag"]}

    assert {"helm-values", "kustomize"} <= set(config["enabledManagers"])
    (rule,) = [
        rule
        for rule in config["packageRules"]
        if image["repository"] in rule.get("matchPackageNames", []) and "groupName" in rule
    ]
    assert {"helm-values", "kustomize"} <= set(rule["matchManagers"])
    assert rule.get("enabled", True)
