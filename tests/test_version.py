"""One version, in one place: `asyncweights._version`, which pyproject.toml reads for the
distribution, `asyncweights.__version__` re-exports and ``asyncweights --version`` prints."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import asyncweights as aw
from asyncweights import _version

ROOT = Path(__file__).resolve().parent.parent
# PEP 440's public version (no local part): N(.N)*[{a|b|rc}N][.postN][.devN].
PEP440 = re.compile(r"[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?")


def test_pyproject_takes_the_version_from_the_version_module() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    path = project["tool"]["hatch"]["version"]["path"]
    assert path == "src/asyncweights/_version.py"
    # Hatch's default pattern for a version file: one `__version__ = "..."` line.
    text = (ROOT / path).read_text(encoding="utf-8")
    found = re.findall(r"(?m)^__version__ *= *([\"'])v?(.+?)\1", text)
    assert [v for _, v in found] == [aw.__version__]


def test_the_version_is_one_pep_440_string_everywhere() -> None:
    assert isinstance(aw.__version__, str)
    assert PEP440.fullmatch(aw.__version__), aw.__version__
    assert aw.__version__ is _version.__version__
    assert _version.__all__ == ["__version__"]
    # The installed distribution's metadata (pip install -e . reads the same file).
    assert importlib.metadata.version("asyncweights") == aw.__version__


def test_the_version_module_imports_nothing_of_the_package() -> None:
    """Any module can import `_version` without importing the package back (no cycle)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('v', {str(ROOT / 'src/asyncweights/_version.py')!r})\n"  # noqa: E501
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(module.__version__, sorted(m for m in sys.modules if 'asyncweights' in m))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{aw.__version__} []\n"


def test_the_cli_prints_the_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncweights", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"asyncweights {aw.__version__}\n"
