"""render.yaml, read the way Render reads it: the web service, its variables, resolved values.

Values Render supplies (``sync: false`` prompts, ``generateValue``, ``fromService``) are
replaced by realistic stand-ins, so the result can be fed to ``Settings`` as production would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BLUEPRINT = REPO / "render.yaml"

# What an operator pastes at the prompt, or Render generates: shaped like the real thing.
STAND_INS = {
    "DATABASE_URL": "postgres://app:pw@ep-calm-river-123456-pooler.us-east-2.aws.neon.tech/app?sslmode=require&channel_binding=require",
    "DATABASE_MIGRATION_URL": "postgres://app:pw@ep-calm-river-123456.us-east-2.aws.neon.tech/app?sslmode=require",
    "SENTRY_DSN": "",
    "GATEWAY_SHARED_SECRET_PREVIOUS": "",
}
GENERATED_SECRET = "r3nd3r-g3n3r4t3d-256-b1t-b4s364-v4lu3xxxxxx="  # 44 chars, like Render's
KEYVALUE_URL = "redis://red-d0abc123:6379"


def blueprint() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(BLUEPRINT.read_text())
    return document


def web_service(document: dict[str, Any]) -> dict[str, Any]:
    (service,) = [s for s in document["services"] if s["type"] == "web"]
    return service


def env_entries(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Every variable the web service gets: its own and those of the groups it pulls in."""
    groups = {group["name"]: group["envVars"] for group in document.get("envVarGroups", [])}
    entries: list[dict[str, Any]] = []
    for entry in web_service(document)["envVars"]:
        if "fromGroup" in entry:
            entries.extend(groups[entry["fromGroup"]])
        else:
            entries.append(entry)
    return entries


def resolved_env(document: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in env_entries(document):
        key = entry["key"]
        if "value" in entry:
            env[key] = str(entry["value"])
        elif entry.get("generateValue"):
            env[key] = GENERATED_SECRET
        elif "fromService" in entry:
            env[key] = KEYVALUE_URL
        elif entry.get("sync") is False:
            env[key] = STAND_INS[key]
        else:
            raise AssertionError(f"{key}: no source Render understands")
    return env
