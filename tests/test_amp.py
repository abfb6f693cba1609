"""Mixed precision (issue 19): the loss family under torch.autocast, the `amp` param, a bf16 run.

The family computes in float32 whatever the logits' dtype (finite wherever float32 is, for logits
in [-30, 30]); mmdet's FocalLoss becomes FocalLossAMP (float32) under `amp`; `amp: bf16` renders
mmengine's AmpOptimWrapper and trains a tiny RetinaNet on the CPU through the job functions.
"""
from __future__ import annotations

import json
import math
import time

import pytest

from ssflctl.errors import UserError

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the unit tests below need no torch; conftest skips the training ones
    torch = F = None


# ------------------------------------------------------------------ ssflctl.plan.amp (no torch needed)
@pytest.mark.unit
def test_amp_values():
    from ssflctl.plan.amp import amp_dtype
    assert amp_dtype("bf16") == "bfloat16" and amp_dtype(" FP16 ") == "float16"
    for off in (None, False, "null", "none", "fp32", ""):
        assert amp_dtype(off) is None
    for bad in ("fp8", "float16", 16, True):
        with pytest.raises(UserError, match="not fp16, bf16 or null"):
            amp_dtype(bad)


@pytest.mark.unit
def test_apply_amp_sets_the_wrapper_and_swaps_every_focal_loss():
    from ssflctl.plan.amp import apply_amp
    cfg = {"optim_wrapper": {"type": "OptimWrapper", "optimizer": {"type": "SGD", "lr": 0.01}},
           "model": {"bbox_head": {"loss_cls": {"type": "FocalLoss", "gamma": 2.0},
                                   "loss_bbox": {"type": "L1Loss"}},
                     "roi_head": [{"loss_cls": {"type": "mmdet.FocalLoss"}},
                                  {"loss_cls": {"type": "ShiftStepFocalLoss", "shift": 0.1}}]}}
    apply_amp(cfg, "bf16", "t")
    assert cfg["optim_wrapper"] == {"type": "AnyDeviceAmpOptimWrapper", "dtype": "bfloat16",
                                    "loss_scale": "dynamic",
                                    "optimizer": {"type": "SGD", "lr": 0.01}}
    assert cfg["model"]["bbox_head"]["loss_cls"] == {"type": "FocalLossAMP", "gamma": 2.0}
    assert cfg["model"]["bbox_head"]["loss_bbox"]["type"] == "L1Loss"
    assert [h["loss_cls"]["type"] for h in cfg["model"]["roi_head"]] == ["FocalLossAMP", "ShiftStepFocalLoss"]
    assert cfg["custom_imports"] == {"imports": ["ssflctl.extensions.amp_runtime", "ssflctl.extensions.losses"],
                                     "allow_failed_imports": False}
    off = {"optim_wrapper": {"type": "OptimWrapper"}, "model": {"loss_cls": {"type": "FocalLoss"}}}
    apply_amp(off, None, "t")
    assert off == {"optim_wrapper": {"type": "OptimWrapper"}, "model": {"loss_cls": {"type": "FocalLoss"}}}
    own = {"optim_wrapper": {"type": "AmpOptimWrapper", "loss_scale": 512.0}}
    apply_amp(own, "fp16", "t")
    assert own["optim_wrapper"] == {"type": "AnyDeviceAmpOptimWrapper", "loss_scale": 512.0,
                                    "dtype": "float16"}
    with pytest.raises(UserError, match="OptimWrapper; the template uses 'ApexOptimWrapper'"):
        apply_amp({"optim_wrapper": {"type": "ApexOptimWrapper"}}, "fp16", "t")
    with pytest.raises(UserError, match="needs an optim_wrapper"):
        apply_amp({}, "bf16", "t")


# ------------------------------------------------------------------ the losses under autocast
def _cpu_autocast_dtypes():
    out = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        out.append(torch.float16)
    except (RuntimeError, AssertionError):  # older torch: CPU autocast is bf16 only
        pass
    return out


_LOSSES = {
    "ssfl": dict(type="ShiftStepFocalLoss"),
    "gfl": dict(type="GeneralizedFocalLossStar"),
    "ssfl_max_weight": dict(type="ShiftStepFocalLoss", max_weight=81.0),
    "focal_family": dict(type="FocalFamilyLoss", modulation="focal"),
    "focal_amp": dict(type="FocalLossAMP", use_sigmoid=True),
}


