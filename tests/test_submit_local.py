"""Local executor: detached runner, resubmission, concurrency, interrupted submits, SIGHUP, cancel,
logs; and (marked `training`) one real tiny training run plus the YAML-injection check.

The matrix tests use the LIGHT stand-in job of tests/submit_light_job.py (about a second per run)
so they exercise launch/registry/reconcile quickly; the real job runs in `test_real_tiny_*`.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
import submit_light_job as light
from ssflctl.control import submit as submit_mod
from ssflctl.backends import local as local_mod
from ssflctl.registry.store import Registry

pytestmark = pytest.mark.unit
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
resources: {{cpus: 1, mem: 1G, time: "00:10:00"}}
executor:
  type: local
  local: {{max_parallel: 2}}
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "0.2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "synth").mkdir(parents=True)
    return tmp_path


def experiment(tmp_path, name="light", seeds="[1, 2, 3, 4]"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(EXP.format(name=name, root=tmp_path / "data" / "synth", seeds=seeds))
    return p


def do_submit(path, ws, **kw):
    return submit_mod.submit(path, ws, fns=light.FNS, render=light.light_render, **kw)


def wait_all(ws, exp, timeout=180, states=("done", "failed", "cancelled", "unknown")):
    from ssflctl.commands.status import view

    deadline = time.time() + timeout
    while True:
        with Registry(ws) as reg:
            items = view(reg, ws, exp)
        if all(i["state"] in states for i in items) or time.time() > deadline:
            return {i["run"]: i for i in items}
        time.sleep(0.5)


def wait_jobs_ended(ws, exp, timeout=60):
    """The files may settle a run while its process is still exiting; submit skips a run while a job
    of it may live (never two live train jobs for one run), so wait until the jobs have ended."""
    deadline = time.time() + timeout
    while any((i["scheduler"] or {}).get("kind") in ("queued", "held", "running", "unknown")
              for i in wait_all(ws, exp).values()) and time.time() < deadline:
        time.sleep(0.5)


def test_matrix_failure_and_resubmission(env):
    ws = env / "ws"
    path = experiment(env)
    (ws / "fail").mkdir(parents=True)
    (ws / "fail" / "ssfl-s3").write_text("")
    res = do_submit(path, ws)
    assert len(res.submitted) == 8 and len({p.job_id for p in res.submitted}) == 8
    with Registry(ws) as reg:  # submit returned before the jobs finished
        assert {r["state"] for r in reg.list_runs()} <= {"queued", "running"}
    items = wait_all(ws, "light")
    failed = [r for r, i in items.items() if i["state"] != "done"]
    assert len(failed) == 1 and failed[0].startswith("ssfl-s3-"), items
    assert items[failed[0]]["state"] == "failed" and "poisoned" in items[failed[0]]["note"]
    assert all(i["progress"] == "epoch 1/1 iter 3/3" for i in items.values())

    (ws / "fail" / "ssfl-s3").unlink()
    wait_jobs_ended(ws, "light")
    res2 = do_submit(path, ws)
    assert [p.run.run_id for p in res2.submitted] == failed
    assert all(p.why == "done" for p in res2.plan if p.action == "skip")
    items = wait_all(ws, "light")
    assert {i["state"] for i in items.values()} == {"done"}
    assert items[failed[0]]["attempt"] == 2
    res3 = do_submit(path, ws)
    assert res3.submitted == [] and res3.submission_id is None
    with Registry(ws) as reg:
        att = [a["state"] for a in reg.list_runs("light") if a["run_id"] == failed[0]][0]
        events = [(e["old_state"], e["new_state"]) for e in reg.events(failed[0])]
    assert ("running", "failed") in events or ("queued", "failed") in events
    assert ("failed", "submitting") in events


def test_resubmitting_an_attempt_stopped_from_outside_resumes_its_checkpoint(env):
    """A job stopped with no outcome but a checkpoint (time limit after its last requeue, node failure,
    a cancel): submitting again continues that attempt's checkpoint at its lr, not from scratch; an
    attempt that ended with an outcome (a failure, a NaN) is trained again as before."""
    ws = env / "ws"
    path = experiment(env, name="stopped", seeds="[1]")
    res = do_submit(path, ws)
    items = wait_all(ws, "stopped")
    assert {i["state"] for i in items.values()} == {"done"}
    stopped, failed = (p.run.run_id for p in res.submitted)
    wait_jobs_ended(ws, "stopped")
    # `stopped`: attempt 1 ran at lr 0.001 (after a NaN, say), saved epoch_3.pth, and was killed
    a1 = ws / "runs" / stopped / "attempt-1"
    for name in ("outcome.json", "metrics.json"):
        (a1 / name).unlink()
    meta = json.loads((a1 / "attempt.json").read_text())
    (a1 / "attempt.json").write_text(json.dumps(dict(meta, lr=0.001)))
    (a1 / "epoch_3.pth").write_bytes(b"weights")
    (a1 / "last_checkpoint").write_text(str(a1 / "epoch_3.pth"))
    # `failed`: its attempt ended with an outcome (the code raised): no resume
    f1 = ws / "runs" / failed / "attempt-1"
    (f1 / "metrics.json").unlink()
    out = json.loads((f1 / "outcome.json").read_text())
    (f1 / "outcome.json").write_text(json.dumps(dict(out, outcome="failed", reason="ValueError: boom")))
    (f1 / "epoch_1.pth").write_bytes(b"weights")
    (f1 / "last_checkpoint").write_text(str(f1 / "epoch_1.pth"))

    res2 = do_submit(path, ws)
    assert sorted(p.run.run_id for p in res2.submitted) == sorted([stopped, failed])
    a2 = json.loads((ws / "runs" / stopped / "attempt-2" / "attempt.json").read_text())
    assert a2["resume_from"] == str(a1 / "epoch_3.pth") and a2["lr"] == pytest.approx(0.001)
    assert a2["reason"].startswith("resubmitted (was failed") and a2["reason"].endswith(
        "; resumes attempt-1/epoch_3.pth at lr 0.001")
    f2 = json.loads((ws / "runs" / failed / "attempt-2" / "attempt.json").read_text())
    assert f2["resume_from"] is None and f2["lr"] == json.loads((f1 / "attempt.json").read_text())["lr"]
    items = wait_all(ws, "stopped")
    assert {i["state"] for i in items.values()} == {"done"}
    with Registry(ws) as reg:
        runs = {r["run_id"]: r for r in reg.list_runs("stopped")}
    att2 = runs[stopped]["attempts"][-1]
    assert att2["attempt"] == 2 and att2["lr"] == pytest.approx(0.001) and "resumes attempt-1" in att2["reason"]


def test_status_json_and_logs_cli(env):
    ws = env / "ws"
    do_submit(experiment(env, seeds="[1]"), ws)
    wait_all(ws, "light")
    proc = run_cli("status", "light", "--json", "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data) == 2 and {d["state"] for d in data} == {"done"}
    assert all(d["job"].startswith("local-") for d in data)
    proc = run_cli("status", "--workspace", ws)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0].startswith("run\tloss\tdataset")
    run_id = data[0]["run"]
    proc = run_cli("logs", run_id[:8], "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    assert f"light job log for {run_id}" in proc.stdout
    proc = run_cli("status", "light", "--watch", "--interval", "0.5", "--workspace", ws, timeout=60)
    assert proc.returncode == 0 and run_id in proc.stdout  # all ended: --watch shows them once and returns
    proc = run_cli("status", "nosuch", "--workspace", ws)
    assert proc.returncode == 2 and "no experiment 'nosuch'" in proc.stderr


_CONCURRENT = """
import sys, time, json
import submit_light_job as light
from ssflctl.control import submit
t0 = float(sys.argv[3])
while time.time() < t0:
    time.sleep(0.001)
