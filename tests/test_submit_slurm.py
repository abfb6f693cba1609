"""Slurm executor on the real local cluster (scripts/slurm-cluster.sh): one train array per
submission (one sbatch call), dependent test array, status/resubmission, SIGHUP, cancel.

The 8-run matrix runs the REAL job (the tiny RetinaNet template, one iteration on 4 synthetic
images, then its test job). The other scenarios (SIGHUP, cancel, refusal, adoption) are about the
scheduler plumbing and use the LIGHT stand-in job (tests/submit_light_job.py), which writes the same
attempt files in about a second.
"""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
import submit_light_job as light
from ssflctl.control import submit as submit_mod
from ssflctl.registry.store import Registry

pytestmark = pytest.mark.slurm
TESTS = Path(__file__).resolve().parent

EXP = """\
name: {name}
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [focal, ssfl]
  seed: {seeds}
params: {{max_epochs: 1}}
resources: {{gpus: 0, cpus: 1, mem: 500M, time: "00:10:00"}}
executor:
  type: slurm
  slurm:
    partition: {partition}
    qos: {qos}
    array_parallelism: 4
"""


@pytest.fixture
def env(tmp_path, monkeypatch, slurm_cluster):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "0.2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "synth").mkdir(parents=True)
    return tmp_path


def experiment(tmp_path, cluster, name="slurmlight", seeds="[1, 2, 3, 4]"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(EXP.format(name=name, root=tmp_path / "data" / "synth", seeds=seeds, **cluster))
    return p


def do_submit(path, ws, **kw):
    return submit_mod.submit(path, ws, fns=light.FNS, render=light.light_render, **kw)


def wait_all(ws, exp, timeout=300, states=("done", "failed", "cancelled", "unknown")):
    from ssflctl.commands.status import view

    deadline = time.time() + timeout
    while True:
        with Registry(ws) as reg:
            items = view(reg, ws, exp)
        if all(i["state"] in states for i in items) or time.time() > deadline:
            return {i["run"]: i for i in items}
        time.sleep(2)


def sacct(*ids):
    out = subprocess.run(["sacct", "-j", ",".join(ids), "-X", "-n", "-P", "-o", "JobID,State,JobName"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


@pytest.mark.training
def test_matrix_one_array_dependent_tests_resubmit(env, slurm_cluster):
    """8 real tiny runs: one train array (one sbatch call) + one dependent test array."""
    from ssflctl.convert import synth_coco

    synth_coco.generate(env / "data" / "synth", n_train=4, n_val=2, seed=0)
    ws = env / "ws"
    path = experiment(env, slurm_cluster, name="slurmmatrix")
    path.write_text(path.read_text().replace("params: {max_epochs: 1}",
                                             "params: {max_epochs: 1, batch_size: 4, log_interval: 1}")
                    .replace("mem: 500M", "mem: 2G"))
    res = submit_mod.submit(path, ws)
    assert len(res.submitted) == 8
    train = [p.job_id for p in res.submitted]
    test = [p.test_job_id for p in res.submitted]
    # one sbatch call for the train jobs: one array, tasks 0..7; the tests are one dependent array
    assert len({j.split("_")[0] for j in train}) == 1
    assert sorted(int(j.split("_")[1]) for j in train) == list(range(8))
    assert len({j.split("_")[0] for j in test}) == 1 and set(test).isdisjoint(train)
    sub = ws / "submissions" / res.submission_id
    assert len(list((sub / "train").glob("*_submission.sh"))) == 1
    script = next((sub / "test").glob("*_submission.sh")).read_text()
    assert f"--dependency=aftercorr:{train[0].split('_')[0]}" in script
    assert "--array=0-7%4" in next((sub / "train").glob("*_submission.sh")).read_text()

    items = wait_all(ws, "slurmmatrix", timeout=900)
    assert {i["state"] for i in items.values()} == {"done"}, items
    assert {i["job"] for i in items.values()} == set(train)
    for rid in items:  # the real job: an mmengine checkpoint, then COCO metrics from the test job
        adir = ws / "runs" / rid / "attempt-1"
        metrics = json.loads((adir / "metrics.json").read_text())
        assert metrics["checkpoint"] == "epoch_1.pth" and 0.0 <= metrics["bbox"]["AP"] <= 1.0
    # the registry says done when metrics.json is there; the test job's process may still be exiting
    deadline = time.time() + 60
    while {row[1] for row in sacct(train[0].split("_")[0], test[0].split("_")[0])} != {"COMPLETED"} \
            and time.time() < deadline:
        time.sleep(1)
    assert {row[1] for row in sacct(train[0].split("_")[0], test[0].split("_")[0])} == {"COMPLETED"}

    proc = run_cli("status", "slurmmatrix", "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    rows = [ln.split("\t") for ln in proc.stdout.splitlines()[1:]]
    assert len(rows) == 8 and {r[6] for r in rows} == {"done"} and {r[7] for r in rows} == set(train)

    res2 = submit_mod.submit(path, ws)  # second submit: nothing
    assert res2.submitted == [] and {p.why for p in res2.plan} == {"done"}

    # make one run fail: its results disappear -> failed -> the third submit sends exactly it
    victim = res.submitted[5].run.run_id
    (ws / "runs" / victim / "attempt-1" / "metrics.json").unlink()
    proc = run_cli("status", "--json", "--workspace", ws)
    states = {d["run"]: d["state"] for d in json.loads(proc.stdout)}
    assert states[victim] == "failed" and list(states.values()).count("done") == 7
    res3 = submit_mod.submit(path, ws)
    assert [p.run.run_id for p in res3.submitted] == [victim]
    assert res3.submitted[0].attempt == 2 and res3.submitted[0].job_id not in train
    items = wait_all(ws, "slurmmatrix", timeout=600)
    assert {i["state"] for i in items.values()} == {"done"}
    assert items[victim]["attempt"] == 2 and items[victim]["job"] == res3.submitted[0].job_id


def test_cancel_run_scancels_train_and_test(env, slurm_cluster, monkeypatch):
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "60")
    ws = env / "ws"
    path = experiment(env, slurm_cluster, name="cancelme", seeds="[1]")
    res = do_submit(path, ws)
    target = res.submitted[0]
    proc = run_cli("cancel", target.run.run_id, "--workspace", ws)
    assert proc.returncode == 0 and "cancelled 1 run" in proc.stdout, proc.stderr
    proc = run_cli("cancel", "cancelme", "--workspace", ws)  # the rest of the experiment
    assert proc.returncode == 0 and "cancelled 1 run" in proc.stdout, proc.stderr
    deadline = time.time() + 60
    while time.time() < deadline:
        st = {r[0]: r[1].split()[0] for r in sacct(*[p.job_id for p in res.submitted])}
        if set(st.values()) == {"CANCELLED"}:
            break
        time.sleep(1)
    assert set(st.values()) == {"CANCELLED"}, st
    items = wait_all(ws, "cancelme", timeout=30, states=("cancelled",))
    assert {i["state"] for i in items.values()} == {"cancelled"}


def test_sbatch_refusal_is_one_line_and_recorded(env, slurm_cluster):
    ws = env / "ws"
    path = experiment(env, dict(slurm_cluster, partition="nosuchpartition"), name="refused", seeds="[1]")
    from ssflctl.errors import UserError

    with pytest.raises(UserError) as err:
        do_submit(path, ws)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "sbatch refused" in msg and "partition" in msg
    with Registry(ws) as reg:
        runs = reg.list_runs("refused")
    # never "failed": nothing ran; the runs are unsubmitted with the reason, and no attempt is spent
    assert len(runs) == 2 and {r["state"] for r in runs} == {"pending"}
    assert all(r["job_id"] is None and r["reason"].startswith("not submitted: sbatch refused") for r in runs)
    assert not list((ws / "runs").glob("*/attempt-*"))


@pytest.mark.training
def test_real_tiny_run_on_slurm(tmp_path, slurm_cluster, monkeypatch):
    """The real job functions (ssflctl.node.job.train_run / test_run, pickled by submitit) on the cluster."""
    import textwrap

    from ssflctl.convert import synth_coco

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "synth"
    synth_coco.generate(data, n_train=8, n_val=4)
    p = tmp_path / "real.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: realslurm
        template: retinanet_tiny
        datasets:
          synth: {{root: {data}}}
        matrix:
          loss: [focal]
          seed: [0]
        params: {{max_epochs: 1, batch_size: 4, log_interval: 1}}
        resources: {{gpus: 0, cpus: 1, mem: 3G, time: "00:20:00"}}
        executor:
          type: slurm
          slurm: {{partition: {slurm_cluster['partition']}, qos: {slurm_cluster['qos']}}}
        """))
    ws = tmp_path / "ws"
    proc = run_cli("submit", p, "--workspace", ws, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    items = wait_all(ws, "realslurm", timeout=900)
    (item,) = items.values()
    assert item["state"] == "done", item
    assert item["job"] and item["test_job"] and item["job"] != item["test_job"]
    metrics = json.loads((ws / "runs" / item["run"] / "attempt-1" / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox"]["AP"] <= 1.0


def test_no_test_step_submits_only_the_train_array(env, slurm_cluster):
    ws = env / "ws"
    path = experiment(env, slurm_cluster, name="notest", seeds="[1]")
    path.write_text(path.read_text() + "test: false\n")
    res = do_submit(path, ws)
    assert len(res.submitted) == 2 and all(p.test_job_id is None for p in res.submitted)
    assert not (ws / "submissions" / res.submission_id / "test").exists()
    items = wait_all(ws, "notest")
    assert {i["state"] for i in items.values()} == {"done"}
    assert not any((ws / "runs" / r / "attempt-1" / "metrics.json").exists() for r in items)