def _build(name, **kw):
    import ssflctl.extensions.losses  # noqa: F401  (registers)
    from mmdet.registry import MODELS
    return MODELS.build(dict(_LOSSES[name], **kw))


def _reference64(name, x64, labels):
    """float64 loss elementwise (no reduction) of the same (rounded) logits."""
    import ssflctl.extensions.losses as L
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss
    onehot = F.one_hot(labels, x64.size(1) + 1)[:, :x64.size(1)].double()
    if name == "focal_amp":
        return py_sigmoid_focal_loss(x64, onehot, gamma=2.0, alpha=0.25, reduction="none")
    mod = _build(name, reduction="none")
    return L.focal_family_loss(x64, onehot, gamma=mod.gamma, alpha=mod.alpha, modulation=mod.modulation,
                               shift=mod.shift, max_weight=mod.max_weight, reduction="none")


def _grid(n=241, c=3):
    x = torch.linspace(-30.0, 30.0, n).unsqueeze(1).repeat(1, c).contiguous()
    labels = torch.arange(n) % (c + 1)
    return x, labels


@pytest.mark.training
@pytest.mark.parametrize("name", list(_LOSSES))
@pytest.mark.parametrize("target_kind", ["indices", "onehot"])
def test_autocast_losses_compute_in_float32_and_match_float64(name, target_kind):
    x32, labels = _grid()
    avg_factor = 40.0
    for dtype in _cpu_autocast_dtypes():
        xl = x32.to(dtype).requires_grad_()             # as a head gives them under autocast
        target = labels if target_kind == "indices" else \
            F.one_hot(labels, 4)[:, :3].to(dtype)
        loss_fn = _build(name)
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(xl, target, avg_factor=avg_factor)
        assert loss.dtype == torch.float32, (name, dtype)
        assert torch.isfinite(loss), (name, dtype, loss)
        (grad,) = torch.autograd.grad(loss, xl)
        assert grad.dtype == dtype
        # float64 on the same rounded logits
        x64 = xl.detach().double().requires_grad_()
        ref = _reference64(name, x64, labels).sum() / (avg_factor + torch.finfo(torch.float32).eps)
        (ref_grad,) = torch.autograd.grad(ref, x64)
        assert math.isfinite(ref.item())
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-6, atol=0)
        # the gradient: float32 inside, rounded once to the logits' dtype
        eps = torch.finfo(dtype).eps
        big = torch.finfo(dtype).max
        representable = ref_grad.abs() < 0.9 * big
        assert torch.isfinite(grad[representable]).all(), (name, dtype)
        # atol: below the dtype's normal range (fp16), or, for a float32 autograd composition
        # (the float/soft-target path, and mmdet's own formula in focal_amp), at magnitudes
        # < 1e-15, where its cancellations leave no relative precision (measured: 7e-18 abs);
        # the closed-form class-index path holds the relative tolerance down to 1e-20
        floor = 1e-15 if (name == "focal_amp" or target_kind == "onehot") else 1e-20
        torch.testing.assert_close(grad.double()[representable], ref_grad[representable],
                                   rtol=eps, atol=max(torch.finfo(dtype).tiny, floor))
        # beyond the dtype's range the gradient overflows like any value would (fp16 only)
        assert torch.isinf(grad[ref_grad.abs() > 1.1 * big]).all()
        if dtype == torch.bfloat16:
            assert representable.all() and torch.isfinite(grad).all()


