"""What an install provides: the library only (ComfyUI has its own top-level `nodes` module)."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile

from conftest import ROOT


def test_wheel_contains_only_the_library(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"emocast_core"}
    assert "emocast_core/configs/full.json" in names and "emocast_core/configs/tiny.json" in names
    assert "emocast_core/models/denoising_unet.py" in names


def test_dependencies_have_lower_bounds_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        assert "==" not in dep and "<" not in dep, dep
        assert ">=" in dep, dep
    assert {"dev", "train", "selftest"} <= set(project["optional-dependencies"])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = [line for line in ci.splitlines() if "pytest" in line][0].strip()
    assert command in readme
