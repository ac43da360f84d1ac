"""The configuration contract: docs/configuration.md, the chart's config/secrets value schemas and
k8s/base/app.env are generated from Settings (scripts/config_contract.py) and must be current."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import Field, SecretStr

from service import configcontract
from service.settings import Settings, contract

ROOT = Path(__file__).resolve().parents[2]
ENV_NAMES = [name.upper() for name in Settings.model_fields]


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "config_contract", ROOT / "scripts" / "config_contract.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_generator()


def test_generated_files_are_current(generator: Any) -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, text in generator.generated().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"stale generated files {stale}: run `make config-contract` and commit them"


def test_the_reference_lists_every_setting_once() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \|", doc, flags=re.MULTILINE)
    assert rows == ENV_NAMES


def test_every_setting_has_a_description() -> None:
    undocumented = [name for name, f in Settings.model_fields.items() if not f.description]
    assert not undocumented, f"give these Settings fields a description: {undocumented}"


def test_every_setting_reaches_the_chart_somehow() -> None:
    schema = json.loads((ROOT / "charts/fastapi-app/values.schema.json").read_text())
    config = set(schema["properties"]["config"]["properties"])
    secrets = set(schema["properties"]["secrets"]["properties"])
    for variable in configcontract.variables():
        in_values = {"config": variable.name in config, "secrets": variable.name in secrets}
        if variable.values_block is None:
            # The chart sets it itself (or deliberately not): the column says how, and a user's
            # config key would fight the chart, so the schema refuses it.
            assert not any(in_values.values()), variable.name
            assert variable.chart, variable.name
            assert not variable.chart.startswith("`config."), variable.name
        else:
            assert in_values[variable.values_block], variable.name
        if variable.secret:
            assert variable.name not in config, f"{variable.name} is a secret, not config"


def test_app_env_holds_the_chart_defaults_and_only_settings(generator: Any) -> None:
    env = {}
    for line in (ROOT / "k8s/base/app.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    assert set(env) <= set(ENV_NAMES)
    chart = generator.chart_config()
    for key, value in chart.items():
        if key not in generator.KUSTOMIZE_BASE_ENV:
            assert env[key] == configcontract._env_value(value), key
    assert not any(configcontract.variables()[ENV_NAMES.index(k)].secret for k in env)


def test_a_new_field_needs_no_metadata() -> None:
    class Grown(Settings):
        widget_limit: int = Field(7, ge=1, le=9, description="How many widgets.")
        widget_token: SecretStr | None = Field(None, description="The widget service's token.")
        widget_mode: bool = Field(False, description="Widgets on.")
        widget_path: str = Field(
            "/w", description="Set by the chart.", json_schema_extra=contract(chart="`widgets`")
        )

    rows = {v.name: v for v in configcontract.variables(Grown)}
    assert rows["WIDGET_LIMIT"].values_block == "config"
    assert rows["WIDGET_LIMIT"].type == "integer (1 to 9)"
    assert rows["WIDGET_LIMIT"].default == "`7`"
    assert rows["WIDGET_TOKEN"].values_block == "secrets"
    assert rows["WIDGET_TOKEN"].secret
    assert rows["WIDGET_PATH"].values_block is None
    config = configcontract.values_schema_properties("config", Grown)
    assert config["WIDGET_LIMIT"] == {
        "type": ["integer", "string", "null"],
        "pattern": "^-?[0-9]+$",
        "minimum": 1,
        "maximum": 9,
        "description": "How many widgets.",
    }
    assert config["WIDGET_MODE"]["anyOf"][0] == {"type": "boolean"}
    assert "WIDGET_PATH" not in config
    secrets = configcontract.values_schema_properties("secrets", Grown)
    assert secrets["WIDGET_TOKEN"]["type"] == "string"


def test_types_defaults_and_bounds_come_from_the_fields() -> None:
    rows = {v.name: v for v in configcontract.variables()}
    assert rows["LOG_LEVEL"].values_schema["enum"] == [
        "DEBUG",
        "INFO",
        "WARNING",
        "ERROR",
        "CRITICAL",
        None,
    ]
    assert rows["DATABASE_CONNECT_TIMEOUT"].values_schema["exclusiveMinimum"] == 0
    assert rows["DATABASE_CONNECT_TIMEOUT"].values_schema["maximum"] == 60
    # A computed default is documented, never the value of the machine that generated the file.
    assert rows["WEB_CONCURRENCY"].default == "usable CPUs (2-64)"
    assert rows["JWT_ALGORITHMS"].default == "`HS256,RS256,ES256`"
    assert rows["DATABASE_URL"].secret
    assert rows["DATABASE_URL"].default == "unset"


def test_env_file_refuses_what_is_not_a_setting() -> None:
    with pytest.raises(ValueError, match="LOGLEVEL"):
        configcontract.env_file({"LOGLEVEL": "INFO"}, {}, "header")