r = submit.submit(sys.argv[1], sys.argv[2], fns=light.FNS, render=light.light_render)
print(json.dumps([p.run.run_id for p in r.submitted]))
"""


def test_two_submits_at_once_submit_each_run_once(env):
    ws = env / "ws"
    path = experiment(env)
    t0 = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(path), str(ws), str(t0)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lists = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(lists[0] + lists[1]) == sorted(set(lists[0] + lists[1]))  # nothing twice
    assert len(lists[0] + lists[1]) == 8
    items = wait_all(ws, "light")
    assert {i["state"] for i in items.values()} == {"done"}
    with Registry(ws) as reg:
        for run in reg.list_runs("light"):
            assert len(run["attempts"]) == 1
            assert sum(1 for e in reg.events(run["run_id"]) if e["kind"] == "submitted") == 1


_KILLED = """
import sys, time, json
import submit_light_job as light
from ssflctl.control import submit
def hang(*a, **k):
    print("claimed", flush=True)
    time.sleep(600)
submit.submit(sys.argv[1], sys.argv[2], fns=light.FNS, render=hang)
"""


def test_submit_killed_between_claim_and_launch(env):
    ws = env / "ws"
    path = experiment(env, seeds="[1]")
    p = subprocess.Popen([sys.executable, "-c", _KILLED, str(path), str(ws)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "claimed"
    p.kill()
    p.wait()
    with Registry(ws) as reg:
        assert {r["state"] for r in reg.list_runs()} == {"submitting"}
    res = do_submit(path, ws)  # the dead claim is detected and the runs are sent again
    assert len(res.submitted) == 2
    assert all("interrupted" in p.why for p in res.submitted)
    items = wait_all(ws, "light")
    assert {i["state"] for i in items.values()} == {"done"}


def test_cancel_experiment_kills_processes(env, monkeypatch):
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "30")
    ws = env / "ws"
    path = experiment(env, seeds="[1, 2]")
    res = do_submit(path, ws)
    sub = next((ws / "submissions").iterdir())
    deadline = time.time() + 60
    while time.time() < deadline and sum(
            json.loads((sub / "tasks" / f"{i}.json").read_text())["state"] == "running" for i in range(4)) < 2:
        time.sleep(0.2)
    pids = [json.loads((sub / "tasks" / f"{i}.json").read_text()).get("pid") for i in range(4)]
    running = [p for p in pids if p]
    assert len(running) == 2
    proc = run_cli("cancel", "light", "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    assert "cancelled 4 runs" in proc.stdout
    items = wait_all(ws, "light", timeout=60, states=("cancelled",))
    assert {i["state"] for i in items.values()} == {"cancelled"}
    deadline = time.time() + 30
    while time.time() < deadline and any(local_mod.pid_alive(p) for p in running):
        time.sleep(0.2)
    assert not any(local_mod.pid_alive(p) for p in running)
    with Registry(ws) as reg:
        assert all(any(e["kind"] == "cancel" for e in reg.events(r.run.run_id)) for r in res.submitted)
    # cancelled runs are submitted again by the next submit
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "0.1")
    assert len(do_submit(path, ws).submitted) == 4
    items = wait_all(ws, "light")
    assert {i["state"] for i in items.values()} == {"done"}


# ----------------------------------------------------------------------------------------------
# the real job (training stack)
# ----------------------------------------------------------------------------------------------

@pytest.mark.training
def test_yaml_injection_stays_an_inert_string(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    evil = "x'); import os; os.system('touch PWNED') #"
    p = tmp_path / "evil.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: evil
        template: retinanet_tiny
        datasets:
          d: {{root: {tmp_path / 'data'}}}
        matrix:
          loss: [focal]
          model.bbox_head.loss_cls.reduction: ["{evil}"]   # a string argument of FocalLoss (plan-time checked)
        params: {{classes: ["{evil}", "car"]}}
        """))
    from ssflctl.plan import render
    from ssflctl.plan import spec
    from ssflctl.atomic import write_json

    run = spec.expand(spec.load(p))[0]
    rdir = tmp_path / "ws" / "runs" / run.run_id
    write_json(rdir / "run.json", run.run_json())
    adir = render.render_attempt(rdir, 1)
    from mmengine.config import Config

    cfg = Config.fromfile(str(adir / "config.py"))
    assert cfg.model.bbox_head.loss_cls.reduction == evil
    assert evil in list(cfg.train_dataloader.dataset.metainfo["classes"])
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


