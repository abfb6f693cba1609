"""2-task jobs on the local Slurm cluster (``gpus: 2`` on the fake-GPU node, ``cpus: 2``): srun starts
two tasks, mmengine's ``slurm`` launcher, DDP over gloo on the CPU (no GPU here).

* ddp      the tiny RetinaNet trains on both ranks: identical parameters at the end (each rank writes
           a checksum), one metrics.json (the test job is one task), status done, world size 2.
* nan      a NaN injected on rank 1 only (tests/ddp_hooks.py): both ranks stop at the same iteration,
           one retry at lr × 0.1 inside the same allocation, done, well within the job's time limit.
* requeue  SIGUSR2 to every task (``scancel -s USR2``, as before a time limit): rank 0 notes it and
           requeues (submitit checkpoints on rank 0 only); both ranks resume from one checkpoint at
           the same lr.

The three jobs take the node's 2 CPUs each, so Slurm runs them one after another.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from ssflctl.control import submit as submit_mod
from ssflctl.registry.store import Registry

pytestmark = [pytest.mark.slurm, pytest.mark.training, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
LR = 0.01
#: long enough that the job is still training when the test signals it (on a quiet machine an epoch of
#: this tiny job takes well under a second: 40 epochs were over before the signal)
REQUEUE_EPOCHS = 200
EXP = """\
name: {name}
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [focal]
  seed: [0]
params: {{max_epochs: {epochs}, batch_size: 2, log_interval: 1, lr: {lr}, val_interval: 100, img_scale: [64, 64]}}
overrides:
  custom_imports: {{imports: [ddp_hooks], allow_failed_imports: false}}
  custom_hooks: [{hooks}]
resources: {{gpus: 2, cpus: 2, mem: 3G, time: "00:10:00"}}
retry: {{on_nan: lower_lr, factor: 0.1, max_attempts: 2}}
executor:
  type: slurm
  slurm: {{partition: {partition}, qos: {qos}}}
