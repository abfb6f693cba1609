"""One scenario, every backend: what must hold whichever scheduler runs the jobs (issue 13: the
local and Slurm tests share their scenarios, parametrised by backend). The Slurm cases run on the
real local cluster (scripts/slurm-cluster.sh); the jobs are the LIGHT stand-in (tests/submit_light_job.py).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
import submit_light_job as light
from ssflctl.control import submit as submit_mod
from ssflctl.registry.store import Registry

TESTS = Path(__file__).resolve().parent
BACKENDS = [pytest.param("local", marks=pytest.mark.unit), pytest.param("slurm", marks=pytest.mark.slurm)]

EXP = """\
name: {name}
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [focal, ssfl]
  seed: [1]
params: {{max_epochs: 1}}
resources: {{gpus: 0, cpus: 1, mem: 500M, time: "00:10:00"}}
executor:
  type: {backend}
  slurm: {{partition: gpulab02, qos: gpulab02, array_parallelism: 4}}
  local: {{max_parallel: 2}}
"""


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path, monkeypatch):
    if request.param == "slurm":
        request.getfixturevalue("slurm_cluster")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "0.2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "synth").mkdir(parents=True)
    return request.param


def experiment(tmp_path, backend, name):
    p = tmp_path / f"{name}.yaml"
    p.write_text(EXP.format(name=name, root=tmp_path / "data" / "synth", backend=backend))
    return p


def wait_all(ws, exp, timeout=300, states=("done", "failed", "cancelled", "unknown")):
    from ssflctl.commands.status import view

    deadline = time.time() + timeout
    while True:
        with Registry(ws) as reg:
            items = view(reg, ws, exp)
        if all(i["state"] in states for i in items) or time.time() > deadline:
            return {i["run"]: i for i in items}
        time.sleep(1)


_SHELL = "{py} -c 'import sys, submit_light_job as L; from ssflctl.control import submit; " \
         "submit.submit(sys.argv[1], sys.argv[2], fns=L.FNS, render=L.light_render)' {exp} {ws}; " \
         "echo submitted; sleep 300"


def test_sighup_to_the_submitting_shell_leaves_jobs_running(backend, tmp_path, monkeypatch):
    """Closing the terminal or losing the SSH link (SIGHUP to the shell's process group) after
    `ssflctl submit` returned never stops the runs."""
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "1.0")
    ws = tmp_path / "ws"
    path = experiment(tmp_path, backend, "hup")
    shell = subprocess.Popen(["setsid", "bash", "-c", _SHELL.format(py=sys.executable, exp=path, ws=ws)],
                             stdout=subprocess.PIPE, text=True)
    assert shell.stdout.readline().strip() == "submitted"
    deadline = time.time() + 120
    while time.time() < deadline:  # the hangup arrives while a job is running
        items = wait_all(ws, "hup", timeout=0)
        if any(i["state"] == "running" for i in items.values()):
            break
        time.sleep(0.3)
    os.killpg(os.getpgid(shell.pid), signal.SIGHUP)
    shell.wait(timeout=30)
    assert shell.returncode != 0  # the shell itself died of the hangup
    items = wait_all(ws, "hup")
    assert {i["state"] for i in items.values()} == {"done"}


_KILLED_AFTER_LAUNCH = """
import sys, time
import submit_light_job as light
from ssflctl import backends
from ssflctl.control import submit
backend = backends.get(sys.argv[3])
real = backend.submit
def launch_then_hang(*a, **k):
    real(*a, **k)
    print("launched", flush=True)
    time.sleep(600)
backend.submit = launch_then_hang
submit.submit(sys.argv[1], sys.argv[2], fns=light.FNS, render=light.light_render)
"""


def test_submit_killed_after_launch_adopts_the_jobs(backend, tmp_path):
    """A submit killed between sending the jobs and recording them: the next submit finds the jobs
    (the backend's recover) instead of sending them twice, and they finish."""
    ws = tmp_path / "ws"
    path = experiment(tmp_path, backend, "adopt")
    p = subprocess.Popen([sys.executable, "-c", _KILLED_AFTER_LAUNCH, str(path), str(ws), backend],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "launched"
    p.kill()
    p.wait()
    res = submit_mod.submit(path, ws, fns=light.FNS, render=light.light_render)
    assert res.submitted == [] and all(x.why.startswith(("queued", "running", "done")) for x in res.plan), \
        [x.why for x in res.plan]
    items = wait_all(ws, "adopt")
    assert {i["state"] for i in items.values()} == {"done"}
    assert len(list((ws / "submissions").iterdir())) == 1
    with Registry(ws) as reg:
        assert all(any(e["kind"] == "recovered" for e in reg.events(r["run_id"])) for r in reg.list_runs())
    jobs = sorted(i["job"] for i in items.values())
    if backend == "slurm":  # one array: the same base id, tasks 0 and 1
        assert len({j.split("_")[0] for j in jobs}) == 1 and [j.split("_")[1] for j in jobs] == ["0", "1"]


# test cells (test_matrix): a killed submit's test jobs adopted; cancel reaches them
TEST_MATRIX = "test_matrix:\n  model.test_cfg.score_thr: [0.05, 0.5]\n"
FNS_TC = dict(light.FNS, test_cell="test_test_matrix:light_test_cell")


def wait_cells(ws, exp, timeout=300, states=("done", "failed", "cancelled", "unknown")):
    """Until every run and test cell of ``exp`` is in ``states``; {test id: its status item}."""
    from ssflctl.commands.status import view

    deadline = time.time() + timeout
    while True:
        with Registry(ws) as reg:
            items = view(reg, ws, exp)
        cells = {t["test"]: t for i in items for t in i["tests"]}
        if all(s in states for s in [i["state"] for i in items] + [t["state"] for t in cells.values()]) \
                or time.time() > deadline:
            return cells
        time.sleep(1)


_KILLED_AFTER_TESTS = """
import sys, time
import submit_light_job as light
from ssflctl import backends
from ssflctl.control import submit
backend = backends.get(sys.argv[3])
real = backend.submit_tests
def send_then_hang(*a, **k):
    real(*a, **k)
    print("sent", flush=True)
    time.sleep(600)
backend.submit_tests = send_then_hang
submit.submit(sys.argv[1], sys.argv[2], fns=dict(light.FNS, test_cell="test_test_matrix:light_test_cell"),
              render=light.light_render)
"""


def test_submit_killed_after_sending_the_test_cells_adopts_them(backend, tmp_path):
    """A submit killed between sending the test-cell jobs and recording them: the next submit finds
    them (the backend's recover_tests) instead of sending them twice, and they finish."""
    ws = tmp_path / "ws"
    path = experiment(tmp_path, backend, "adopttc")
    path.write_text(path.read_text() + TEST_MATRIX)
    p = subprocess.Popen([sys.executable, "-c", _KILLED_AFTER_TESTS, str(path), str(ws), backend],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "sent"
    p.kill()
    p.wait()
    with Registry(ws) as reg:
        assert {r["state"] for r in reg.test_rows("adopttc")} == {"submitting"}
    res = submit_mod.submit(path, ws, fns=FNS_TC, render=light.light_render)
    assert res.submitted == [] and res.tests_submitted == [] and len(res.tests) == 4
    assert all(t.why.startswith(("queued", "running", "done")) for t in res.tests), [t.why for t in res.tests]
    cells = wait_cells(ws, "adopttc")
    assert {t["state"] for t in cells.values()} == {"done"}, cells
    (sid,) = [d.name for d in (ws / "submissions").iterdir()]
    sent = ws / "submissions" / sid / "tests"
    if backend == "slurm":  # one sbatch for the test cells, ever
        assert len(list(sent.glob("*_submission.sh"))) == 1
    with Registry(ws) as reg:
        rows = reg.test_rows("adopttc")
        assert all(any(e["kind"] == "recovered" and r["test_id"] in (e["message"] or "")
                       for e in reg.events(r["run_id"])) for r in rows)
        assert reg.submission(sid)["info"]["test_jobs"] == {r["test_id"]: r["job_id"] for r in rows}


def test_cancel_reaches_the_test_cells(backend, tmp_path, monkeypatch):
    """`ssflctl cancel EXP` cancels the runs' train jobs and their test cells' jobs (which wait for
    them), and says so."""
    from conftest import run_cli

    monkeypatch.setenv("LIGHT_JOB_SLEEP", "30")
    ws = tmp_path / "ws"
    path = experiment(tmp_path, backend, "canceltc")
    path.write_text(path.read_text() + TEST_MATRIX)
    res = submit_mod.submit(path, ws, fns=FNS_TC, render=light.light_render)
    train = sorted(p.job_id for p in res.submitted)
    tests = sorted(t.job_id for t in res.tests_submitted)
    assert len(train) == 2 and len(tests) == 4
    proc = run_cli("cancel", "canceltc", "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    runs_line, cells_line = proc.stdout.strip().splitlines()
    assert runs_line.startswith("cancelled 2 runs: ") and sorted(runs_line.split("(jobs ")[1][:-1].split()) == train
    assert cells_line.startswith("cancelled 4 test cells: ")
    assert sorted(cells_line.split("(jobs ")[1][:-1].split()) == tests
    cells = wait_cells(ws, "canceltc", timeout=60, states=("cancelled",))
    assert {t["state"] for t in cells.values()} == {"cancelled"}, cells
    from ssflctl import backends
    from ssflctl.backends import ALIVE
    from ssflctl.control import testcells

    with Registry(ws) as reg:  # the scheduler agrees: none of them may still run
        refs = [testcells.job_ref(reg, r) for r in reg.test_rows("canceltc")]
    deadline = time.time() + 60
    while True:
        st = backends.get(backend).query(refs)
        if not any(s.kind in ALIVE for s in st.values()) or time.time() > deadline:
            break
        time.sleep(1)
    assert not any(s.kind in ALIVE for s in st.values()), st
