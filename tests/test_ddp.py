"""Multi-GPU runs (issue 17): nodes × gpus tasks, DDP, the NaN guard across ranks, requeue, the
batch-aware lr check. No GPU here: the multi-task path runs on the CPU with gloo.

Fast (no training): the Slurm parameters and the sbatch script of a 2-node × 2-GPU job and the
environment each of its tasks gets; the local runner's limits; the plan's batch column and lr
warning; ``auto_scale_lr: true`` read back from a built mmengine Runner.

``training``: the NaN guard and rank 0's decisions in a real 2-process gloo group (no model).

Slow (``training``): a 2-process DDP run with the local executor (torchrun-style variables, gloo).
The Slurm scenarios are in tests/test_ddp_slurm.py.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import REPO

TESTS = Path(__file__).resolve().parent

SEED000 = """\
name: seed000
template: retinanet_r50_fpn_1x_coco
datasets:
  coco: {{root: {root}}}
matrix:
  seed: [0]
params: {{lr: 0.01, batch_size: 2{extra}}}
resources: {{gpus: 1, cpus: 6, mem: 32G, time: "24:00:00"}}
executor: {{type: local}}
"""


# ------------------------------------------------------------------------------------------
# Slurm parameters, the sbatch script, every task's environment
# ------------------------------------------------------------------------------------------
def test_slurm_params_one_task_per_gpu():
    from ssflctl.backends.slurm import _params

    p = _params({"gpus": 2, "cpus": 6, "nodes": 2, "mem_gb": 32, "time_min": 60}, {}, "x")
    assert (p["nodes"], p["ntasks_per_node"], p["cpus_per_task"], p["gres"]) == (2, 2, 3, "gpu:2")
    assert p["setup"][0] == "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-3}"
    p1 = _params({"gpus": 1, "cpus": 6}, {}, "x")
    assert (p1["nodes"], p1["ntasks_per_node"], p1["cpus_per_task"], p1["gres"]) == (1, 1, 6, "gpu:1")
    p0 = _params({"gpus": 0, "cpus": 2}, {}, "x")  # CPU job: one task
    assert (p0["ntasks_per_node"], p0["cpus_per_task"]) == (1, 2) and "gres" not in p0


def test_two_node_sbatch_script_and_task_environment(tmp_path, capsys):
    """`nodes: 2` cannot run here (one slurmd): the sbatch script submitit writes, and what each of the
    4 tasks sees (as srun sets it) and makes of it (ssflctl.node.dist.world, mmengine's variables)."""
    import submitit

    from ssflctl.backends.slurm import TrainTask, _params
    from ssflctl.node import dist

    res = {"gpus": 2, "cpus": 4, "nodes": 2, "mem_gb": 16, "time_min": 120}
    ex = submitit.SlurmExecutor(folder=str(tmp_path))
    ex.update_parameters(**_params(res, {"partition": "gpulab02"}, "train-x"))
    script = ex._make_submission_file_text("python -u -m submitit.core._submit " + str(tmp_path), "abc")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --gres=gpu:2", "#SBATCH --mem=16384M", "#SBATCH --signal=USR2@"):
        assert line in script, script
    assert "srun --unbuffered --output" in script and "%t" in script  # one log per task
    print("\n--- sbatch script (nodes: 2, gpus: 2, cpus: 4) ---\n" + script)
    assert TrainTask  # the job is pickled as TrainTask(train_run)

    seen = []
    for node in range(2):
        for local in range(2):
            procid = node * 2 + local
            env = {"SLURM_NTASKS": "4", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(local),
                   "SLURM_NODEID": str(node), "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "4242",
                   "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_CPUS_PER_TASK": "2"}
            old = {k: os.environ.get(k) for k in list(env) + ["WORLD_SIZE", "RANK"]}
            os.environ.update(env)
            os.environ.pop("WORLD_SIZE", None)
            os.environ.pop("RANK", None)
            try:
                w = dist.world()
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            seen.append((env, w))
            print(f"task {procid}: {env} -> rank {w.rank}/{w.size}, local rank {w.local_rank} (cuda:{w.local_rank}), "
                  f"launcher {w.launcher}, MASTER_PORT {dist.PORT_BASE + 4242 % 20000}, MASTER_ADDR gpu01")
    assert [(w.rank, w.size, w.local_rank, w.launcher) for _, w in seen] == \
        [(0, 4, 0, "slurm"), (1, 4, 1, "slurm"), (2, 4, 0, "slurm"), (3, 4, 1, "slurm")]


def test_test_job_is_one_task(tmp_path, monkeypatch):
    """The test step of a 2-GPU run goes out as one task with one GPU."""
    from ssflctl.backends import slurm

    made = []

    class Ex:
        def __init__(self, folder, res):
            made.append(res)
            self.n = 0

        def batch(self):
            import contextlib
            return contextlib.nullcontext()

        def submit(self, *a):
            class J:
                job_id = f"{len(made)}"
            return J()

        def update_parameters(self, **kw):
            pass

    monkeypatch.setattr(slurm, "make_executor", lambda folder, res, opts, name="": Ex(folder, res))
    slurm.launch([{"run_id": "r", "run_dir": str(tmp_path), "resources": {"gpus": 2, "cpus": 2, "nodes": 2}}],
                 tmp_path, {})
    assert made[0]["gpus"] == 2 and made[0]["nodes"] == 2
    assert made[1]["gpus"] == 1 and made[1]["nodes"] == 1


def test_local_runner_never_more_gpus_than_the_machine(monkeypatch):
    from ssflctl.backends import local

    assert local._too_many(2, ["0", "1"]) == ""
    assert "has 1 GPU" in local._too_many(2, ["0"])
    assert local._too_many(1, ["0"]) == ""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert local._too_many(2, []) == "" and "more than the 2 cores" in local._too_many(3, [])


# ------------------------------------------------------------------------------------------
# the plan: total batch beside the template's base, the lr warning; auto_scale_lr
# ------------------------------------------------------------------------------------------
@pytest.mark.training
def test_plan_warns_seed000_lr_and_shows_the_batch(tmp_path):
    from ssflctl.commands.submit import batch_warnings, plan_rows, PLAN_COLUMNS
    from ssflctl.control.submit import submit

    (tmp_path / "coco").mkdir()
    exp = tmp_path / "seed000.yaml"
    exp.write_text(SEED000.format(root=tmp_path / "coco", extra=""))
    res = submit(exp, tmp_path / "ws", dry_run=True)
    (w,) = batch_warnings(res)
    assert "lr 0.01 is for a batch of 16" in w and "trains with 2 (1 GPU × 1 node × 2 images)" in w
    assert "linear rule gives lr 0.00125" in w
    assert "params.auto_scale_lr: true" in w and "params.lr: 0.00125" in w
    row = dict(zip(PLAN_COLUMNS, plan_rows(res)[0]))
    assert row["batch"] == "2 (base 16)"

    exp.write_text(SEED000.format(root=tmp_path / "coco", extra=", auto_scale_lr: true"))
    res = submit(exp, tmp_path / "ws", dry_run=True)
    assert batch_warnings(res) == []
    assert dict(zip(PLAN_COLUMNS, plan_rows(res)[0]))["batch"] == "2 (base 16, lr→0.00125)"


@pytest.mark.training
def test_auto_scale_lr_true_gives_the_optimizer_0_00125(tmp_path):
    """`auto_scale_lr: true` renders auto_scale_lr.enable=True; the lr the built Runner's optimizer
    gets (mmengine's Runner.scale_lr, as Runner.train calls it) is 0.00125 for 1 GPU × 2 images."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from ssflctl.plan import render

    cfg = render.render_config("retinanet_r50_fpn_1x_coco", {"lr": 0.01, "batch_size": 2, "auto_scale_lr": True})
    path = tmp_path / "config.py"
    cfg.dump(str(path))
    text = path.read_text()
    assert "enable=True" in text.split("auto_scale_lr")[1][:80]
    cfg = Config.fromfile(str(path))
    cfg.work_dir = str(tmp_path / "wd")
    cfg.model.backbone.init_cfg = None  # nothing downloaded
    cfg.experiment_name = f"asl-{time.time_ns()}"
    cfg.visualizer.name = cfg.experiment_name
    runner = Runner.from_cfg(cfg)
    ow = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.scale_lr(ow, runner.auto_scale_lr)
    assert ow.get_lr()["lr"][0] == pytest.approx(0.00125)


# ------------------------------------------------------------------------------------------
# the local executor: 2 processes (torchrun-style), DDP with gloo
# ------------------------------------------------------------------------------------------
LOCAL = """\
name: {name}
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [focal]
  seed: [0]
params: {{max_epochs: 2, batch_size: 2, log_interval: 1, val_interval: 100, img_scale: [64, 64]}}
overrides:
  custom_imports: {{imports: [ddp_hooks], allow_failed_imports: false}}
  custom_hooks: [{{type: WeightChecksumHook}}]
resources: {{gpus: 2, cpus: 2, mem: 3G, time: "00:10:00"}}
executor: {{type: local}}
"""


@pytest.mark.training
@pytest.mark.slow
def test_local_two_processes_train_one_model(tmp_path, monkeypatch):
    from ssflctl.commands.status import view
    from ssflctl.control import submit as submit_mod
    from ssflctl.convert import synth_coco
    from ssflctl.registry.store import Registry

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: two CPU processes
    synth_coco.generate(tmp_path / "data", n_train=8, n_val=4, seed=0)
    exp = tmp_path / "ddplocal.yaml"
    exp.write_text(LOCAL.format(name="ddplocal", root=tmp_path / "data"))
    ws = tmp_path / "ws"
    t0 = time.time()
    res = submit_mod.submit(exp, ws)
    (item,) = res.submitted
    while True:
        with Registry(ws) as reg:
            (st,) = view(reg, ws, "ddplocal")
        if st["state"] in ("done", "failed", "cancelled", "unknown"):
            break
        assert time.time() - t0 < 400, st
        time.sleep(1)
    a1 = ws / "runs" / item.run.run_id / "attempt-1"
    folder = Path(st["job_ids"] and ws / "submissions" / res.submission_id)
    assert st["state"] == "done", (st, (folder / "0.log").read_text()[-3000:])
    assert st["gpus"] == "2 GPU × 1 node"
    sums = [json.loads((a1 / f"checksum.rank{k}.json").read_text()) for k in (0, 1)]
    assert sums[0]["params_sha256"] == sums[1]["params_sha256"] and {s["world_size"] for s in sums} == {2}
    assert sums[0]["pid"] != sums[1]["pid"]
    assert (a1 / "metrics.json").is_file() and not list(a1.glob("ranks/*metrics*"))
    from ssflctl.workdir.layout import AttemptDir

    text0 = AttemptDir(a1).text_logs()[0].read_text()  # the training's (then the test step's)
    assert "Distributed launcher: pytorch" in text0 and "GPU number: 2" in text0
    assert "ssflctl: rank 0 of world size 2 (launcher pytorch, backend gloo" in text0
    (rank1,) = (a1 / "ranks").glob("*.rank1.log")
    assert "ssflctl: rank 1 of world size 2" in rank1.read_text()
    assert (folder / "0.rank1.log").is_file()
    print(f"\nlocal 2-process DDP run: {time.time() - t0:.0f}s")


# ------------------------------------------------------------------------------------------
# the guard and rank 0's decisions in a real 2-process gloo group (no model: seconds)
# ------------------------------------------------------------------------------------------
def _two_ranks(rank: int, port: int, tmp: str, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from types import SimpleNamespace

    import torch
    from mmengine.logging import MessageHub

    from ssflctl.node import dist
    from ssflctl.node.guard import NanGuardHook, NonFiniteLossError

    assert dist.setup().launcher == "pytorch" and dist.initialized()
    out = {"rank": rank}
    try:  # an exception raised by rank 0's decision is raised on every rank
        dist.on_main(lambda: (_ for _ in ()).throw(ValueError("rank 0 says no")))
    except ValueError as exc:
        out["on_main_error"] = str(exc)
    out["decided"] = dist.on_main(lambda: f"decided by {dist.rank()}")
    hub = MessageHub.get_instance(f"ddp_guard_{rank}_{time.time_ns()}")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    wrapper = SimpleNamespace(optimizer=opt, get_lr=lambda: {"lr": [0.01]})
    runner = SimpleNamespace(message_hub=hub, iter=0, epoch=0, work_dir=tmp, optim_wrapper=wrapper,
                             logger=None, train_loop=SimpleNamespace())
    hook = NanGuardHook()
    hook.before_train(runner)
    for i in range(10):
        runner.iter = i
        bad = rank == 1 and i == 4   # iteration 5 (1-based) goes NaN on rank 1 only
        outputs = {"loss": torch.tensor(float("nan") if bad else 1.0), "loss_cls": torch.tensor(0.5)}
        for k, v in outputs.items():
            hub.update_scalar(f"train/{k}", v)
        try:
            hook.after_train_iter(runner, i, None, outputs)
        except NonFiniteLossError as exc:
            out["stopped_at"] = exc.record["iter"]
            out["record"] = exc.record
            break
    dist.teardown()
    q.put(out)


@pytest.mark.training
def test_guard_stops_every_rank_at_the_same_iteration(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    t0 = time.time()
    mp.start_processes(_two_ranks, args=(port, str(tmp_path), q), nprocs=2, join=True, start_method="spawn")
    outs = sorted((q.get() for _ in range(2)), key=lambda o: o["rank"])
    assert time.time() - t0 < 120
    assert [o["on_main_error"] for o in outs] == ["rank 0 says no"] * 2
    assert [o["decided"] for o in outs] == ["decided by 0"] * 2
    assert [o["stopped_at"] for o in outs] == [5, 5]
    rec = json.loads((tmp_path / "nan.json").read_text())  # written once, by rank 0, with rank 1's record
    assert (rec["iter"], rec["rank"], rec["ranks"], rec["world_size"]) == (5, 1, [1], 2)
    assert rec["nonfinite"] == {"loss": "nan"} and rec["reason"].endswith("on rank 1 of 2")
