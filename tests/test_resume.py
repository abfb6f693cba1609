"""torch >= 2.6 weights_only vs mmengine checkpoints: a tiny RetinaNet trains, then resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssflctl.node import job
from ssflctl.plan import render
from ssflctl.convert import synth_coco

pytestmark = pytest.mark.training
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory):
    """Train the tiny model for one epoch (2 iterations) through mmengine's Runner."""
    from mmengine.runner import Runner

    root = tmp_path_factory.mktemp("synth")
    synth_coco.generate(root, n_train=8, n_val=2, size=(96, 96), seed=2)
    cfg = render.render_config("retinanet_tiny", {"data_root": str(root) + "/", "max_epochs": 1,
                                                  "batch_size": 4, "img_scale": (96, 96), "log_interval": 1})
    wd = tmp_path_factory.mktemp("wd")
    cfg.work_dir = str(wd)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    Runner.from_cfg(cfg).train()
    return {"cfg": cfg, "wd": wd, "ckpt": wd / "epoch_1.pth", "root": root}


def test_weights_only_default_rejects_mmengine_checkpoints_without_the_allowlist(first_epoch):
    """The incompatibility is real: a fresh process without ssflctl.extensions.compat cannot load it."""
    code = ("import torch,sys\n"
            "try:\n torch.load(sys.argv[1]); print('LOADED')\n"
            "except Exception as e: print('FAILED', type(e).__name__, str(e))\n")
    r = subprocess.run([sys.executable, "-c", code, str(first_epoch["ckpt"])], capture_output=True, text=True)
    assert "FAILED UnpicklingError" in r.stdout and "Unsupported global" in r.stdout, r.stdout + r.stderr


def test_allowlist_covers_exactly_what_the_checkpoint_needs(first_epoch):
    import torch

    from ssflctl.extensions import compat

    compat.allow_mmengine_checkpoints()
    assert compat.unsafe_globals(first_epoch["ckpt"]) == []
    ck = torch.load(first_epoch["ckpt"], map_location="cpu")  # weights_only=True default
    assert ck["meta"]["iter"] == 2 and ck["meta"]["epoch"] == 1
    assert "message_hub" in ck and "optimizer" in ck
    # weights_only is still on: an arbitrary global stays forbidden
    evil = first_epoch["wd"] / "evil.pth"
    torch.save({"x": _NotAllowed()}, evil)
    with pytest.raises(Exception, match="weights_only|Weights only"):
        torch.load(evil)
    code = ("import json,sys,torch\n"
            "print(json.dumps(torch.serialization.get_unsafe_globals_in_checkpoint(sys.argv[1])))")
    r = subprocess.run([sys.executable, "-c", code, str(first_epoch["ckpt"])], capture_output=True, text=True)
    needed = set(json.loads(r.stdout.strip().splitlines()[-1]))  # in a process without the allowlist
    ours = {f"{o.__module__}.{o.__qualname__}" for o in compat.safe_globals()} | {"builtins.getattr"}
    assert needed <= ours and "mmengine.logging.history_buffer.HistoryBuffer" in needed
    # protocol 2 pickles HistoryBuffer.min as getattr(HistoryBuffer, 'min'): our getattr stand-in
    # allows exactly that and nothing else
    import pickle

    from mmengine.logging.history_buffer import HistoryBuffer

    assert compat._history_buffer_getattr(HistoryBuffer, "min") is HistoryBuffer.min
    for obj, name in ((os, "system"), (HistoryBuffer, "__init__"), (HistoryBuffer, "__class__"),
                      (HistoryBuffer(), "min")):
        with pytest.raises(pickle.UnpicklingError):
            compat._history_buffer_getattr(obj, name)


def test_resume_continues_iterations_with_the_saved_weights(first_epoch, tmp_path):
    import shutil

    import torch
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    wd = tmp_path / "wd"
    shutil.copytree(first_epoch["wd"], wd)
    saved = torch.load(first_epoch["ckpt"], map_location="cpu")["state_dict"]
    cfg = first_epoch["cfg"].copy()
    cfg.work_dir = str(wd)
    cfg.train_cfg.max_epochs = 2
    cfg.param_scheduler[0].end = 2
    cfg.resume, cfg.load_from = True, None
    seen = {}

    class Probe(Hook):
        def before_train(self, runner):
            seen["iter"], seen["epoch"] = runner.iter, runner.epoch
            sd = runner.model.state_dict()
            seen["equal"] = all(torch.equal(sd[k], v) for k, v in saved.items())

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            seen.setdefault("iters", []).append(runner.iter + 1)

    runner = Runner.from_cfg(cfg)
    runner.register_hook(Probe())
    runner.train()
    assert seen["iter"] == 2 and seen["epoch"] == 1 and seen["equal"]
    assert seen["iters"] == [3, 4] and runner.iter == 4
    assert (wd / "epoch_2.pth").is_file()


