"""The helpers every suite leans on: one meaning of CI, skip-or-fail, finding a binary, polling."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import testkit
from testkit import find_binary, require_binary, running_in_ci, skip_or_fail, wait_until


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", " true "])
def test_these_ci_values_mean_ci(value: str) -> None:
    assert running_in_ci({"CI": value})


@pytest.mark.parametrize("value", ["", "false", "0", "no"])
def test_these_do_not(value: str) -> None:
    assert not running_in_ci({"CI": value})
    assert not running_in_ci({})


def test_a_missing_requirement_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testkit, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="no frobnicator"):
        skip_or_fail("no frobnicator")
    with pytest.raises(pytest.fail.Exception, match="not-a-real-tool-7f3a is not installed"):
        require_binary("not-a-real-tool-7f3a")


def test_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testkit, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="no frobnicator"):
        skip_or_fail("no frobnicator")
    with pytest.raises(pytest.skip.Exception, match=r"\(uv sync installs it into \.venv\)"):
        require_binary("not-a-real-tool-7f3a", hint=testkit.UV_SYNC)


def test_the_venvs_own_tools_come_first_and_sbin_is_searched_without_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "")
    venv_ruff = Path(sys.executable).parent / "ruff"
    assert find_binary("ruff") == str(venv_ruff)
    shell = find_binary("sh")
    assert shell is not None
    assert os.access(shell, os.X_OK)
    assert find_binary("not-a-real-tool-7f3a") is None
    assert require_binary("not-a-real-tool-7f3a", path=shell) == shell


def test_wait_until_returns_the_first_truthy_value() -> None:
    answers = iter([None, False, RuntimeError("not up"), {"ready": True}])

    def condition() -> dict[str, bool] | bool | None:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_until(condition, timeout=30, interval=0) == {"ready": True}


def test_wait_until_names_what_it_waited_for_and_the_last_error() -> None:
    def never() -> None:
        raise ConnectionRefusedError("port closed")

    with pytest.raises(TimeoutError, match=r"the frobnicator: port closed"):
        wait_until(never, timeout=0.2, interval=0.01, what="the frobnicator")
