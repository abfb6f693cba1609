"""Issue 20.7 and 20.10 without a cluster: a workspace that cannot be created is one line naming
the path; a garbage or truncated registry is kept aside and rebuilt from the run directories (the
Slurm versions, with jobs in the queue, are in tests/test_crash_consistency.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import submit_light_job as light
from conftest import REPO
from ssflctl.control import submit as submit_mod
from registry_damage import fold_wal  # noqa: E402  (tests/)

pytestmark = pytest.mark.unit
TESTS = Path(__file__).resolve().parent
EXP = """\
name: wsfault
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [focal, ssfl]
  seed: [1]
params: {{max_epochs: 1, classes: [car]}}
resources: {{cpus: 1, mem: 1G, time: "00:10:00"}}
executor: {{type: local}}
"""


def _cli(*args, user=None, cwd=None, light_job=False):
    """The command line (as user nobody when asked); ``light_job``: the real CLI with the LIGHT
    stand-in job (tests/crash_driver.py: no data needed)."""
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    pre = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if user == "nobody" else []
    cmd = [str(TESTS / "crash_driver.py")] if light_job else ["-m", "ssflctl.cli"]
    return subprocess.run([*pre, sys.executable, *cmd, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd or "/", timeout=120)


def _one_error_line(proc, path):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], lines
    return lines[0]


@pytest.fixture
def exp(tmp_path):
    (tmp_path / "data").mkdir()
    p = tmp_path / "wsfault.yaml"
    p.write_text(EXP.format(root=tmp_path / "data"))
    return p


def test_workspace_that_cannot_be_created_is_one_line_with_the_path(tmp_path, exp):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory\n")
    for ws in (blocker, blocker / "ws"):  # a file where the workspace (or a parent) should be
        line = _one_error_line(_cli("submit", exp, "--workspace", ws, light_job=True), ws)
        assert "cannot create the workspace" in line, line


def test_workspace_in_a_directory_the_user_may_not_write_is_one_line(exp):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a command as another user")
    root = Path(tempfile.mkdtemp(prefix="ssflctl-nows-", dir="/tmp"))
    try:
        root.chmod(0o755)  # root's: user nobody may read but not write it
        (root / "data").mkdir()
        spec = root / "wsfault.yaml"
        spec.write_text(EXP.format(root=root / "data"))
        spec.chmod(0o644)
        probe = _cli("--version", user="nobody")
        if probe.returncode != 0:
            pytest.skip(f"user nobody cannot run {sys.executable}: {probe.stderr.strip()[-200:]}")
        ws = root / "ws" / "deeper"
        line = _one_error_line(_cli("submit", spec, "--workspace", ws, user="nobody", light_job=True), ws)
        assert "cannot create the workspace" in line and "Permission denied" in line, line
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def done_ws(tmp_path, exp, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "0.05")
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    submit_mod.submit(exp, ws, fns=light.FNS, render=light.light_render)
    assert light.wait_states(ws, "wsfault") == {"done"}
    return ws


@pytest.mark.parametrize("how", ["garbage", "truncated", "emptied", "deleted"])
def test_damaged_registry_is_rebuilt_in_one_line_never_an_empty_state(done_ws, exp, how):
    ws = done_ws
    path = ws / "registry.sqlite"
    fold_wal(path)
    if how == "garbage":
        path.write_bytes(os.urandom(8192))
    elif how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 3)
    elif how == "emptied":
        path.write_bytes(b"")
    else:
        path.unlink()
    proc = _cli("status", "--json", "--workspace", ws)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and str(path) in notes[0], notes
    if " was damaged (" in notes[0]:
        aside = notes[0].split("kept it as ")[1].split(";")[0]
        assert (ws / aside).is_file() and "rebuilt the registry from 2 run directories" in notes[0], notes
    runs = json.loads(proc.stdout)
    assert [r["state"] for r in runs] == ["done", "done"], runs
    # the next submit sends nothing again (the runs are done), and the registry is sound now
    res = submit_mod.submit(exp, ws, fns=light.FNS, render=light.light_render)
    assert res.submitted == []
    proc = _cli("status", "--workspace", ws)
    assert proc.returncode == 0 and "note:" not in proc.stderr, proc.stderr


def test_damaged_registry_a_reader_who_cannot_write_gets_one_line(done_ws):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a command as another user")
    ws = done_ws
    (ws / "registry.sqlite").write_bytes(b"garbage" * 1000)
    for p in (ws.parent, ws, *ws.rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    proc = _cli("status", "--workspace", ws, user="nobody")
    if "cannot run" in proc.stderr or "No module named" in proc.stderr:
        pytest.skip(proc.stderr[-200:])
    line = _one_error_line(proc, ws / "registry.sqlite")
    assert "damaged" in line, line
