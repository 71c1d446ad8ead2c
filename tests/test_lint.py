"""Static checks as tests: ruff, mypy and the import-linter contracts.

Each runs the tool over the repository (configuration in pyproject.toml) and
fails with the tool's own output, so `scripts/test` and CI count them with the
rest of the suite.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 280.0  # below pytest-timeout's 300s, so a hang reports the tool, not pytest


def _tool(name: str) -> str:
    """A console script from this interpreter's environment (the project's .venv)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found; run scripts/bootstrap", pytrace=False)
    return found


def _run(command: list[str]) -> None:
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode != 0:
        shown = " ".join([Path(command[0]).name, *command[1:]])
        pytest.fail(
            f"`{shown}` exited with {result.returncode}:\n{result.stdout}{result.stderr}",
            pytrace=False,
        )


def test_ruff() -> None:
    _run([_tool("ruff"), "check", "."])


def test_mypy() -> None:
    # Strict on dsl/ and engine/ through the overrides in pyproject.toml.
    _run([_tool("mypy"), "dsl", "engine", "codedance", "adapters"])


def test_import_contracts() -> None:
    _run([_tool("lint-imports"), "--no-logo"])