@pytest.mark.training
def test_real_tiny_training_run_survives_sighup(tmp_path):
    """The real job (render + job.train_and_test) through the CLI from a shell that is then hung up."""
    from ssflctl.convert import synth_coco

    data = tmp_path / "data" / "synth"
    synth_coco.generate(data, n_train=8, n_val=4)
    p = tmp_path / "real.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: real
        template: retinanet_tiny
        datasets:
          synth: {{root: {data}}}
        matrix:
          loss: [focal]
          seed: [0]
          lr: [0.01]
        params: {{max_epochs: 1, batch_size: 4, log_interval: 1}}
        resources: {{cpus: 1, mem: 2G, time: "00:20:00"}}
        executor: {{type: local, local: {{max_parallel: 1}}}}
        """))
    ws = tmp_path / "ws"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = f"{sys.executable} -m ssflctl.cli submit {p} --workspace {ws}; echo submitted; sleep 300"
    shell = subprocess.Popen(["setsid", "bash", "-c", cmd], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=tmp_path)
    out = "".join(iter(shell.stdout.readline, "submitted\n"))
    assert "submitted 1 run" in out, out
    os.killpg(os.getpgid(shell.pid), signal.SIGHUP)
    shell.wait(timeout=30)
    items = wait_all(ws, "real", timeout=600)
    (item,) = items.values()
    assert item["state"] == "done", item
    assert item["progress"].startswith("epoch 1/1") and isinstance(item["loss_val"], float)
    rdir = ws / "runs" / item["run"] / "attempt-1"
    metrics = json.loads((rdir / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox"]["AP"] <= 1.0
    for name in ("config.py", "provenance.json", "attempt.json", "outcome.json", "progress.json"):
        assert (rdir / name).exists(), name
    proc = run_cli("logs", item["run"], "--workspace", ws)
    assert proc.returncode == 0 and "Epoch(train)" in proc.stdout and "Epoch(test)" in proc.stdout


def test_local_gpu_slots(env, monkeypatch):
    """Two GPUs, three 1-GPU runs, max_parallel 3: each run sees one device of its own, never shared."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "0.5")
    ws = env / "ws"
    path = env / "gpu.yaml"
    path.write_text(EXP.format(name="gpu", root=env / "data" / "synth", seeds="[1, 2]")
                    .replace("resources: {cpus: 1", "resources: {gpus: 1, cpus: 1")
                    .replace("max_parallel: 2", "max_parallel: 4")
                    .replace("[focal, ssfl]", "[focal]") .replace("seed: [1, 2]", "seed: [1, 2, 3]"))
    res = do_submit(path, ws)
    assert len(res.submitted) == 3
    items = wait_all(ws, "gpu")
    assert {i["state"] for i in items.values()} == {"done"}
    envs = [json.loads((ws / "runs" / r / "attempt-1" / "env.json").read_text()) for r in items]
    assert all(e["CUDA_VISIBLE_DEVICES"] in ("0", "1") for e in envs)
    for a in envs:  # runs that overlapped in time had different devices
        for b in envs:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["CUDA_VISIBLE_DEVICES"] != b["CUDA_VISIBLE_DEVICES"]
