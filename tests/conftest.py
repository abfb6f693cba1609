"""Shared fixtures and the policy for optional stacks.

Markers: ``training`` (torch + mmcv ops + mmengine + mmdet), ``slurm`` (the local cluster that
``scripts/slurm-cluster.sh up`` starts), ``browser`` (headless Chromium). Off CI a test whose stack
is missing is skipped with the reason; in CI (``CI`` set) it fails loudly instead, so a broken
install can never pass as green.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def _missing_training_stack() -> str | None:
    for mod in ("torch", "mmengine", "mmcv", "mmdet"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (run scripts/setup.sh)"
    try:
        from mmcv.ops import nms  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"mmcv has no compiled ops ({exc}); run scripts/setup.sh"
    return None


def _missing_browser() -> str | None:
    for exe in ("chromium", "chromium-browser"):
        if shutil.which(exe):
            return None
    return "chromium is not installed (apt-get install chromium)"


_STACK_CHECKS = {"training": _missing_training_stack, "browser": _missing_browser}
_stack_cache: dict = {}


def _stack_problem(marker: str) -> str | None:
    if marker not in _stack_cache:
        _stack_cache[marker] = _STACK_CHECKS[marker]()
    return _stack_cache[marker]


def pytest_runtest_setup(item):
    for marker in _STACK_CHECKS:
        if item.get_closest_marker(marker) is None:
            continue
        problem = _stack_problem(marker)
        if problem:
            if IN_CI:
                pytest.fail(f"CI must have the {marker} stack: {problem}", pytrace=False)
            pytest.skip(problem)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local Slurm cluster, brought up (idempotently) by the project's script."""
    script = REPO / "scripts" / "slurm-cluster.sh"
    proc = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = f"local Slurm cluster is not available:\n{proc.stdout}\n{proc.stderr}"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return {"partition": "gpulab02", "qos": "gpulab02"}


@pytest.fixture
def cli_env(tmp_path):
    """Environment for running the ssflctl console script in a subprocess."""
    env = dict(os.environ)
    env["SSFLCTL_WORKSPACE"] = str(tmp_path / "ws")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args, env=None, cwd=None, timeout=600):
    """Run ``python -m ssflctl.cli ARGS`` and return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "ssflctl.cli", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
    )
