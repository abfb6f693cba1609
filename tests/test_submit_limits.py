"""Matrices larger than the scheduler allows (issue 15.4): split into arrays within MaxArraySize
(test arrays matched task for task), or refused at plan time with the number and the limit, the
runs left pending (never failed) with the reason.

The fake backend stands in for the plan; the Slurm test uses the real local cluster with an
injected MaxArraySize (the cluster is shared: its slurm.conf is not lowered for a test) and the
LIGHT job.
"""
import os
import subprocess
from pathlib import Path

import pytest

import submit_light_job as light
from ssflctl import backends
from ssflctl.backends import slurm_limits
from ssflctl.backends.base import Limits, capacity_problem, split_tasks
from ssflctl.control import submit as submit_mod
from ssflctl.errors import UserError
from ssflctl.registry.store import Registry

TESTS = Path(__file__).resolve().parent

EXP = """\
name: {name}
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  seed: {seeds}
params: {{max_epochs: 1}}
resources: {{gpus: 0, cpus: 1, mem: 500M, time: "00:10:00"}}
executor:
  type: {kind}
  slurm: {{partition: {partition}, qos: {qos}}}
"""


def experiment(tmp_path, name, n, kind="local", partition="p", qos="q"):
    (tmp_path / "data").mkdir(exist_ok=True)
    p = tmp_path / f"{name}.yaml"
    p.write_text(EXP.format(name=name, root=tmp_path / "data", seeds=list(range(n)), kind=kind,
                            partition=partition, qos=qos))
    return p


@pytest.fixture
def fake():
    backends.register("local", "ssflctl.backends.fake:FakeBackend")
    yield backends.get("local")
    backends.register("local", "ssflctl.backends.local:LocalBackend")


@pytest.mark.unit
def test_split_and_capacity_rules():
    tasks = [{"r": i, "res": "a" if i < 5 else "b"} for i in range(7)]
    arrays = split_tasks(tasks, lambda t: t["res"], 2)
    assert [[t["r"] for t in a] for a in arrays] == [[0, 1], [2, 3], [4], [5, 6]]
    assert split_tasks(tasks, lambda t: t["res"], None) == [tasks[:5], tasks[5:]]
    assert capacity_problem(1002, 1002, Limits(max_array_size=1001, max_job_count=10000)) is None
    msg = capacity_problem(600, 600, Limits(max_submit_jobs=1000, jobs_queued=10,
                                            submit_source="QOS gpulab02 (MaxSubmitJobsPerUser)"))
    assert "needs 1200 jobs (600 train + 600 test jobs)" in msg and "allows 1000 per user" in msg \
        and "10 of yours are in the queue (room for 990)" in msg
    msg = capacity_problem(6000, 0, Limits(max_job_count=10000, jobs_in_system=5000))
    assert "MaxJobCount is 10000 and it holds 5000 jobs now" in msg


@pytest.mark.unit
def test_limits_read_from_scontrol_sacctmgr_squeue(monkeypatch):
    answers = {
        "scontrol": "Configuration data as of x\nClusterName             = c1\nMaxArraySize            = 1001\n"
                    "MaxJobCount             = 10000\n",
        "squeue": "me|gpulab02|acct\nme|normal|acct\nother|gpulab02|acct\n",
        "assoc": "acct||normal|\nother||normal|50\n",
        "qos": "gpulab02|300\n",
    }

    def fake_run(cmd):
        key = "assoc" if "assoc" in cmd else "qos" if cmd[0] == "sacctmgr" else cmd[0]
        return answers[key], ""

    monkeypatch.setattr(slurm_limits, "_run", fake_run)
    monkeypatch.setattr(slurm_limits, "user", lambda: "me")
    lim = slurm_limits.read_limits({"qos": "gpulab02", "account": "acct"})
    assert (lim.max_array_size, lim.max_job_count, lim.jobs_in_system) == (1001, 10000, 3)
    assert (lim.max_submit_jobs, lim.jobs_queued) == (300, 1) and "QOS gpulab02" in lim.submit_source
    monkeypatch.setattr(slurm_limits, "_run", lambda cmd: (None, f"{cmd[0]} is not installed"))
    lim = slurm_limits.read_limits({})
    assert lim.max_array_size is None and "scontrol is not installed" in lim.notes[0]


