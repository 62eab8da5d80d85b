"""The code base stays ruff-clean (lint and format), so the test command also guards style."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from helpers import PROJECT_ROOT


def ruff() -> list[str]:
    found = shutil.which("ruff", path=str(PROJECT_ROOT / ".venv" / "bin")) or shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    return [found]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command: list[str]) -> None:
    result = subprocess.run([*ruff(), *command, "."], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_imports_cleanly_and_exposes_its_api(tmp_path) -> None:
    code = "import lightning_memopt as m; print(m.__version__, *sorted(m.__all__))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "TokenClassificationModule" in result.stdout and "EntityF1" in result.stdout
    assert list(tmp_path.iterdir()) == []  # importing writes nothing