class _NotAllowed:
    pass


_INTERRUPTED = {"done": False}


@pytest.mark.parametrize("pointer", ["kept", "emptied"])
def test_job_resumes_an_interrupted_attempt(first_epoch, tmp_path, pointer):
    """An attempt with a checkpoint and no outcome (preemption, time limit) resumes in train_run;
    also when the kill came while mmengine rewrote its `last_checkpoint` pointer (left empty: seen
    on the cluster, where mmengine's own lookup then started the attempt over)."""
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    _INTERRUPTED["done"] = False

    @HOOKS.register_module(name="_SsflctlTestInterrupt", force=True)
    class Interrupt(Hook):
        priority = "LOWEST"

        def after_train_epoch(self, runner):
            if not _INTERRUPTED["done"] and runner.epoch == 0:
                _INTERRUPTED["done"] = True
                raise KeyboardInterrupt("simulated preemption")

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": "resume", "template": "retinanet_tiny",
        "params": {"data_root": str(first_epoch["root"]) + "/", "max_epochs": 2, "batch_size": 4,
                   "img_scale": [96, 96], "log_interval": 1},
        "overrides": {"custom_hooks": [{"type": "_SsflctlTestInterrupt"}]}, "test": False}))
    with pytest.raises(KeyboardInterrupt):
        job.train_run(run_dir)
    adir = run_dir / "attempt-1"
    assert (adir / "epoch_1.pth").is_file() and not (adir / "outcome.json").exists()
    if pointer == "emptied":
        (adir / "last_checkpoint").write_text("")
    out = job.train_run(run_dir)
    assert out["outcome"] == "done" and out["attempt"] == 1 and out["checkpoint"] == "epoch_2.pth"
    assert not (run_dir / "attempt-2").exists()
    logs = sorted(adir.glob("*/*.log"))
    assert len(logs) == 2 and "resumed epoch: 1, iter: 2" in logs[-1].read_text()
    assert json.loads((adir / "progress.json").read_text())["iter"] == 4


def test_a_requeue_signal_turned_into_another_error_is_not_a_failure(first_epoch, tmp_path, monkeypatch):
    """submitit's SIGUSR2 handler requeues the job and raises SystemExit wherever training is; measured
    on the cluster: it landed in mmengine's Config.pretty_text (called at each checkpoint), whose bare
    `except:` re-raises it as SyntaxError, and the attempt was recorded failed. Once the interruption is
    noted, the job exits without an outcome and the requeued job resumes the attempt."""
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    @HOOKS.register_module(name="_SsflctlTestSignalInPrettyText", force=True)
    class SignalDuringCheckpoint(Hook):
        priority = "LOWEST"

        def after_train_epoch(self, runner):
            if job._INTERRUPTED is None and runner.epoch == 0:
                job.note_interrupted(runner.work_dir.rsplit("/attempt-", 1)[0], "SIGUSR2 (test)")
                try:
                    raise SystemExit(-1)          # what submitit's handler raises after the requeue
                except:  # noqa: E722 - what mmengine's Config.pretty_text does
                    raise SyntaxError("Failed to format the config file, please check the syntax of: ")

    monkeypatch.setattr(job, "_INTERRUPTED", None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": "signalled", "template": "retinanet_tiny",
        "params": {"data_root": str(first_epoch["root"]) + "/", "max_epochs": 2, "batch_size": 4,
                   "img_scale": [96, 96], "log_interval": 1},
        "overrides": {"custom_hooks": [{"type": "_SsflctlTestSignalInPrettyText"}]}, "test": False}))
    with pytest.raises(SystemExit):
        job.train_run(run_dir)
    adir = run_dir / "attempt-1"
    assert not (adir / "outcome.json").exists() and (adir / "epoch_1.pth").is_file()
    rec = json.loads((adir / "recovery.json").read_text())
    assert [r["kind"] for r in rec] == ["interrupted"] and rec[0]["checkpoint"] == "epoch_1.pth"
    monkeypatch.setattr(job, "_INTERRUPTED", None)       # the requeued job is a new process
    out = job.train_run(run_dir)
    assert out["outcome"] == "done" and out["attempt"] == 1 and out["checkpoint"] == "epoch_2.pth"
    assert [r["kind"] for r in json.loads((adir / "recovery.json").read_text())] == ["interrupted", "resumed"]
