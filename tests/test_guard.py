"""The NaN guard, the log watcher and the lr-after-resume fix on REAL mmengine runs.

A toy least-squares model trained by plain SGD diverges deterministically at an absurd lr
(lr 3: the error grows ×5 per step, the loss overflows to inf and then NaN after ~30
iterations, well after a few epoch checkpoints) and trains fine at lr × 0.1. All runs share a
seed and data, so the guarded and the unguarded run follow the same trajectory up to the NaN.

Module-scoped fixtures run four short CPU trainings (a few seconds each):
  unguarded  — no guard, lr 3, goes NaN and keeps going; mmengine writes the NaN to its text log
               and scalars.json, saves poisoned checkpoints, and points last_checkpoint at one;
  guarded    — the same with NanGuardHook: stops at the first non-finite iteration;
  resumed    — resumed from clean_checkpoint() of the unguarded run at lr 0.3 with LrOverrideHook;
  trap       — the same resume without the override: mmengine silently keeps lr 3.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssflctl.workdir import checkpoints, mmlogs as logs
from ssflctl.node import retry

pytestmark = pytest.mark.training

LR = 3.0
EPOCHS = 10
N, BATCH = 16, 4          # 4 iterations per epoch


def _register():
    import torch
    from mmengine.dataset import BaseDataset  # noqa: F401  (registry side effects)
    from mmengine.model import BaseModel
    from mmengine.registry import DATASETS, MODELS
    from torch.utils.data import Dataset

    class ToyRegression(Dataset):
        def __init__(self, n=N, dim=8, seed=0, data_root="/data/nanjing", classes=("banana", "Nano")):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, dim, generator=g)
            self.y = self.x @ torch.randn(dim, generator=g) + 0.1 * torch.randn(n, generator=g)
            self.metainfo = dict(classes=tuple(classes))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return dict(inputs=self.x[i], labels=self.y[i])

    class ToyLsq(BaseModel):
        def __init__(self, dim=8):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(dim))
            self.b = torch.nn.Parameter(torch.zeros(1))

        def forward(self, inputs, labels=None, mode="tensor"):
            pred = inputs @ self.w
            if mode == "loss":
                return dict(loss_cls=((pred - labels) ** 2).mean(),
                            loss_bbox=1e-3 * ((self.b - 1.0) ** 2).sum())
            return pred

    DATASETS.register_module(name="ToyRegression", module=ToyRegression, force=True)
    MODELS.register_module(name="ToyLsq", module=ToyLsq, force=True)


def _cfg(work_dir: Path, lr: float, *, guard: bool, name: str, resume_from=None, override=False,
         epochs=EPOCHS, by_epoch=True):
    from mmengine.config import Config
    hooks = []
    if guard:
        hooks.append(dict(type="NanGuardHook"))
    if override:
        hooks.append(dict(type="LrOverrideHook"))
    cfg = dict(
        custom_imports=dict(imports=["ssflctl.extensions.compat", "ssflctl.node.guard"], allow_failed_imports=False),
        model=dict(type="ToyLsq"),
        work_dir=str(work_dir),
        # unique: mmengine keeps one MMLogger/Visualizer per experiment name per process
        experiment_name=f"ssflctl-guard-{name}-{os.getpid()}-{time.time_ns()}",
        data_root="/data/nanjing/leftImg8bit",
        train_dataloader=dict(dataset=dict(type="ToyRegression", classes=("banana", "Nano")), batch_size=BATCH, num_workers=0,
                              sampler=dict(type="DefaultSampler", shuffle=True),
                              collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=True, max_epochs=epochs),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=lr, momentum=0.0)),
        param_scheduler=[dict(type="ConstantLR", factor=1.0, by_epoch=True)],
        default_hooks=dict(logger=dict(type="LoggerHook", interval=1),
                           checkpoint=dict(type="CheckpointHook", interval=1, by_epoch=True)),
        custom_hooks=hooks,
        log_processor=dict(window_size=1),
        randomness=dict(seed=7),
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")),
        default_scope="mmengine",
        log_level="INFO",
    )
    if not by_epoch:  # iteration-based loop: checkpoints every 4 iterations, a log line every 3
        cfg.update(train_cfg=dict(by_epoch=False, max_iters=epochs * 4),
                   default_hooks=dict(logger=dict(type="LoggerHook", interval=3),
                                      checkpoint=dict(type="CheckpointHook", interval=4, by_epoch=False)),
                   log_processor=dict(window_size=3, by_epoch=False))
    if resume_from:
        cfg.update(resume=True, load_from=str(resume_from))
    return Config(cfg)


def _train(cfg):
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    try:
        runner.train()
        return runner, None
    except Exception as exc:  # noqa: BLE001 - the guard's exception is what we look at
        return runner, exc


@pytest.fixture(scope="module", autouse=True)
def _full_torch_load():
    """mmengine 0.10.7 resumes with a bare ``torch.load``; torch >= 2.6 defaults to weights_only.

    ssflctl.extensions.compat allowlists mmengine's checkpoint types; these tests are about the lr, not the
    allowlist (tests/test_compat.py owns that), so they load their own checkpoints in full.
    """
    old = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    yield
    if old is None:
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    else:
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import ssflctl.extensions.compat  # noqa: F401  mmengine 0.10.7 checkpoints under torch's weights_only load
    import ssflctl.node.guard  # noqa: F401  registers the hooks
    _register()
    base = tmp_path_factory.mktemp("guard")
    out = {}
    _, out["unguarded_exc"] = _train(_cfg(base / "unguarded", LR, guard=False, name="ug"))
    out["unguarded"] = base / "unguarded"
    runner, exc = _train(_cfg(base / "guarded", LR, guard=True, name="g"))
    out["guarded"], out["guarded_exc"] = base / "guarded", exc
    return out


def test_unguarded_run_really_goes_nonfinite_and_poisons_last_checkpoint(runs):
    import torch
    assert runs["unguarded_exc"] is None  # mmengine alone trains on through the NaN
    wd = runs["unguarded"]
    cks = checkpoints.list_checkpoints(wd)
    assert [c["iter"] for c in cks] == [4 * e for e in range(1, EPOCHS + 1)]
    assert all(c["source"] == "meta" for c in cks)
    last = torch.load(checkpoints.latest_checkpoint(wd), map_location="cpu", weights_only=False)
    assert not torch.isfinite(last["state_dict"]["w"]).all()  # the trap: a poisoned pointer


def test_watcher_finds_nonfinite_in_mmengine_text_log_and_scalars(runs):
    wd = runs["unguarded"]
    (d,) = logs.run_dirs(wd)
    sc = logs.nonfinite_in_scalars(d / "vis_data" / "scalars.json")
    tl = logs.nonfinite_in_text_log(next(d.glob("*.log")))
    assert sc and tl
    # interval 1, window 1: both name the same first bad iteration, just after the last finite
    assert sc["iter"] == tl["iter"] and sc["after_iter"] == sc["iter"] - 1 == tl["after_iter"]
    assert sc["key"] == tl["key"] == "loss_cls" and sc["value"] in ("inf", "nan")
    assert sc["epoch"] == tl["epoch"] == (sc["iter"] - 1) // 4 + 1
    assert sc["iter"] > 8, "the toy run must go NaN after a few checkpoints"
    # the strict parse of mmengine's own scalars.json fails; ours does not
    import json
    raw = (d / "vis_data" / "scalars.json").read_text().splitlines()
    bad_lines = [ln for ln in raw if "NaN" in ln or "Infinity" in ln]
    assert bad_lines
    with pytest.raises(ValueError):
        json.loads(bad_lines[-1], parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    # and the text log says "loss: nan" somewhere later on (the window mean of nan)
    text = next(d.glob("*.log")).read_text()
    assert "loss: nan" in text and "nanjing" in text and "banana" in text
    assert logs.find_nonfinite(wd)["iter"] == sc["iter"]


def test_guard_stops_at_first_nonfinite_iteration_and_writes_nan_json(runs):
    from ssflctl.node.guard import NonFiniteLossError
    exc = runs["guarded_exc"]
    assert isinstance(exc, NonFiniteLossError)
    wd = runs["guarded"]
    rec = exc.record
    saved = __import__("json").loads((wd / "nan.json").read_text())
    assert saved["iter"] == rec["iter"] and saved["loss_key"] == "loss_cls"
    first = logs.nonfinite_in_scalars(logs.scalar_files(runs["unguarded"])[0])
    assert rec["iter"] == first["iter"]          # the very first non-finite iteration
    assert rec["epoch"] == first["epoch"] and rec["lr"] == pytest.approx(LR)
    assert rec["last_finite_iter"] == rec["iter"] - 1
    assert len(rec["last_finite"]["loss_cls"]) == 5 and all(math.isfinite(v) for v in rec["last_finite"]["loss_cls"])
    assert rec["reason"] == f"{first['value'].replace('nan', 'NaN').replace('inf', 'Inf')} in loss_cls " \
                            f"at epoch {rec['epoch']} iter {rec['iter']} (lr 3)"
    # stopped within one iteration: nothing logged after the NaN iteration
    recs = [r for r in logs.read_scalars(logs.scalar_files(wd)[0]) if "loss" in r]
    assert recs[-1]["iter"] == rec["iter"]
    # no checkpoint saved at or after the NaN iteration; the pointer is clean
    cks = checkpoints.list_checkpoints(wd)
    assert cks and max(c["iter"] for c in cks) < rec["iter"]
    assert checkpoints.latest_checkpoint(wd) == cks[-1]["path"]
    # the watcher confirms the guarded outcome (nan.json and the guard's log line)
    assert logs.find_nonfinite(wd)["source"] == "nan.json"
    (log,) = logs.text_logs(wd)
    tl = logs.nonfinite_in_text_log(log)
    assert (tl["iter"], tl["epoch"], tl["key"]) == (rec["iter"], rec["epoch"], "loss_cls")
    guard_lines = [r for r in logs.read_text_log(log) if r.get("guard")]
    assert len(guard_lines) == 1 and guard_lines[0]["epoch"] == rec["epoch"]


def test_clean_checkpoint_is_before_the_nan(runs):
    import torch
    wd = runs["unguarded"]
    hit = logs.find_nonfinite(wd)
    clean = retry.clean_checkpoint(wd, hit["iter"])
    assert clean is not None and clean != checkpoints.latest_checkpoint(wd)
    meta = checkpoints.read_checkpoint_meta(clean)
    assert meta["iter"] <= hit["iter"] - 2
    ck = torch.load(clean, map_location="cpu", weights_only=False)
    assert torch.isfinite(ck["state_dict"]["w"]).all()
    # every later checkpoint is excluded, whatever last_checkpoint says
    later = [c for c in checkpoints.list_checkpoints(wd) if c["iter"] > meta["iter"]]
    assert later and all(c["iter"] > hit["iter"] - 2 for c in later)
    d = retry.decide(retry.RetryPolicy.from_dict({"from": "checkpoint"}), wd, 1, LR,
                     {"outcome": "nan", "nan": None})
    assert d.action == "retry" and d.resume_from == clean and d.lr == pytest.approx(LR * 0.1)
    assert d.reason.startswith(f"after {hit['value'].replace('nan', 'NaN').replace('inf', 'Inf')} in loss_cls at epoch")


def _logged_lrs(wd: Path):
    (log,) = logs.text_logs(wd)
    text_lrs = [r["values"]["lr"] for r in logs.read_text_log(log) if not r.get("guard")]
    (sc,) = logs.scalar_files(wd)
    return text_lrs, [r["lr"] for r in logs.read_scalars(sc) if "loss" in r]


def test_resume_from_clean_checkpoint_at_lower_lr_logs_the_new_lr(runs, tmp_path):
    wd = runs["unguarded"]
    clean = retry.clean_checkpoint(wd, logs.find_nonfinite(wd)["iter"])
    new_lr = LR * 0.1
    meta = checkpoints.read_checkpoint_meta(clean)

    # the trap: the config's lower lr is silently ignored by mmengine's resume
    trap, exc = _train(_cfg(tmp_path / "trap", new_lr, guard=True, name="trap", resume_from=clean,
                            epochs=meta["epoch"] + 1))
    assert exc is None, exc
    text_lrs, sc_lrs = _logged_lrs(tmp_path / "trap")
    assert text_lrs and text_lrs[0] == pytest.approx(LR) and sc_lrs[0] == pytest.approx(LR)

    # the fix: LrOverrideHook applies the new lr after the resume; the run then finishes
    runner, exc = _train(_cfg(tmp_path / "fixed", new_lr, guard=True, override=True, name="fixed",
                              resume_from=clean))
    assert exc is None
    text_lrs, sc_lrs = _logged_lrs(tmp_path / "fixed")
    assert text_lrs and all(v == pytest.approx(new_lr) for v in text_lrs)
    assert all(v == pytest.approx(new_lr) for v in sc_lrs)
    first_iter = logs.read_text_log(logs.text_logs(tmp_path / "fixed")[0])[0]["iter"]
    assert first_iter == meta["iter"] + 1          # resumed, not restarted
    assert runner.param_schedulers[0].base_values == [pytest.approx(new_lr)]
    # a real mmengine log that says "nanjing", "banana" and "Nano" (config, classes) but no NaN
    fixed_log = logs.text_logs(tmp_path / "fixed")[0].read_text()
    assert "nanjing" in fixed_log and "banana" in fixed_log and "Nano" in fixed_log
    assert logs.find_nonfinite(tmp_path / "fixed") is None
    prog = logs.last_progress(tmp_path / "fixed")
    assert prog["iter"] == EPOCHS * 4 and prog["epoch"] == EPOCHS and math.isfinite(prog["loss"])


def test_apply_lr_keeps_group_ratios_and_schedule_progress():
    import torch
    from types import SimpleNamespace
    from mmengine.optim import OptimWrapper, StepLR
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr": 0.2}], lr=0.1)
    sched = StepLR(opt, step_size=1, gamma=0.5, by_epoch=False)
    opt.step()
    sched.step()  # progress: ×0.5
    runner = SimpleNamespace(optim_wrapper=OptimWrapper(opt), param_schedulers=[sched], logger=None)
    new = retry.apply_lr_after_resume(runner, 0.01)
    assert new == [pytest.approx(0.005), pytest.approx(0.01)]
    assert sched.base_values == [pytest.approx(0.01), pytest.approx(0.02)]
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.0025), pytest.approx(0.005)]


def test_custom_imports_registers_the_hooks(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("custom_imports = dict(imports=['ssflctl.node.guard'], allow_failed_imports=False)\n"
                   "custom_hooks = [dict(type='NanGuardHook'), dict(type='LrOverrideHook', lr=0.1)]\n")
    code = ("import sys; from mmengine.config import Config; c = Config.fromfile(sys.argv[1]);"
            "from mmengine.registry import HOOKS;"
            "hs = [HOOKS.build(h) for h in c.custom_hooks];"
            "print(type(hs[0]).__name__, hs[0].priority, type(hs[1]).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["NanGuardHook", "65", "LrOverrideHook"]


def test_guard_in_an_iteration_based_loop(runs, tmp_path):
    from ssflctl.node.guard import NonFiniteLossError
    _, exc = _train(_cfg(tmp_path / "iters", LR, guard=True, name="iters", by_epoch=False))
    assert isinstance(exc, NonFiniteLossError)
    rec = exc.record
    first = logs.nonfinite_in_scalars(logs.scalar_files(runs["unguarded"])[0])
    assert rec["iter"] == first["iter"] and rec["epoch"] is None
    assert "epoch" not in rec["reason"] and f"iter {rec['iter']} (lr 3)" in rec["reason"]
    cks = checkpoints.list_checkpoints(tmp_path / "iters")
    assert [c["name"] for c in cks] == [f"iter_{i}.pth" for i in range(4, rec["iter"], 4)]
    assert [c["iter"] for c in cks] == list(range(4, rec["iter"], 4))
    # mmengine's "Iter(train) [ 9/40]" lines parse; the guard's own line names the NaN iteration
    (log,) = logs.text_logs(tmp_path / "iters")
    lines = logs.read_text_log(log)
    assert [r["iter"] for r in lines if not r.get("guard")][:2] == [3, 6]
    assert lines[0]["max_iters"] == EPOCHS * 4
    (tmp_path / "iters" / "nan.json").unlink()
    hit = logs.find_nonfinite(tmp_path / "iters")
    assert hit["iter"] == rec["iter"] and hit["key"] == "loss_cls"


def test_guard_reads_the_message_hub_and_never_syncs(tmp_path):
    """The loss values are read from the floats RuntimeInfoHook already put in the message hub."""
    from types import SimpleNamespace

    from mmengine.logging import MessageHub

    from ssflctl.node.guard import NanGuardHook, NonFiniteLossError

    class DeviceScalar:  # stands for a CUDA tensor: .item() would synchronise the device
        def item(self):
            raise AssertionError("the guard synchronised the device")

    hub = MessageHub.get_instance(f"ssflctl-guard-hub-{time.time_ns()}")
    runner = SimpleNamespace(message_hub=hub, iter=0, epoch=0, work_dir=str(tmp_path), logger=None,
                             train_loop=None, optim_wrapper=None)
    hook = NanGuardHook(keep=2)
    hook.before_train(runner)
    outputs = {"loss": DeviceScalar(), "loss_cls": DeviceScalar(), "acc": DeviceScalar()}
    for i, v in enumerate([0.9, 0.8, 0.7]):
        runner.iter = i
        hub.update_scalar("train/loss", v)
        hub.update_scalar("train/loss_cls", v)
        hook.after_train_iter(runner, i, None, outputs)
    runner.iter = 3
    hub.update_scalar("train/loss", float("inf"))
    hub.update_scalar("train/loss_cls", float("-inf"))
    with pytest.raises(NonFiniteLossError) as ei:
        hook.after_train_iter(runner, 3, None, outputs)
    rec = ei.value.record
    assert rec["iter"] == 4 and rec["epoch"] is None and rec["loss_key"] == "loss_cls"
    assert rec["nonfinite"] == {"loss": "inf", "loss_cls": "-inf"}
    assert rec["last_finite"] == {"loss": [0.8, 0.7], "loss_cls": [0.8, 0.7]}
    assert rec["reason"] == "-Inf in loss_cls at iter 4" and rec["lr"] is None
    assert (tmp_path / "nan.json").is_file()
    import pickle
    assert pickle.loads(pickle.dumps(ei.value)).record == rec  # submitit ships it back
