"""Layout gates: no module shadows the standard library, and every entry point starts.

A module named like a stdlib one (``inspect.py``, ``bisect.py``) is imported instead of the
stdlib module whenever its folder is first on ``sys.path``, which happens when a file is run
directly; these tests catch that before a user does.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("optimizer", "passes")
MODULE_FILES = sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def shadowing_names(paths: list[pathlib.Path]) -> list[str]:
    """Modules and packages whose name is also a standard-library module's."""
    names = {path.stem if path.name != "__init__.py" else path.parent.name for path in paths}
    return sorted(names & set(sys.stdlib_module_names))


def test_no_module_or_package_shadows_the_standard_library() -> None:
    assert shadowing_names(MODULE_FILES) == []


def test_shadowing_names_finds_a_shadow(tmp_path: pathlib.Path) -> None:
    (tmp_path / "json").mkdir()
    paths = [tmp_path / "inspect.py", tmp_path / "json" / "__init__.py", tmp_path / "fine.py"]
    assert shadowing_names(paths) == ["inspect", "json"]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_cli_help_as_module() -> None:
    result = _run([sys.executable, "-m", "optimizer.cli", "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout


def test_cli_help_as_file() -> None:
    result = _run([sys.executable, "optimizer/cli.py", "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout


def test_console_script_help() -> None:
    script = shutil.which("onnx-compress", path=os.pathsep.join([str(pathlib.Path(sys.executable).parent),
                                                                 os.environ.get("PATH", "")]))
    if script is None:
        pytest.skip("onnx-compress is not installed in this environment")
    result = _run([script, "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout


@pytest.mark.parametrize("path", MODULE_FILES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_module_file_runs_without_import_error(path: pathlib.Path) -> None:
    """Running a module file directly puts its folder first on sys.path; it must not break imports."""
    result = _run([sys.executable, str(path)])
    assert "ImportError" not in result.stderr and "ModuleNotFoundError" not in result.stderr, result.stderr
