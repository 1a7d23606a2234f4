"""The installable package: a wheel built from the checkout holds every file the package reads,
and runs from a directory that is not the checkout (no `configs/`, no `../shared/data`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PACKAGE = REPO / "src" / "chatretriever"

pytestmark = pytest.mark.slow


def _package_files() -> set[str]:
    """Every file of the source package (what a wheel must carry), as wheel names."""
    out = set()
    for f in PACKAGE.rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
            out.add(f.relative_to(PACKAGE.parent).as_posix())
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (no build/ of an earlier build leaks in)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("checkout")
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(
        PACKAGE, src / "src" / "chatretriever", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    done = subprocess.run(
        [*cmd, "-w", str(out), str(src)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("chatretriever-*.whl")
    return built


def test_wheel_carries_every_file_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_package_files() - names)
    assert not missing, f"left out of the wheel (pyproject package-data): {missing[:20]}"
    # the data files the code opens by path are among them
    for name in (
        "chatretriever/methods/rationale/esconv-split.json",
        "chatretriever/apps/server/static/app.js",
        "chatretriever/assets/chatretriever-smol/adapter_model.safetensors",
    ):
        assert name in names


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    code = (
        "import chatretriever, sys; from chatretriever.methods.rationale import tasks;"
        "print(chatretriever.__file__); print(tasks.SHIPPED_SPLIT.is_file())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    where, split_found = done.stdout.split()
    assert Path(where).is_relative_to(site) and split_found == "True"
    # the CLI's defaults find the shipped split; only the data it names is missing here
    done = subprocess.run(
        [sys.executable, "-m", "chatretriever", "esconv-tasks", "--out", "o"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "ESConv data directory ../shared/data/esconv" in done.stderr, done.stderr
    assert "--data-dir" in done.stderr and not (work / "o").exists()
