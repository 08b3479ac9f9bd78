"""Packaging: typed, one version source, and the public helper module importable as promised."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import slimtune

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "slimtune"


def _setuptools_config() -> dict:
    """pyproject.toml as setuptools reads it when building (dynamic fields resolved)."""
    config = pytest.importorskip("setuptools.config.pyprojecttoml")
    return config.read_configuration(ROOT / "pyproject.toml")


def test_the_package_is_marked_typed_and_ships_the_marker():
    assert (PACKAGE / "py.typed").is_file()
    package_data = _setuptools_config()["tool"]["setuptools"]["package-data"]["slimtune"]
    assert "py.typed" in package_data


def test_one_version_source():
    """The built distribution's version is slimtune.__version__, with no second copy in pyproject."""
    config = _setuptools_config()
    assert "version" in config["project"].get("dynamic", []) or "version" in config["project"]
    assert config["project"]["version"] == slimtune.__version__
    text = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{slimtune.__version__}"' not in text


def test_testing_helpers_are_public_documented_and_torch_free():
    """slimtune.testing stays in the package as public API: listed, documented, numpy-only."""
    import slimtune.testing as testing

    assert testing.__all__
    for name in testing.__all__:
        value = getattr(testing, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            assert inspect.getdoc(value), f"slimtune.testing.{name} has no docstring"
    code = "import sys; sys.modules['torch'] = None; import slimtune.testing; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "ok", out.stderr[-500:]
