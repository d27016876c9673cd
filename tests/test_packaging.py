"""Packaging: the package list covers the tree, and a non-editable install finds the presets and the default model."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_package_list_covers_every_package_directory():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "edm_toolkit").rglob("__init__.py")}
    assert on_disk | {"edm_toolkit.preset_data"} == listed


def test_wheel_ships_presets_and_data(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 69:
        pytest.skip("setuptools >= 69 is needed to build the wheel without build isolation")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "out"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("edm_toolkit-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    probe = ("import edm_toolkit, edm_toolkit.presets as p; assert 'site' in edm_toolkit.__file__; "
             "print(p.builtin_presets(), p.load_preset('vp').sampling.nfe, edm_toolkit.ideal_model().data.shape[0], "
             "edm_toolkit.default_model().label_dim)")
    env = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['edm', 'iddpm', 've', 'vp'] 18 64 10"
