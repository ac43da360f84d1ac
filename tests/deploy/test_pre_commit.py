""".pre-commit-config.yaml: valid for pre-commit, and its hooks are the checks of `make lint` run
from the project's own .venv (ruff check, ruff format, mypy through `make typecheck`)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit import UV_SYNC, require_binary

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PATH = ROOT / ".pre-commit-config.yaml"


def hooks() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(CONFIG_PATH.read_text())
    return {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}


def test_pre_commit_accepts_the_config() -> None:
    tool = require_binary("pre-commit", hint=UV_SYNC)
    result = subprocess.run(
        [tool, "validate-config", str(CONFIG_PATH)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_hooks_are_the_lint_checks_on_the_locked_tools() -> None:
    found = hooks()
    assert {"ruff-check", "ruff-format", "mypy"} <= set(found)
    makefile = (ROOT / "Makefile").read_text()
    lint = makefile[makefile.index("\nlint:") : makefile.index("\ntypecheck:")]
    for hook_id, hook in found.items():
        assert hook["language"] == "system", f"{hook_id}: the .venv's tool, not a second copy"
        argv = shlex.split(hook["entry"])
        if argv[0] == "make":
            target = argv[-1]
            assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target
            assert re.search(rf"\$\(MAKE\) .*\b{target}$", lint, flags=re.MULTILINE), "make lint"
            assert hook["pass_filenames"] is False
        else:
            assert argv[0].startswith(".venv/bin/"), hook_id
            assert f"$(VENV)/bin/{Path(argv[0]).name} {argv[1]}" in lint, hook_id


def test_make_typecheck_covers_every_python_folder() -> None:
    makefile = (ROOT / "Makefile").read_text()
    typecheck = makefile[makefile.index("\ntypecheck:") :].split("\n\n")[0]
    checked = set(re.findall(r"\b((?:tests|tools|service)[\w/]*)", typecheck))
    folders = {
        str(path.parent.relative_to(ROOT))
        for top in ("tests", "tools")
        for path in (ROOT / top).rglob("*.py")
    }
    # `mypy` alone checks the packages of [tool.mypy] (service, tools) with their subfolders.
    covered = {f for f in folders if f in checked or f.split("/")[0] == "tools"}
    assert covered == folders, f"not type-checked: {sorted(folders - covered)}"
