"""Issue 14.6: a colleague with read but not write access to the workspace. Run as a REAL other user
(``setpriv --reuid=nobody``): root ignores file modes, so chmod alone would prove nothing."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import submit_light_job as light
from conftest import REPO
from ssflctl.control import submit as submit_mod

pytestmark = pytest.mark.unit
TESTS = Path(__file__).resolve().parent
EXP = """\
name: ro
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [focal, ssfl]
  seed: [1]
params: {{max_epochs: 1}}
resources: {{cpus: 1, mem: 1G, time: "00:10:00"}}
executor: {{type: local}}
"""


def _as_nobody(*args, ws):
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                           "-m", "ssflctl.cli", *args, "--workspace", str(ws)], capture_output=True, text=True,
                          env=env, cwd="/", timeout=120)


@pytest.fixture
def readonly_ws(monkeypatch):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a command as another user")
    probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
                            "import typer, rich"], capture_output=True, text=True, timeout=60,
                           env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)})
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run {sys.executable}: {probe.stderr.strip()[-200:]}")
    root = Path(tempfile.mkdtemp(prefix="ssflctl-ro-", dir="/tmp"))
    try:
        (root / "data").mkdir()
        path = root / "ro.yaml"
        path.write_text(EXP.format(root=root / "data"))
        monkeypatch.chdir(root)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
        monkeypatch.setenv("LIGHT_JOB_SLEEP", "0.05")
        ws = root / "ws"
        submit_mod.submit(path, ws, fns=light.FNS, render=light.light_render)
        assert light.wait_states(ws, "ro", every=0.5) == {"done"}
        # readable by others, writable by its owner only (the default umask's 755/644, made explicit)
        for p in [root, *root.rglob("*")]:
            mode = p.stat().st_mode
            p.chmod((mode | stat.S_IRGRP | stat.S_IROTH | (stat.S_IXGRP | stat.S_IXOTH if p.is_dir() else 0))
                    & ~(stat.S_IWGRP | stat.S_IWOTH))
        yield ws
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _digest(ws):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ws.glob("registry.sqlite*")}


def test_read_only_workspace_status_and_report_work_and_write_nothing(readonly_ws):
    ws = readonly_ws
    before = _digest(ws)
    for args in (["status"], ["status", "--json"], ["report", "ro"]):
        proc = _as_nobody(*args, ws=ws)
        assert proc.returncode == 0, (args, proc.stderr)
        notes = [ln for ln in proc.stderr.splitlines() if "read-only for you" in ln]
        assert len(notes) == 1 and "nothing is written" in notes[0] and str(ws / "registry.sqlite") in notes[0]
        assert "Traceback" not in proc.stderr
    assert "done" in _as_nobody("status", ws=ws).stdout
    assert _digest(ws) == before


def test_read_only_workspace_a_refused_write_is_one_line_naming_the_path(readonly_ws):
    ws = readonly_ws
    proc = _as_nobody("cancel", "ro", ws=ws)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a UserError's exit code
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(ws / "registry.sqlite") in lines[0], lines
