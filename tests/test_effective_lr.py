"""The lr a run really trains at with ``auto_scale_lr``, on REAL mmengine runs (node side).

mmengine 0.10.7's ``Runner.train`` scales every param group's lr by total batch / base batch
(``Runner.scale_lr``) when ``auto_scale_lr.enable`` is true, so attempt.json's lr (the config's) is
not the one the optimizer uses. The job's progress hook measures the base lr at ``before_train`` and
writes it into progress.json and outcome.json (``EffectiveLr``); the NaN retry lowers the config's
lr and says so. The toy least-squares model of ``tests/test_guard.py`` (4 iterations an epoch, a
few seconds a training on a CPU); the login side's views of these records: tests/test_status_view.py
and tests/test_report.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_guard import _cfg, _register, _train, _full_torch_load  # noqa: F401  (module fixture)

pytestmark = pytest.mark.training

BATCH = 4  # test_guard's per-process batch


def _toy(wd: Path, lr: float, *, base=None, enable=True, warmup=True, **kw):
    """test_guard's toy config at ``lr``; ``base``: auto_scale_lr.base_batch_size (None: no
    auto_scale_lr); ``warmup``: a linear warmup over the first 4 iterations (lr ×0.1 → ×1)."""
    import ssflctl.node.guard  # noqa: F401  (registers NanGuardHook, LrOverrideHook)

    _register()
    cfg = _cfg(wd, lr, name=f"elr-{wd.name}", **kw)
    if base is not None:
        cfg.auto_scale_lr = dict(enable=enable, base_batch_size=base)
    if warmup:
        cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=4)]
    return cfg


def _train_with_progress(cfg, wd: Path):
    """Train ``cfg`` with the job's own progress hook (interval 1); (runner, hook, exception)."""
    from mmengine.runner import Runner

    from ssflctl.node import job

    runner = Runner.from_cfg(cfg)
    hook = job._progress_hook(wd, 1)
    runner.register_hook(hook, priority="LOW")
    try:
        runner.train()
        return runner, hook, None
    except Exception as exc:  # noqa: BLE001 - the guard's exception is looked at
        return runner, hook, exc


def test_progress_records_the_lr_after_auto_scale_lr_and_before_warmup(tmp_path):
    """lr 0.3 for a base batch of 32, trained with 4: mmengine trains at 0.0375; the record says so
    although the first iterations (warmup ×0.1) run lower, and progress.json's own lr is the current."""
    from ssflctl.workdir.layout import AttemptDir

    wd = tmp_path / "scaled"
    runner, hook, exc = _train_with_progress(_toy(wd, 0.3, base=32, guard=False, epochs=2), wd)
    assert exc is None, exc
    eff = AttemptDir(wd).progress.effective_lr
    assert (eff.config, eff.scale, eff.batch, eff.base_batch, eff.world_size) == (0.3, 0.125, BATCH, 32, 1)
    assert eff.effective == pytest.approx(0.0375) and hook.effective_lr == eff
    # the optimizer really trained at it once the warmup was over (and at a tenth of it before)
    assert runner.optim_wrapper.get_lr()["lr"][0] == pytest.approx(0.0375)
    assert AttemptDir(wd).progress.lr == pytest.approx(0.0375)
    from ssflctl.workdir import mmlogs as logs

    (sc,) = logs.scalar_files(wd)
    assert [r["lr"] for r in logs.read_scalars(sc) if "loss" in r][0] == pytest.approx(0.00375)
    assert AttemptDir(wd).lr_text() == "0.3→0.0375 (auto_scale_lr)"  # no attempt.json here: the record's config lr
    assert eff.text() == "0.3→0.0375 (auto_scale_lr)"
    assert "ssflctl: optimizer base lr 0.3→0.0375 (auto_scale_lr) (×0.125: total batch 4 / " \
           "auto_scale_lr.base_batch_size 32)" in logs.text_logs(wd)[0].read_text()


