"""The package a user installs: ``python -m build`` makes a wheel and an sdist that
``twine check`` accepts, and a clean venv holding only that wheel (and what it depends on,
from the package registry) runs ``budgeter --version`` and the local stack."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from budgeter.store.shared_redis import SharedRedis
from tests.system.test_up import up_stack_and_sdk_example

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str | Path, timeout_s: float = 600, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, f"{argv}: rc {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the dev venv's setuptools (no download of a build environment)
    log = _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ".")
    assert "deprecated" not in log.lower(), log
    return out


@pytest.fixture(scope="module")
def wheel_venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    wheel = next(dist.glob("budgeter-*.whl"))
    # pip from the dev venv installs into the clean one: only the wheel and its dependencies
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", wheel)
    yield venv


def test_wheel_and_sdist_pass_twine_check(dist: Path) -> None:
    files = sorted(p.name for p in dist.iterdir())
    assert any(f.endswith(".whl") for f in files) and any(f.endswith(".tar.gz") for f in files)
    out = _run(sys.executable, "-m", "twine", "check", "--strict", *dist.iterdir())
    assert out.count("PASSED") == 2, out


def test_wheel_carries_the_lua_scripts_the_page_and_the_license(dist: Path) -> None:
    wheel = next(dist.glob("budgeter-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = {str(p.relative_to(ROOT)) for p in (ROOT / "budgeter" / "lua").rglob("*.lua")}
    assert lua and lua <= names
    assert "budgeter/api/status_page.html" in names
    assert "budgeter/py.typed" in names
    assert any(n.endswith("licenses/LICENSE") for n in names), sorted(names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: MIT" in text


def test_the_installed_command_runs_from_a_clean_venv(wheel_venv: Path, tmp_path: Path) -> None:
    out = _run(wheel_venv / "bin" / "budgeter", "--help", cwd=tmp_path)
    assert "usage: budgeter" in out
    version = _run(wheel_venv / "bin" / "budgeter", "--version", cwd=tmp_path)
    assert version.strip() == "budgeter 0.1.0"


def test_the_wheel_alone_runs_budgeter_up_and_the_sdk_example(
    wheel_venv: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    try:
        up_stack_and_sdk_example([str(wheel_venv / "bin" / "budgeter")], tmp_path, data_dir)
    finally:
        SharedRedis(data_dir).stop()
