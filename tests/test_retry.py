"""ssflctl.node.retry: policy validation and decisions (unit; the real resume is in test_guard.py)."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest

from ssflctl.node import retry
from ssflctl.errors import UserError
from ssflctl.node.retry import RetryPolicy, decide

pytestmark = pytest.mark.unit


def test_defaults():
    p = RetryPolicy.from_dict(None)
    assert p == RetryPolicy.from_dict({})
    assert p.to_dict() == retry.DEFAULTS
    assert RetryPolicy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("bad, key", [
    ({"factor": 2}, "retry.factor"), ({"factor": 0}, "retry.factor"), ({"factor": "x"}, "retry.factor"),
    ({"max_attempts": 0}, "retry.max_attempts"), ({"max_attempts": 2.5}, "retry.max_attempts"),
    ({"on_nan": "explode"}, "retry.on_nan"), ({"from": "middle"}, "retry.from"),
    ({"on_preempt": "x"}, "retry.on_preempt"), ({"on_node_fail": "x"}, "retry.on_node_fail"),
    ({"on_error": "x"}, "retry.on_error"), ({"factr": 0.1}, "retry.factr"),
])
def test_bad_values_name_the_key(bad, key):
    with pytest.raises(UserError) as ei:
        RetryPolicy.from_dict(bad)
    assert str(ei.value).startswith(key + ":")


def _ckpt(path: Path, it: int, ep: int):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"meta": {"iter": it, "epoch": ep}}, protocol=2))


NAN = {"iter": 25, "epoch": 3, "loss_key": "loss_cls", "nonfinite": {"loss": "nan", "loss_cls": "nan"},
       "lr": 0.01, "last_finite_iter": 24}


def test_nan_lower_lr_from_scratch(tmp_path):
    d = decide(RetryPolicy.from_dict({}), tmp_path, 1, 0.01, {"outcome": "nan", "nan": NAN})
    assert d.action == "retry" and d.lr == 0.001 and d.resume_from is None
    assert d.reason == "after NaN in loss_cls at epoch 3 iter 25 (lr 0.01)"


def test_nan_attempts_spent(tmp_path):
    d = decide(RetryPolicy.from_dict({"max_attempts": 2}), tmp_path, 2, 0.001, {"outcome": "nan", "nan": NAN})
    assert d.action == "stop" and "2/2 attempts spent" in d.reason and d.lr == 0.001


def test_nan_from_clean_checkpoint_ignores_poisoned_pointer(tmp_path):
    for it, ep in ((8, 1), (16, 2), (24, 3), (32, 4)):
        _ckpt(tmp_path / f"epoch_{ep}.pth", it, ep)
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "epoch_4.pth"))
    # NaN first at iteration 25: epoch_3 (after 24 iterations) holds the weights that gave it
    assert retry.clean_checkpoint(tmp_path, 25) == str(tmp_path / "epoch_2.pth")
    assert retry.clean_checkpoint(tmp_path, 26) == str(tmp_path / "epoch_3.pth")
    assert retry.clean_checkpoint(tmp_path, 3) is None
    d = decide(RetryPolicy.from_dict({"from": "checkpoint"}), tmp_path, 1, 0.01,
               {"outcome": "nan", "nan": NAN})
    assert d.action == "retry" and d.resume_from == str(tmp_path / "epoch_2.pth")


def test_nan_from_nan_json_when_outcome_lacks_it(tmp_path):
    (tmp_path / "nan.json").write_text(json.dumps(NAN))
    d = decide(RetryPolicy.from_dict({"on_nan": "retry"}), tmp_path, 1, 0.01, {"outcome": "nan"})
    assert d.action == "retry" and d.lr == 0.01 and "loss_cls at epoch 3 iter 25" in d.reason


def test_other_outcomes(tmp_path):
    pol = RetryPolicy.from_dict({})
    _ckpt(tmp_path / "iter_10.pth", 10, 0)
    _ckpt(tmp_path / "iter_20.pth", 20, 0)
    d = decide(pol, tmp_path, 1, 0.01, {"outcome": "preempted"})
    assert d.action == "resume" and d.lr == 0.01 and d.resume_from == str(tmp_path / "iter_20.pth")
    d = decide(pol, tmp_path, 1, 0.01, {"outcome": "node_fail"})
    assert d.action == "resume" and d.resume_from.endswith("iter_20.pth")
    d = decide(pol, tmp_path, 1, 0.01, {"outcome": "failed", "reason": "CUDA out of memory"})
    assert d.action == "stop" and d.lr == 0.01 and d.reason == "failed: CUDA out of memory"
    d = decide(RetryPolicy.from_dict({"on_error": "retry"}), tmp_path, 1, 0.01, {"outcome": "failed", "reason": "x"})
    assert d.action == "retry" and d.lr == 0.01
    assert decide(pol, tmp_path, 1, 0.01, {"outcome": "done"}).action == "stop"
    assert decide(RetryPolicy.from_dict({"on_preempt": "fail"}), tmp_path, 1, 0.01,
                  {"outcome": "timeout"}).action == "stop"


def test_clean_checkpoint_falls_back_to_the_attempts_own_start(tmp_path):
    prev = tmp_path / "attempt-1"
    prev.mkdir()
    _ckpt(prev / "epoch_2.pth", 16, 2)
    cur = tmp_path / "attempt-2"
    cur.mkdir()
    (cur / "attempt.json").write_text(json.dumps({"resume_from": str(prev / "epoch_2.pth")}))
    # attempt 2 resumed epoch_2 (iter 16) and went NaN at iter 19 before saving anything
    assert retry.clean_checkpoint(cur, 19) == str(prev / "epoch_2.pth")
    assert retry.clean_checkpoint(cur, 17) is None  # its start gave the NaN itself


def test_a_crash_after_a_logged_nan_is_a_nan(tmp_path):
    d = tmp_path / "20260101_120000"
    (d / "vis_data").mkdir(parents=True)
    (d / "vis_data" / "scalars.json").write_text(
        '{"lr": 0.01, "loss": 1.0, "loss_cls": 0.5, "epoch": 1, "iter": 50}\n'
        '{"lr": 0.01, "loss": NaN, "loss_cls": NaN, "epoch": 1, "iter": 100}\n')
    out = {"outcome": "failed", "reason": "AssertionError: boxes contain NaN"}
    d1 = decide(RetryPolicy.from_dict({}), tmp_path, 1, 0.01, out)
    assert d1.action == "retry" and d1.lr == 0.001
    assert d1.reason == "after NaN in loss_cls at epoch 1 iter 100 (lr 0.01)"
    (d / "vis_data" / "scalars.json").write_text('{"lr": 0.01, "loss": 1.0, "epoch": 1, "iter": 50}\n')
    d2 = decide(RetryPolicy.from_dict({}), tmp_path, 1, 0.01, out)
    assert d2.action == "stop" and d2.reason == "failed: AssertionError: boxes contain NaN"


@pytest.mark.unit
def test_a_pure_fp16_overflow_is_not_retried_at_a_lower_lr(tmp_path):
    """Under amp: fp16 an inf loss (float16's range exceeded) stops with what to change; a NaN, or
    an inf without fp16 AMP, is still retried at lr × factor (issue 19.3)."""
    from ssflctl.node import retry as r

    base = {"iter": 7, "epoch": 1, "loss_key": "loss_cls", "lr": 0.01}
    inf16 = dict(base, nonfinite={"loss_cls": "inf"}, amp={"dtype": "float16", "loss_scale": 65536.0})
    d = r.decide(r.RetryPolicy(), tmp_path, 1, 0.01, {"outcome": "nan", "nan": inf16})
    assert d.action == "stop" and d.lr == 0.01 and "amp: bf16" in d.reason and "float16 overflow" in d.reason
    nan16 = dict(inf16, nonfinite={"loss_cls": "nan"})
    assert r.decide(r.RetryPolicy(), tmp_path, 1, 0.01, {"outcome": "nan", "nan": nan16}).lr == pytest.approx(0.001)
    inf32 = dict(base, nonfinite={"loss_cls": "inf"})
    assert r.decide(r.RetryPolicy(), tmp_path, 1, 0.01, {"outcome": "nan", "nan": inf32}).action == "retry"