@pytest.mark.training
@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_retinanet_initial_logits_under_fp16_and_bf16(sigma):
    """Issue 19's probe: RetinaNet's prior logits N(-4.6, sigma^2), 0.1% positives. Before, fp16
    autocast made GFL*'s *loss* non-finite at sigma 1 and SSFL*'s at sigma 3. Now every loss is
    finite in both dtypes; the gradient is the float32 one rounded to the logits' dtype: finite
    in bf16; in fp16 it overflows only where the true gradient exceeds 65504 -- GFL*'s positives
    at x ~ -9 have factor e^18 (the loss itself, not rounding): there fp16 cannot train."""
    g = torch.Generator().manual_seed(0)
    n, c = 20_000, 80
    x = torch.randn(n, c, generator=g) * sigma - 4.595
    labels = torch.full((n,), c)
    pos = torch.rand(n, generator=g) < 0.08           # 0.1% of the n*c (anchor, class) pairs
    labels[pos] = torch.randint(0, c, (int(pos.sum()),), generator=g)
    avg = float(pos.sum())
    overflow = {}
    for dtype in _cpu_autocast_dtypes():
        for name in _LOSSES:
            xl = x.to(dtype).requires_grad_()
            with torch.autocast("cpu", dtype=dtype):
                loss = _build(name)(xl, labels, avg_factor=avg)
            loss.backward()
            x32 = xl.detach().float().requires_grad_()
            ref = _build(name)(x32, labels, avg_factor=avg)
            ref.backward()
            assert torch.isfinite(loss) and loss.dtype == torch.float32, (name, dtype, sigma)
            torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
            expected = x32.grad.to(dtype)
            assert torch.equal(torch.isfinite(xl.grad), torch.isfinite(expected)), (name, dtype)
            torch.testing.assert_close(xl.grad[torch.isfinite(expected)],
                                       expected[torch.isfinite(expected)], rtol=0, atol=0)
            overflow[dtype, name] = int((~torch.isfinite(xl.grad)).sum())
    print(f"\nsigma {sigma}: gradient elements beyond the dtype's range: "
          f"{ {f'{d}'.replace('torch.', '') + ':' + k: v for (d, k), v in overflow.items() if v} }")
    assert all(v == 0 for (d, _), v in overflow.items() if d == torch.bfloat16)
    if torch.float16 in _cpu_autocast_dtypes() and sigma == 1.0:
        assert {k: v for (d, k), v in overflow.items() if d == torch.float16 and v} .keys() <= {"gfl"}


@pytest.mark.training
def test_focal_loss_amp_is_mmdet_focal_loss_in_float32():
    from mmdet.models.losses import FocalLoss
    x, labels = _grid(n=97)
    weight = torch.rand(97)
    ref = FocalLoss(use_sigmoid=True)(x, labels, weight, avg_factor=9.0)
    ours = _build("focal_amp")
    assert isinstance(ours, FocalLoss)
    torch.testing.assert_close(ours(x, labels, weight, avg_factor=9.0), ref, rtol=0, atol=0)
    xb = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(xb, labels, weight, avg_factor=9.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, FocalLoss(use_sigmoid=True)(xb.float(), labels, weight,
                                                                 avg_factor=9.0), rtol=0, atol=0)


# ------------------------------------------------------------------ the `amp` param, rendered
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from ssflctl.convert import synth_coco
    root = tmp_path_factory.mktemp("synth")
    synth_coco.generate(root, n_train=8, n_val=4, seed=0)
    return root


@pytest.mark.training
def test_render_amp_param(synth):
    from ssflctl.plan import render
    base = {"data_root": str(synth) + "/"}
    cfg = render.render_config("retinanet_tiny", {**base, "amp": "bf16", "loss": "focal"})
    assert cfg.optim_wrapper.type == "AnyDeviceAmpOptimWrapper"
    assert "ssflctl.extensions.amp_runtime" in cfg.custom_imports.imports
    assert (cfg.optim_wrapper.dtype, cfg.optim_wrapper.loss_scale) == ("bfloat16", "dynamic")
    assert cfg.optim_wrapper.optimizer.lr == 0.01
    assert cfg.model.bbox_head.loss_cls.type == "FocalLossAMP"
    assert cfg.ssflctl_params.amp == "bf16"
    cfg = render.render_config("retinanet_tiny", {**base, "amp": "fp16", "loss": "ssfl"})
    assert (cfg.optim_wrapper.type, cfg.optim_wrapper.dtype) == ("AnyDeviceAmpOptimWrapper", "float16")
    assert cfg.model.bbox_head.loss_cls.type == "ShiftStepFocalLoss"
    cfg = render.render_config("retinanet_tiny", {**base, "loss": "focal"})
    assert cfg.optim_wrapper.type == "OptimWrapper" and "dtype" not in cfg.optim_wrapper
    assert cfg.model.bbox_head.loss_cls.type == "FocalLoss"
    with pytest.raises(UserError, match="params.amp: 'fp8' is not fp16, bf16 or null"):
        render.render_config("retinanet_tiny", {**base, "amp": "fp8"})
    for name in render.list_templates():
        assert render.template_params(name)["amp"] is None, name