@pytest.mark.unit
def test_fake_backend_splits_and_refuses_at_plan_time(tmp_path, monkeypatch, fake):
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = experiment(tmp_path, "big", 7)
    fake.scheduler_limits = Limits(max_array_size=3)
    dry = submit_mod.submit(path, ws, dry_run=True, preflight=False)
    assert dry.arrays == [3, 3, 1] and dry.problems == []
    assert any("7 runs go out as 3 train arrays of at most 3 tasks" in w for w in dry.warnings)
    res = submit_mod.submit(path, ws, fns=light.FNS, render=light.light_render)
    assert [len(a) for a in fake.submitted[-1]["arrays"]] == [3, 3, 1]
    assert len({p.job_id.split("_")[0] for p in res.submitted}) == 3

    # more jobs than the user may have in the queue: refused before anything is rendered
    path = experiment(tmp_path, "toobig", 5)
    fake.scheduler_limits = Limits(max_array_size=3, max_submit_jobs=12, jobs_queued=4,
                                   submit_source="QOS q (MaxSubmitJobsPerUser)")
    dry = submit_mod.submit(path, ws, dry_run=True, preflight=False)
    (problem,) = dry.problems
    assert "needs 10 jobs (5 train + 5 test jobs)" in problem and "allows 12 per user" in problem
    rendered = []
    with pytest.raises(UserError) as err:
        submit_mod.submit(path, ws, fns=light.FNS, render=lambda *a, **k: rendered.append(a))
    assert str(err.value) == problem and rendered == []
    with Registry(ws) as reg:
        runs = reg.list_runs("toobig")
    assert len(runs) == 5
    assert {r["state"] for r in runs} == {"pending"}
    assert all(r["reason"].startswith("not submitted: fake: this submission needs 10 jobs") for r in runs)
    assert not any(list((ws / "runs" / r["run_id"]).glob("attempt-*")) for r in runs)


@pytest.mark.slurm
def test_slurm_splits_a_matrix_at_an_injected_max_array_size(tmp_path, monkeypatch, slurm_cluster):
    """7 light runs with MaxArraySize 3 injected: 3 train arrays (3+3+1) and 3 test arrays, each
    test task afterok... aftercorr on its own train task; the real limits are read and named."""
    real = slurm_limits.read_limits(slurm_cluster)
    assert real.max_array_size and real.max_array_size >= 3 and real.max_job_count  # read from the cluster
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "0.1")
    monkeypatch.setenv("LIGHT_JOB_STEPS", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(slurm_limits, "read_limits",
                        lambda options: Limits(max_array_size=3, max_job_count=real.max_job_count,
                                               jobs_in_system=real.jobs_in_system))
    ws = tmp_path / "ws"
    path = experiment(tmp_path, "split", 7, kind="slurm", **slurm_cluster)
    res = submit_mod.submit(path, ws, fns=light.FNS, render=light.light_render)
    assert res.arrays == [3, 3, 1]
    train = [p.job_id for p in res.submitted]
    test = [p.test_job_id for p in res.submitted]
    arrays = lambda ids: [[j for j in ids if j.split("_")[0] == b]  # noqa: E731
                          for b in dict.fromkeys(j.split("_")[0] for j in ids)]
    train_arrays, test_arrays = arrays(train), arrays(test)
    assert [len(a) for a in train_arrays] == [3, 3, 1] and [len(a) for a in test_arrays] == [3, 3, 1]
    # test task i of each test array waits for task i of its own train array (aftercorr; afterok for a
    # single job), as slurmctld has it
    for tr, te in zip(train_arrays, test_arrays):
        assert [train.index(j) for j in tr] == [test.index(j) for j in te]
        out = subprocess.run(["scontrol", "show", "job", te[0]], capture_output=True, text=True).stdout
        dep = next((w for w in out.split() if w.startswith("Dependency=")), "Dependency=?")
        base = tr[0].split("_")[0]
        want = f"aftercorr:{base}_*" if len(tr) > 1 else f"afterok:{base}"
        assert dep.startswith(f"Dependency={want}(") or dep == "Dependency=(null)", out  # (null): already met
    sub = ws / "submissions" / res.submission_id
    scripts = [p.read_text() for p in sorted(sub.glob("group*/train/*_submission.sh"))]
    assert len(scripts) == 3 and sum("--array=0-2" in s for s in scripts) == 2
    subprocess.run(["scancel", *{j.split("_")[0] for j in train + test}], capture_output=True)


@pytest.mark.slurm
def test_slurm_dry_run_plans_1002_seeds_against_the_real_max_array_size(tmp_path, monkeypatch, slurm_cluster):
    """The issue's case, planned only (1002 light jobs would load the shared cluster): the real
    MaxArraySize is read and the dry run names the split."""
    real = slurm_limits.read_limits(slurm_cluster)
    assert real.max_array_size and real.max_array_size < 1002, "this test needs MaxArraySize < 1002"
    monkeypatch.chdir(tmp_path)
    path = experiment(tmp_path, "huge", 1002, kind="slurm", **slurm_cluster)
    res = submit_mod.submit(path, tmp_path / "ws", dry_run=True, preflight=False)
    size = real.max_array_size
    assert res.arrays == [size] * (1002 // size) + ([1002 % size] if 1002 % size else [])
    assert res.problems == [] and any(f"1002 runs go out as {len(res.arrays)} train arrays of at most {size}" in w
                                      for w in res.warnings)