def test_without_auto_scale_lr_the_record_is_the_config_lr(tmp_path):
    """auto_scale_lr present but off: no factor, the config's lr, the batch and base still said;
    the text views show the lr alone."""
    from ssflctl.workdir.layout import AttemptDir

    wd = tmp_path / "plain"
    _, hook, exc = _train_with_progress(_toy(wd, 0.3, base=32, enable=False, guard=False, epochs=1), wd)
    assert exc is None, exc
    eff = AttemptDir(wd).progress.effective_lr
    assert (eff.config, eff.effective, eff.scale, eff.batch, eff.base_batch) == (0.3, 0.3, None, BATCH, 32)
    assert eff.text() == "0.3"


def test_a_resume_at_a_lower_lr_keeps_the_scale(tmp_path):
    """A NaN retry from a checkpoint renders a lower *config* lr and resumes with LrOverrideHook:
    mmengine's resume restores the old (scaled) groups, the hook rescales them, and the measured
    base lr is the new config lr × the same factor."""
    from ssflctl.workdir.layout import AttemptDir

    first = tmp_path / "first"
    _, _, exc = _train_with_progress(_toy(first, 0.3, base=32, guard=False, epochs=1), first)
    assert exc is None, exc
    wd = tmp_path / "resumed"
    runner, _, exc = _train_with_progress(_toy(wd, 0.03, base=32, guard=False, override=True, epochs=2,
                                               resume_from=first / "epoch_1.pth"), wd)
    assert exc is None, exc
    eff = AttemptDir(wd).progress.effective_lr
    assert eff.config == 0.03 and eff.effective == pytest.approx(0.00375) and eff.scale == 0.125
    assert runner.optim_wrapper.get_lr()["lr"][0] == pytest.approx(0.00375)


def test_the_job_writes_it_into_outcome_and_the_nan_retry_says_which_lr(tmp_path):
    """train_attempt on a toy attempt directory: config lr 1.5, auto_scale_lr ×2 (base 2) trains at
    3, which diverges (tests/test_guard.py). outcome.json keeps the effective lr; the retry lowers
    the config's lr (0.15, which mmengine scales to 0.3 again) and its reason names both."""
    from ssflctl.node import job, retry
    from ssflctl.workdir.layout import AttemptDir
    from ssflctl.workdir.records import AttemptInfo

    adir = AttemptDir(tmp_path / "run" / "attempt-1")
    cfg = _toy(adir.path, 1.5, base=2, guard=True, warmup=False, epochs=10)
    adir.path.mkdir(parents=True)
    cfg.dump(str(adir.config_path))
    adir.write_info(AttemptInfo(run_id="run", attempt=1, config=str(adir.config_path), lr=1.5))
    out = job.train_attempt(adir.path)
    assert out["outcome"] == "nan"
    assert out["effective_lr"]["effective"] == pytest.approx(3.0) and out["effective_lr"]["scale"] == 2.0
    saved = json.loads((adir.path / "outcome.json").read_text())
    assert saved["effective_lr"] == out["effective_lr"]
    a = AttemptDir(adir.path)
    assert a.effective_lr.effective == pytest.approx(3.0) and a.lr_text() == "1.5→3 (auto_scale_lr)"
    assert a.nan.lr == pytest.approx(3.0)  # the guard's lr: the optimizer's current one

    d = retry.decide(retry.RetryPolicy.from_dict({}), adir.path, 1, 1.5, out)
    assert d.action == "retry" and d.lr == pytest.approx(0.15)
    assert "(lr 1.5→3 by auto_scale_lr)" in d.reason
    assert "the config lr is lowered" in d.reason and "×2" in d.reason
    assert d.details["lr"] == {"lowered": "config", "config": 1.5, "new_config": pytest.approx(0.15),
                               "effective": pytest.approx(3.0), "scale": 2.0, "new_effective": pytest.approx(0.3)}
