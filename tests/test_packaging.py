"""The package builds as a wheel with its console script and the lab inside."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import ROOT


def test_wheel_builds_with_lab_and_entry_point(tmp_path: Path) -> None:
    # From a copy: setuptools builds in the source tree, and a build/ left
    # in the checkout is one more thing left behind (and one a user who
    # does not own the checkout cannot write).
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".hypothesis", "hypothesis-db", ".mypy_cache",
        ".ruff_cache", ".pytest_cache"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("netpass-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "netpass/lab/prober.py" in names and "netpass/cli.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "netpass = netpass.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