# ------------------------------------------------------------------ a tiny bf16 run on the CPU
@pytest.mark.training
def test_tiny_bf16_training_through_the_job_path(tmp_path, synth, monkeypatch):
    import ssflctl.extensions.losses as L
    from ssflctl.node import job
    seen = []
    forward = L.FocalLossAMP.forward

    def spy(self, pred, *args, **kwargs):
        out = forward(self, pred, *args, **kwargs)
        seen.append((pred.dtype, out.dtype, bool(torch.isfinite(out))))
        return out

    monkeypatch.setattr(L.FocalLossAMP, "forward", spy)
    run_dir = tmp_path / "runs" / "tiny-bf16"
    run_dir.mkdir(parents=True)
    params = {"loss": "focal", "amp": "bf16", "max_epochs": 1, "batch_size": 4, "lr": 0.01,
              "seed": 0, "log_interval": 1, "data_root": str(synth) + "/"}
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": "tiny-bf16", "name": "tiny-bf16", "template": "retinanet_tiny", "params": params,
        "overrides": {}, "retry": {}, "test": True}))
    t0 = time.time()
    result = job.train_and_test(run_dir)
    seconds = time.time() - t0
    print(f"\ntiny bf16 run: {seconds:.1f} s, {len(seen)} loss calls")
    assert result["outcome"]["outcome"] == "done", result["outcome"]
    config = (run_dir / "attempt-1" / "config.py").read_text()
    assert "AnyDeviceAmpOptimWrapper" in config and "bfloat16" in config and "FocalLossAMP" in config
    train_calls = [s for s in seen if s[0] == torch.bfloat16]
    assert train_calls, seen                          # autocast was on: the head gave bf16 logits
    assert all(out == torch.float32 and finite for _, out, finite in train_calls)
    assert "bbox" in result["metrics"]


# ------------------------------------------------------------------ the NaN guard under AMP
@pytest.mark.unit
def test_guard_records_amp_and_suggests_bf16_or_fp32_under_fp16():
    from ssflctl.node import guard

    class _Scaler:
        def __init__(self, enabled):
            self.enabled = enabled

        def is_enabled(self):
            return self.enabled

        def get_scale(self):
            return 1024.0

    AmpOptimWrapper = type("AmpOptimWrapper", (), {})
    OptimWrapper = type("OptimWrapper", (), {})

    def runner(wrapper):
        return type("R", (), {"optim_wrapper": wrapper, "iter": 9, "epoch": 0, "work_dir": "w"})()

    fp16 = type("AnyDeviceAmpOptimWrapper", (AmpOptimWrapper,), {})()   # a subclass counts
    fp16.cast_dtype, fp16.loss_scaler = None, _Scaler(True)       # mmengine: None = float16
    assert guard._amp_of(runner(fp16)) == {"dtype": "float16", "loss_scale": 1024.0}
    bf16 = AmpOptimWrapper()
    bf16.cast_dtype, bf16.loss_scaler = "torch.bfloat16", _Scaler(False)  # CPU: scaler off
    assert guard._amp_of(runner(bf16)) == {"dtype": "bfloat16", "loss_scale": None}
    assert guard._amp_of(runner(OptimWrapper())) is None

    rec = guard.build_record(runner(fp16), 3, {"loss": math.inf, "loss_cls": math.inf},
                             {"loss": "inf", "loss_cls": "inf"}, {}, 9)
    assert rec["amp"] == {"dtype": "float16", "loss_scale": 1024.0}
    assert rec["reason"].startswith("Inf in loss_cls at iter 10")
    assert "fp16 AMP" in rec["reason"] and "amp: bf16" in rec["reason"] and "amp: null" in rec["reason"]
    rec = guard.build_record(runner(bf16), 3, {"loss": math.nan}, {"loss": "nan"}, {}, 9)
    assert rec["amp"]["dtype"] == "bfloat16" and "AMP" not in rec["reason"]
    rec = guard.build_record(runner(OptimWrapper()), 3, {"loss": math.nan}, {"loss": "nan"}, {}, 9)
    assert "amp" not in rec
