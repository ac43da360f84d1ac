"""Every alert of the chart's PrometheusRule links its runbook: a ``runbook_url`` annotation
pointing at a heading of docs/runbooks.md that exists (GitHub's anchor of the heading)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import find, render

pytestmark = pytest.mark.deploy

RUNBOOKS = Path(__file__).resolve().parents[2] / "docs" / "runbooks.md"
DEFAULT_BASE = "https://github.com/example/fastapi-app/blob/main/docs/runbooks.md"
# Every alert rendered: the backup alerts exist only with backup.enabled.
ALL_ALERTS: dict[str, Any] = {
    "metrics": {"prometheusRule": {"enabled": True}},
    "backup": {"enabled": True},
}


def alert_rules(values: dict[str, Any]) -> list[dict[str, Any]]:
    rule = find(render(values), "PrometheusRule").obj
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, spaces to '-', punctuation other
    than '-' and '_' dropped); enough for headings that are alert names."""
    anchors = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
        anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_alert_links_its_runbook_entry() -> None:
    alerts = alert_rules(ALL_ALERTS)
    assert len(alerts) >= 11
    anchors = github_anchors(RUNBOOKS.read_text())
    for rule in alerts:
        url = rule["annotations"].get("runbook_url")
        assert url == f"{DEFAULT_BASE}#{rule['alert'].lower()}", rule["alert"]
        assert url.partition("#")[2] in anchors, f"docs/runbooks.md has no entry {rule['alert']}"


def test_every_runbook_entry_is_an_alert() -> None:
    # No entry outlives its alert: the page's second-level headings are exactly the alerts.
    headings = re.findall(r"^## (\S+)\s*$", RUNBOOKS.read_text(), flags=re.MULTILINE)
    assert sorted(headings) == sorted(r["alert"] for r in alert_rules(ALL_ALERTS))


def test_runbook_base_url_is_configurable() -> None:
    values = {
        "metrics": {
            "prometheusRule": {"enabled": True, "runbookBaseUrl": "https://wiki.example/runbooks"}
        }
    }
    urls = {r["annotations"]["runbook_url"] for r in alert_rules(values)}
    assert "https://wiki.example/runbooks#fastapiappdatabaseunavailable" in urls
    assert all(url.startswith("https://wiki.example/runbooks#") for url in urls)


def test_runbook_anchor_rule_matches_github() -> None:
    assert github_anchors("## FastAPIAppHighErrorRatio\n### Runbook: Foo bar\n") == {
        "fastapiapphigherrorratio",
        "runbook-foo-bar",
    }