"""
CHECKSUM = "{type: WeightChecksumHook}"


def _view(ws, exp=None):
    from ssflctl.commands.status import view

    with Registry(ws) as reg:
        return view(reg, ws, exp)


def _wait_file(path: Path, timeout: float, what: str):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"timed out waiting for {what} ({path})"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, slurm_cluster, request):
    from ssflctl.convert import synth_coco

    tmp = tmp_path_factory.mktemp("ddp")
    synth_coco.generate(tmp / "data", n_train=8, n_val=4, seed=0)   # 2 ranks × 2 images: 2 iterations/epoch
    ws = tmp / "ws"
    specs = {
        "ddp": dict(epochs=2, hooks=CHECKSUM),
        "nan": dict(epochs=3, hooks="{type: InjectNanHook, rank: 1, iter: 3}, " + CHECKSUM),
        "requeue": dict(epochs=REQUEUE_EPOCHS, hooks=CHECKSUM),
    }
    # the jobs import this directory's ddp_hooks (custom_imports): they inherit the submitting environment
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    request.addfinalizer(mp.undo)
    t0 = time.time()
    runs = {}
    for key, kw in specs.items():
        p = tmp / f"ddp{key}.yaml"
        p.write_text(EXP.format(name=f"ddp{key}", root=tmp / "data", lr=LR, **kw, **slurm_cluster))
        res = submit_mod.submit(p, ws)
        (item,) = res.submitted
        runs[key] = {"run_id": item.run.run_id, "job_id": item.job_id, "run_dir": ws / "runs" / item.run.run_id,
                     "folder": ws / "submissions" / res.submission_id, "t_submit": time.time()}
    # requeue: after its second checkpoint, SIGUSR2 to every task of the job (as before a time limit)
    r = runs["requeue"]
    a1 = r["run_dir"] / "attempt-1"
    deadline = time.time() + 900
    # a checkpoint at epoch >= 2 (mmengine keeps only the newest ones) ... or a failed job, said at once
    while not any(int(p.stem.split("_")[1]) >= 2 for p in a1.glob("epoch_*.pth")):
        failed = {i["run"]: i["note"] for i in _view(ws) if i["state"] in ("failed", "unknown")}
        assert not failed, failed
        assert time.time() < deadline, "timed out waiting for the requeue job's second checkpoint"
        time.sleep(1)
    time.sleep(0.5)
    assert not (a1 / "outcome.json").exists(), "the requeue job finished before the test could signal it"
    subprocess.run(["scancel", "-s", "USR2", r["job_id"]], check=True)
    r["signalled_at"] = time.time()
    deadline = time.time() + 900
    while True:
        items = {i["run"]: i for i in _view(ws)}
        if all(i["state"] in ("done", "failed", "cancelled", "unknown") for i in items.values()):
            break
        assert time.time() < deadline, items
        time.sleep(2)
    print(f"\n2-task Slurm scenarios: {time.time() - t0:.0f}s")
    return {"ws": ws, "runs": runs, "items": items}


def _rank_logs(adir: Path, rank: int):
    from ssflctl.workdir.layout import AttemptDir

    return [p.read_text() for p in AttemptDir(adir).rank_logs(rank)]


def _sums(adir: Path):
    return [json.loads((adir / f"checksum.rank{k}.json").read_text()) for k in (0, 1)]


def test_two_tasks_train_one_model(jobs):
    r = jobs["runs"]["ddp"]
    item = jobs["items"][r["run_id"]]
    assert item["state"] == "done", item
    assert item["gpus"] == "2 GPU × 1 node"
    a1 = r["run_dir"] / "attempt-1"
    s0, s1 = _sums(a1)
    assert s0["params_sha256"] == s1["params_sha256"] and s0["world_size"] == s1["world_size"] == 2
    assert s0["pid"] != s1["pid"] and s0["iter"] == s1["iter"] == 4
    (log0,) = _rank_logs(a1, 0)[:1]
    assert "Distributed launcher: slurm" in log0 and "GPU number: 2" in log0
    assert "ssflctl: rank 0 of world size 2 (launcher slurm, backend gloo" in log0
    (log1,) = _rank_logs(a1, 1)
    assert "ssflctl: rank 1 of world size 2 (launcher slurm, backend gloo, local rank 1)" in log1
    metrics = list(r["run_dir"].rglob("metrics.json"))
    assert [m.parent.name for m in metrics] == ["attempt-1"]
    assert 0.0 <= json.loads(metrics[0].read_text())["bbox"]["AP"] <= 1.0
    # one outcome, one progress, no rank's stray files: rank 1 wrote only its log and its checksum
    assert json.loads((a1 / "outcome.json").read_text())["outcome"] == "done"
    # each task's own scheduler output (submitit: <job>_<task>_log.out)
    outs = sorted(p.name for p in r["folder"].rglob(f"{r['job_id']}_*_log.out"))
    assert outs == [f"{r['job_id']}_0_log.out", f"{r['job_id']}_1_log.out"], outs


def test_nan_on_one_rank_stops_both_at_the_same_iteration_and_retries(jobs):
    r = jobs["runs"]["nan"]
    item = jobs["items"][r["run_id"]]
    assert item["state"] == "done", item
    a1, a2 = r["run_dir"] / "attempt-1", r["run_dir"] / "attempt-2"
    nan = json.loads((a1 / "nan.json").read_text())
    assert (nan["iter"], nan["rank"], nan["ranks"], nan["world_size"]) == (3, 1, [1], 2)
    assert nan["reason"].endswith("on rank 1 of 2")
    stop = re.compile(r"NanGuard: stopping at the first non-finite loss: .*Iter\(train\) \[(\d+)\]")
    iters = []
    for rank in (0, 1):
        (text,) = _rank_logs(a1, rank)[:1]
        iters.append([int(m.group(1)) for m in stop.finditer(text)])
    assert iters == [[3], [3]], iters
    out = json.loads((a1 / "outcome.json").read_text())
    assert out["outcome"] == "nan"
    info = json.loads((a2 / "attempt.json").read_text())
    assert info["lr"] == pytest.approx(LR * 0.1)
    s0, s1 = _sums(a2)
    assert s0["params_sha256"] == s1["params_sha256"] and s0["world_size"] == 2
    assert json.loads((a2 / "outcome.json").read_text())["outcome"] == "done"
    assert (a2 / "metrics.json").is_file() and not (a1 / "metrics.json").exists()
    assert not (a1 / "checksum.rank0.json").exists()  # attempt 1 never finished training on any rank
    # one allocation: the same job id, never requeued
    assert item["job"] == r["job_id"] and "resumed" not in item["note"]


def test_requeue_resumes_both_ranks_from_one_checkpoint(jobs):
    r = jobs["runs"]["requeue"]
    item = jobs["items"][r["run_id"]]
    assert item["state"] == "done", item
    a1 = r["run_dir"] / "attempt-1"
    rec = json.loads((a1 / "recovery.json").read_text())
    assert [x["kind"] for x in rec] == ["interrupted", "resumed"], rec   # one note (rank 0), one resume
    assert "SIGUSR2" in rec[0]["message"] and rec[1]["lr"] == LR
    ck = rec[1]["checkpoint"]
    starts = []
    for rank in (0, 1):
        logs = _rank_logs(a1, rank)
        # two starts of the job, each rank logged both (rank 0: then the test step's log)
        assert len(logs) == (3 if rank == 0 else 2), (rank, len(logs))
        m = re.search(r"ssflctl: rank (\d) of world size 2 .*; resumes (\S+) at lr (\S+)", logs[1])
        starts.append((int(m.group(1)), m.group(2), float(m.group(3))))
    assert starts == [(0, ck, LR), (1, ck, LR)], starts
    s0, s1 = _sums(a1)
    assert s0["params_sha256"] == s1["params_sha256"] and s0["iter"] == s1["iter"] == 2 * REQUEUE_EPOCHS
    assert item["note"].startswith("resumed 1×")
