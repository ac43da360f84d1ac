"""The configuration contract, derived from ``Settings``: one row per environment variable.

``Settings`` is the only hand-kept list of variables. The configuration reference
(docs/configuration.md), the chart's ``config``/``secrets`` value schemas and the plain manifests'
env file (k8s/base/app.env) are generated from these rows by ``scripts/config_contract.py``
(``make config-contract``), and a test fails when a generated file is stale.

Where a variable goes is read from the field: a ``SecretStr`` is a ``secrets`` key of the chart,
anything else a ``config`` key, unless the field's ``contract(chart=...)`` metadata says the
chart sets it some other way (see ``service.settings.contract``). A new field needs nothing here.
"""

from __future__ import annotations

import enum
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from service.settings import Settings

ValuesBlock = Literal["config", "secrets"]

# JSON schema fragments the chart accepts for a value: Helm values arrive as YAML, so numbers and
# booleans may also be written as strings ("30", "true"), and null leaves the key out.
_INTEGER = {"type": ["integer", "string", "null"], "pattern": "^-?[0-9]+$"}
_NUMBER = {"type": ["number", "string", "null"], "pattern": "^[0-9]+(\\.[0-9]+)?$"}
_BOOLEAN = {"anyOf": [{"type": "boolean"}, {"enum": ["true", "false"]}, {"type": "null"}]}
_STRING = {"type": ["string", "null"]}


@dataclass(frozen=True)
class Variable:
    """One environment variable of the service, as operators and the chart see it."""

    name: str
    type: str
    default: str
    secret: bool
    description: str
    values_block: ValuesBlock | None
    chart: str
    values_schema: dict[str, Any]


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is Literal:
        return [str(arg) for arg in typing.get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    return None


def _bounds(field: FieldInfo) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            bounds["minimum"] = item.ge
        elif isinstance(item, annotated_types.Gt):
            bounds["exclusiveMinimum"] = item.gt
        elif isinstance(item, annotated_types.Le):
            bounds["maximum"] = item.le
        elif isinstance(item, annotated_types.Lt):
            bounds["exclusiveMaximum"] = item.lt
    return bounds


def _bounds_text(bounds: Mapping[str, Any]) -> str:
    low = bounds.get("minimum", bounds.get("exclusiveMinimum"))
    high = bounds.get("maximum", bounds.get("exclusiveMaximum"))
    if low is not None and high is not None:
        above = "above " if "exclusiveMinimum" in bounds else ""
        return f" ({above}{low} to {high})"
    if low is not None:
        return f" ({'>' if 'exclusiveMinimum' in bounds else '>='} {low})"
    if high is not None:
        return f" (<= {high})"
    return ""


def _type_and_schema(field: FieldInfo, secret: bool) -> tuple[str, dict[str, Any]]:
    annotation, _ = _unwrap_optional(field.annotation)
    bounds = _bounds(field)
    choices = _choices(annotation)
    if secret:
        return "string", {"type": "string"}
    if choices is not None:
        return "one of " + ", ".join(f"`{c}`" for c in choices), {"enum": [*choices, None]}
    if annotation is bool:
        return "boolean", dict(_BOOLEAN)
    if annotation is int:
        return "integer" + _bounds_text(bounds), {**_INTEGER, **bounds}
    if annotation is float:
        return "number" + _bounds_text(bounds), {**_NUMBER, **bounds}
    if typing.get_origin(annotation) is list:
        return "comma list", dict(_STRING)
    if annotation is Path:
        return "path", dict(_STRING)
    return "string", dict(_STRING)


def _is_secret(field: FieldInfo) -> bool:
    annotation, _ = _unwrap_optional(field.annotation)
    return annotation is SecretStr


def _default_text(field: FieldInfo, documented: object) -> str:
    if isinstance(documented, str):
        return documented
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`{','.join(map(str, value))}`" if value else "empty"
    if value == "":
        return "empty"
    return f"`{value}`"


def variables(settings: type[BaseSettings] = Settings) -> list[Variable]:
    """Every variable ``settings`` reads, in the order the fields are declared."""
    rows = []
    for name, field in settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        env = name.upper()
        secret = _is_secret(field)
        type_text, schema = _type_and_schema(field, secret)
        extra_schema = extra.get("values_schema")
        if isinstance(extra_schema, dict):
            schema.update(extra_schema)
        description = (field.description or "").strip()
        if description:
            schema["description"] = description
        block_extra = extra.get("values_block")
        chart_text = extra.get("chart")
        block: ValuesBlock | None
        if block_extra in ("config", "secrets"):
            block = typing.cast(ValuesBlock, block_extra)
        elif chart_text is None:
            block = "secrets" if secret else "config"
        else:
            block = None
        rows.append(
            Variable(
                name=env,
                type=type_text,
                default=_default_text(field, extra.get("documented_default")),
                secret=secret,
                description=description,
                values_block=block,
                chart=str(chart_text) if chart_text is not None else f"`{block}.{env}`",
                values_schema=schema,
            )
        )
    return rows


def values_schema_properties(
    block: ValuesBlock, settings: type[BaseSettings] = Settings
) -> dict[str, Any]:
    """The ``properties`` of the chart's ``config`` or ``secrets`` value schema."""
    return {v.name: v.values_schema for v in variables(settings) if v.values_block == block}


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def env_file(
    chart_config: Mapping[str, object],
    overrides: Mapping[str, tuple[str, str]],
    header: str,
) -> str:
    """An env file: the chart's ``config`` defaults plus ``overrides`` (value, reason), in
    ``Settings`` order; a variable that is not a setting is refused."""
    known = {v.name for v in variables()}
    unknown = sorted((set(chart_config) | set(overrides)) - known)
    if unknown:
        raise ValueError(f"not Settings fields: {', '.join(unknown)}")
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for variable in variables():
        if variable.name in overrides:
            value, reason = overrides[variable.name]
            if reason:
                lines.append(f"# {reason}")
            lines.append(f"{variable.name}={value}")
        elif variable.name in chart_config and chart_config[variable.name] is not None:
            lines.append(f"{variable.name}={_env_value(chart_config[variable.name])}")
    return "\n".join(lines) + "\n"


_DOC_REFERENCE = re.compile(r"docs/([\w-]+\.md(?:#[\w-]+)?)")


def _cell(text: str) -> str:
    # The table lives in docs/ itself: a mention of another page becomes a relative link.
    text = _DOC_REFERENCE.sub(r"[\1](\1)", text)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(chart_config: Mapping[str, object]) -> str:
    """The reference table; ``chart_config`` (values.yaml ``config``) shows the chart's value."""
    lines = [
        "| Variable | Type | Default | Secret | Helm chart | Meaning |",
        "|---|---|---|---|---|---|",
    ]
    for v in variables():
        chart = v.chart
        if v.name in chart_config and chart_config[v.name] is not None:
            chart += f" = `{_env_value(chart_config[v.name])}`"
        lines.append(
            "| "
            + " | ".join(
                _cell(cell)
                for cell in (
                    f"`{v.name}`",
                    v.type,
                    v.default,
                    "yes" if v.secret else "",
                    chart,
                    v.description,
                )
            )
            + " |"
        )
    return "\n".join(lines) + "\n"
