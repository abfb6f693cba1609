"""ssflctl.extensions.losses: SSFL*/GFL*/Focal Loss from logits, checked against the seed and mmdet."""
from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.training

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # tests/conftest.py skips every test here (fails them in CI) with the reason
    torch = F = None


@pytest.fixture(scope="module")
def L():
    import ssflctl.extensions.losses as losses
    return losses


def _grid(dtype=None, lo=-20.0, hi=20.0, n=161, num_classes=3):
    """Every logit of the grid against a positive and a negative class, plus background rows."""
    dtype = dtype or torch.float64
    x = torch.linspace(lo, hi, n, dtype=dtype)
    pred = x.unsqueeze(1).repeat(1, num_classes).contiguous()       # (n, C)
    labels = torch.arange(n) % (num_classes + 1)                    # includes background = C
    onehot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(dtype)
    return pred, labels, onehot


# ------------------------------------------------------------------ the seed's formula
@pytest.mark.parametrize("shift", [0.0, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("alpha", [0.25, 0.75])
def test_ssfl_equals_seed_literal_formula_float64(L, shift, gamma, alpha):
    pred, labels, onehot = _grid()
    untouched = pred.clone()
    ref = L.ssfl_factor_reference(pred, onehot, shift=shift, gamma=gamma, alpha=alpha)
    assert torch.isfinite(ref).all()
    # class-index targets (closed-form backward path) and one-hot float targets (autograd path)
    for target in (labels, onehot):
        ours = L.focal_family_loss(pred, target, gamma=gamma, alpha=alpha, shift=shift,
                                   reduction="none")
        # rtol: the literal formula itself loses ~1e-7 relative to the cancellation in 1 - q at |x|=20
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-12)
    # the nn.Module and the registry alias give the same numbers
    mod = L.ShiftStepFocalLoss(gamma=gamma, alpha=alpha, shift=shift, reduction="none")
    torch.testing.assert_close(mod(pred, labels), ref, rtol=1e-6, atol=1e-12)
    assert torch.equal(pred, untouched)                       # nothing works in place on pred


@pytest.mark.parametrize("shift", [0.0, 0.1])
def test_ssfl_soft_targets_follow_the_seed_linear_mix(L, shift):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(64, 5, generator=g, dtype=torch.float64) * 6
    soft = torch.rand(64, 5, generator=g, dtype=torch.float64)
    ref = L.ssfl_factor_reference(pred, soft, shift=shift)
    ours = L.focal_family_loss(pred, soft, shift=shift, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-12)


def test_gfl_star_alias_is_shift_zero(L):
    from mmdet.registry import MODELS
    gfl = MODELS.build(dict(type="GeneralizedFocalLossStar", gamma=2.0, alpha=0.25))
    assert isinstance(gfl, L.ShiftStepFocalLoss) and gfl.shift == 0.0
    pred, labels, onehot = _grid()
    ref = L.ssfl_factor_reference(pred, onehot, shift=0.0)
    torch.testing.assert_close(gfl(pred, labels, reduction_override="none"), ref,
                               rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------ equality with mmdet's FocalLoss
def _mmdet_focal(**kw):
    from mmdet.models.losses import FocalLoss
    return FocalLoss(use_sigmoid=True, **kw)


def _random_case(n=300, c=7, seed=0, dtype=None, scale=4.0):
    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(n, c, generator=g) * scale - 2.0).to(dtype)
    labels = torch.randint(0, c + 1, (n,), generator=g)
    return pred, labels, g


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.0, 0.5), (1.5, 0.75), (3.0, 0.1)])
def test_focal_factor_equals_mmdet_focal_loss(L, gamma, alpha):
    pred, labels, _ = _random_case()
    ref = _mmdet_focal(gamma=gamma, alpha=alpha, reduction="none")(pred, labels)
    ours = L.FocalFamilyLoss(modulation="focal", gamma=gamma, alpha=alpha,
                             reduction="none")(pred, labels)
    # float32: equal up to float32 rounding of values up to ~15 (a few ulps)
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-6)
    # float64: equal to 1e-6 absolute (in fact ~1e-15; tiny values differ by torch's BCE rounding)
    ref64 = _mmdet_focal(gamma=gamma, alpha=alpha, reduction="none")(pred.double(), labels)
    ours64 = L.FocalFamilyLoss(modulation="focal", gamma=gamma, alpha=alpha,
                               reduction="none")(pred.double(), labels)
    torch.testing.assert_close(ours64, ref64, rtol=1e-9, atol=1e-12)
    assert (ours64 - ref64).abs().max().item() < 1e-6
    # gradients too
    p1 = pred.clone().requires_grad_()
    p2 = pred.clone().requires_grad_()
    _mmdet_focal(gamma=gamma, alpha=alpha)(p1, labels).backward()
    L.FocalFamilyLoss(modulation="focal", gamma=gamma, alpha=alpha)(p2, labels).backward()
    torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-7)


def test_focal_factor_equals_mmdet_py_sigmoid_focal_loss_float64(L):
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss
    pred, labels, _ = _random_case(dtype=torch.float64, scale=8.0)
    onehot = F.one_hot(labels, pred.size(1) + 1)[:, :pred.size(1)]
    ref = py_sigmoid_focal_loss(pred, onehot, gamma=2.0, alpha=0.25, reduction="none")
    for target in (labels, onehot.double()):
        ours = L.focal_family_loss(pred, target, modulation="focal", reduction="none")
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


def test_focal_factor_equals_mmcv_sigmoid_focal_loss_op_if_it_runs_here(L):
    from mmcv.ops import sigmoid_focal_loss
    pred, labels, _ = _random_case()
    if torch.cuda.is_available():                     # mmdet's FocalLoss uses this kernel on CUDA
        pred, labels = pred.cuda(), labels.cuda()
    try:
        ref = sigmoid_focal_loss(pred, labels, 2.0, 0.25, None, "none")
    except (RuntimeError, NotImplementedError) as exc:  # mmcv 2.1 ships the op for CUDA/MLU/NPU
        pytest.skip(f"mmcv's sigmoid_focal_loss op has no implementation on {pred.device}: {exc}")
    ours = L.focal_family_loss(pred, labels, modulation="focal", reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


_REDUCTION_CASES = [
    dict(reduction="mean"),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(reduction="mean", avg_factor=37.0),
    dict(reduction="none", avg_factor=37.0),
    dict(reduction="mean", weight="per_prior"),
    dict(reduction="mean", weight="per_prior", avg_factor=11.5),
    dict(reduction="sum", weight="per_class"),
    dict(reduction="mean", weight="flat", avg_factor=5.0),
    dict(reduction="mean", reduction_override="sum"),
    dict(reduction="sum", reduction_override="none", weight="per_prior"),
    dict(reduction="sum", reduction_override="mean", avg_factor=3.0),
]


def _weight(kind, n, c, g):
    if kind is None:
        return None
    if kind == "per_prior":
        return torch.rand(n, generator=g)
    if kind == "per_class":
        return torch.rand(n, c, generator=g)
    return torch.rand(n * c, generator=g)


@pytest.mark.parametrize("case", _REDUCTION_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("loss_weight", [1.0, 0.5])
def test_reduction_weight_avg_factor_as_mmdet(L, case, loss_weight):
    from mmdet.models.losses.utils import weight_reduce_loss
    pred, labels, g = _random_case(n=120, c=5, seed=3)
    weight = _weight(case.get("weight"), 120, 5, g)
    call = dict(weight=weight, avg_factor=case.get("avg_factor"),
                reduction_override=case.get("reduction_override"))
    ref = _mmdet_focal(reduction=case["reduction"], loss_weight=loss_weight)(pred, labels, **call)
    ours = L.FocalFamilyLoss(modulation="focal", reduction=case["reduction"],
                             loss_weight=loss_weight)(pred, labels, **call)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)

    # SSFL*: the same reduction machinery applied to its own elementwise loss
    ssfl = L.ShiftStepFocalLoss(reduction=case["reduction"], loss_weight=loss_weight)
    got = ssfl(pred, labels, **call)
    elem = L.focal_family_loss(pred, labels, reduction="none")
    w = None if weight is None else (weight.view(-1, 1) if weight.numel() == 120 else weight.view(120, 5))
    expected = loss_weight * weight_reduce_loss(
        elem, w, case.get("reduction_override") or case["reduction"], case.get("avg_factor"))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_avg_factor_with_sum_is_rejected_like_mmdet(L):
    pred, labels, _ = _random_case(n=10, c=3)
    with pytest.raises(ValueError, match="avg_factor"):
        _mmdet_focal(reduction="sum")(pred, labels, avg_factor=2.0)
    with pytest.raises(ValueError, match="avg_factor"):
        L.ShiftStepFocalLoss(reduction="sum")(pred, labels, avg_factor=2.0)


def test_bad_targets_and_parameters_are_rejected(L):
    from ssflctl.errors import UserError
    pred = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        L.focal_family_loss(pred, torch.tensor([0, 1, 4, 3]))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        L.focal_family_loss(pred, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(UserError, match="use_sigmoid"):
        L.ShiftStepFocalLoss(use_sigmoid=False)
    with pytest.raises(UserError, match="shift"):
        L.ShiftStepFocalLoss(shift=1.0)
    with pytest.raises(UserError, match="max_weight"):
        L.ShiftStepFocalLoss(max_weight=0)
    with pytest.raises(UserError, match="modulation"):
        L.FocalFamilyLoss(modulation="softmax")
    with pytest.raises(UserError, match="activated"):
        L.ShiftStepFocalLoss(activated=True)
    from mmdet.registry import MODELS
    with pytest.raises(UserError, match=r"loss_cls\.shift: 1\.5"):       # through the registry too
        MODELS.build(dict(type="ShiftStepFocalLoss", shift=1.5))
    with pytest.raises(ValueError, match="reduction_override"):
        L.ShiftStepFocalLoss()(pred, torch.tensor([0, 1, 2, 3]), reduction_override="avg")


# ------------------------------------------------------------------ gradients and stability
@pytest.mark.parametrize("modulation,shift", [("ssfl", 0.1), ("ssfl", 0.0), ("ssfl", 0.3),
                                              ("focal", 0.0)])
@pytest.mark.parametrize("max_weight", [None, 4.0])
def test_gradcheck_float64(L, modulation, shift, max_weight):
    g = torch.Generator().manual_seed(7)
    pred = (torch.randn(8, 3, generator=g, dtype=torch.float64) * 5).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 3, 1, 0, 3])
    soft = torch.rand(8, 3, generator=g, dtype=torch.float64)
    weight = torch.rand(8, generator=g, dtype=torch.float64)
    kw = dict(modulation=modulation, shift=shift, max_weight=max_weight, gamma=2.0, alpha=0.25)
    # reduced to a scalar, the finite differences of gradcheck only resolve modest logits: the sum
    # of elements up to e^(2*|x|) has a rounding error larger than gradcheck's atol otherwise
    small = (pred.detach() / 2.5).requires_grad_()
    for target in (labels, soft):
        assert torch.autograd.gradcheck(
            lambda z: L.focal_family_loss(z, target, reduction="none", **kw), (pred,))
        assert torch.autograd.gradcheck(
            lambda z: L.focal_family_loss(z, target, weight, avg_factor=3.0, **kw), (small,))


@pytest.mark.parametrize("modulation,shift", [("ssfl", 0.1), ("ssfl", 0.0), ("focal", 0.0)])
@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_float32_finite_values_and_gradients_on_minus30_to_30(L, modulation, shift, gamma):
    pred64, labels, onehot = _grid(lo=-30.0, hi=30.0, n=241)
    results = {}
    for dtype in (torch.float32, torch.float64):
        for name, target in (("idx", labels), ("onehot", onehot.to(dtype))):
            pred = pred64.to(dtype).requires_grad_()
            loss = L.focal_family_loss(pred, target, gamma=gamma, modulation=modulation,
                                       shift=shift, reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), pred)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (dtype, name)
            results[dtype, name] = (loss.detach().double(), grad.double())
    ref_loss, ref_grad = results[torch.float64, "idx"]
    for name in ("idx", "onehot"):
        loss, grad = results[torch.float32, name]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # the closed-form backward and the autograd composition agree in float64
    torch.testing.assert_close(results[torch.float64, "onehot"][1], ref_grad, rtol=1e-9, atol=1e-12)


def test_confident_wrong_predictions_weights_as_documented(L):
    gamma, s = 2.0, 0.1
    x = torch.tensor([-30.0, -10.0, 10.0, 30.0], dtype=torch.float64)
    pos = torch.ones_like(x).unsqueeze(1)
    neg = torch.zeros_like(x).unsqueeze(1)

    def factor(target, shift):
        return torch.exp(L.log_modulating_factor(x.unsqueeze(1), target, gamma=gamma,
                                                 modulation="ssfl", shift=shift)).squeeze(1)

    # GFL*: exactly exp(gamma |x|) when wrong (positive with x < 0, negative with x > 0)
    torch.testing.assert_close(factor(pos, 0.0)[:2], torch.exp(gamma * x[:2].abs()), rtol=1e-12, atol=0)
    torch.testing.assert_close(factor(neg, 0.0)[2:], torch.exp(gamma * x[2:]), rtol=1e-12, atol=0)
    # SSFL*: positives saturate at ((1 - s) / s) ** gamma, negatives grow like e^{gamma x} / (1-s)^gamma
    assert factor(pos, s)[0].item() == pytest.approx(((1 - s) / s) ** gamma, rel=1e-9)
    assert factor(pos, s)[0] > factor(pos, s)[1]
    torch.testing.assert_close(factor(neg, s)[2:], ((torch.exp(x[2:]) + s) / (1 - s)) ** gamma,
                               rtol=1e-12, atol=0)
    # easy negatives keep the floor (s / (1 - s)) ** gamma
    assert factor(neg, s)[0].item() == pytest.approx((s / (1 - s)) ** gamma, rel=1e-9)


@pytest.mark.parametrize("shift", [0.0, 0.1])
def test_max_weight_bounds_the_factor_and_the_gradient(L, shift):
    max_w = 10.0
    pred64, labels, onehot = _grid(lo=-30.0, hi=30.0, n=241)
    alpha_t = 0.25 * onehot + 0.75 * (1 - onehot)
    for target in (labels, onehot):
        pred = pred64.clone().requires_grad_()
        loss = L.focal_family_loss(pred, target, shift=shift, max_weight=max_w, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), pred)
        bce = F.binary_cross_entropy_with_logits(pred64, onehot, reduction="none")
        factor = loss.detach() / (alpha_t * bce)
        assert factor.max().item() <= max_w * (1 + 1e-9)
        assert factor.max().item() == pytest.approx(max_w, rel=1e-9)   # the clamp is active here
        clamped = factor >= max_w * (1 - 1e-9)
        assert clamped.any()
        # where the clamp is active the factor is a constant: |grad| = alpha_t * max_w * |dBCE/dx|
        assert (grad.abs()[clamped] <= (alpha_t * max_w)[clamped] * (1 + 1e-9)).all()
        assert grad.abs().max().item() < 1e3
        unclamped = L.focal_family_loss(pred64, target, shift=shift, reduction="none")
        below = (unclamped / (alpha_t * bce)) < max_w
        torch.testing.assert_close(loss.detach()[below], unclamped[below], rtol=1e-12, atol=0)
    # without the clamp the same logits give unbounded gradients (the documented behaviour)
    pred = pred64.clone().requires_grad_()
    (g_free,) = torch.autograd.grad(L.focal_family_loss(pred, labels, shift=shift).sum(), pred)
    assert g_free.abs().max().item() > 1e20


# ------------------------------------------------------------------ mmdet integration
def test_registered_and_built_through_custom_imports(L, tmp_path):
    from mmengine.config import Config
    from mmdet.registry import MODELS
    cfg_file = tmp_path / "loss_cfg.py"
    cfg_file.write_text(
        "custom_imports = dict(imports=['ssflctl.extensions.losses'], allow_failed_imports=False)\n"
        "loss_cls = dict(type='ShiftStepFocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,\n"
        "                shift=0.1, loss_weight=1.0)\n")
    cfg = Config.fromfile(str(cfg_file))
    loss = MODELS.build(cfg.loss_cls)
    assert type(loss).__name__ == "ShiftStepFocalLoss"
    assert (loss.gamma, loss.alpha, loss.shift, loss.max_weight) == (2.0, 0.25, 0.1, None)
    for name in ("ShiftStepFocalLoss", "GeneralizedFocalLossStar", "FocalFamilyLoss"):
        assert MODELS.get(name) is getattr(L, name)


def _retinanet_cfg(loss_cls):
    """mmdet's retinanet_r50_fpn model dict, narrowed to ResNet-18 for a quick CPU step."""
    import os

    import mmdet
    from mmengine.config import Config
    base = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "_base_", "models",
                        "retinanet_r50_fpn.py")
    model = Config.fromfile(base).model
    model.backbone.update(depth=18, init_cfg=None)     # no downloads here
    model.neck.update(in_channels=[64, 128, 256, 512], out_channels=64)
    model.bbox_head.update(num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2,
                           loss_cls=loss_cls)
    return model


def test_retinanet_with_ssfl_builds_and_backprops(L):
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules()
    torch.manual_seed(0)
    ssfl_cfg = dict(type="ShiftStepFocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25,
                    shift=0.1, loss_weight=1.0)
    model = MODELS.build(_retinanet_cfg(ssfl_cfg))
    assert type(model.bbox_head.loss_cls) is L.ShiftStepFocalLoss
    model.train()
    packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 96, 128), (3, 128, 96)],
                            num_items=[2, 3], num_classes=3)
    data = model.data_preprocessor(packed, True)
    gfl_clamped = MODELS.build(dict(type="GeneralizedFocalLossStar", gamma=2.0, alpha=0.25,
                                    max_weight=100.0))
    for loss_cls in (model.bbox_head.loss_cls, gfl_clamped):
        model.bbox_head.loss_cls = loss_cls
        model.zero_grad()
        losses = model.loss(data["inputs"], data["data_samples"])
        assert {"loss_cls", "loss_bbox"} <= set(losses)
        loss_cls_total = sum(losses["loss_cls"])
        assert torch.isfinite(loss_cls_total) and loss_cls_total.item() > 0
        total = loss_cls_total + sum(losses["loss_bbox"])
        total.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert model.bbox_head.retina_cls.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ the fused class-index path (issue 19)
def _seed_grad(pred64, onehot, shift, gamma, alpha, weight=None, reduce="sum", avg_factor=None):
    """Gradient of the seed's literal formula (autograd through ssfl_factor_reference), float64."""
    import ssflctl.extensions.losses as L
    x = pred64.clone().requires_grad_()
    loss = L.ssfl_factor_reference(x, onehot, shift=shift, gamma=gamma, alpha=alpha)
    if weight is not None:
        loss = loss * (weight.view(-1, 1) if weight.dim() == 1 else weight)
    total = loss.sum() if avg_factor is None else loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)
    (grad,) = torch.autograd.grad(total, x)
    return total.detach(), grad


@pytest.mark.parametrize("shift", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.0, 0.75), (0.5, 0.5), (3.0, 0.1)])
@pytest.mark.parametrize("weight_kind", [None, "per_prior", "per_class"])
def test_closed_form_gradient_equals_autograd_of_the_seed_formula_float64(L, shift, gamma, alpha,
                                                                           weight_kind):
    pred, labels, onehot = _grid(lo=-12.0, hi=12.0, n=97, num_classes=4)
    g = torch.Generator().manual_seed(5)
    weight = None if weight_kind is None else (
        torch.rand(pred.size(0), generator=g, dtype=torch.float64) if weight_kind == "per_prior"
        else torch.rand(pred.shape, generator=g, dtype=torch.float64))
    ref_total, ref_grad = _seed_grad(pred, onehot, shift, gamma, alpha, weight, avg_factor=7.0)
    x = pred.clone().requires_grad_()
    total = L.focal_family_loss(x, labels, weight, gamma=gamma, alpha=alpha, shift=shift,
                                avg_factor=7.0)
    (grad,) = torch.autograd.grad(total, x)
    torch.testing.assert_close(total.detach(), ref_total, rtol=1e-9, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-13)


@pytest.mark.parametrize("modulation,shift,max_weight", [("ssfl", 0.1, None), ("ssfl", 0.0, None),
                                                         ("focal", 0.0, None), ("ssfl", 0.1, 9.0),
                                                         ("ssfl", 0.0, 5.0), ("focal", 0.0, 0.5)])
def test_chunks_and_ragged_last_chunk_give_the_one_chunk_result(L, monkeypatch, modulation, shift,
                                                                 max_weight):
    g = torch.Generator().manual_seed(11)
    pred = torch.randn(203, 7, generator=g, dtype=torch.float64) * 6
    labels = torch.randint(0, 8, (203,), generator=g)
    weight = torch.rand(203, generator=g, dtype=torch.float64)
    kw = dict(modulation=modulation, shift=shift, max_weight=max_weight)

    def run(reduction):
        x = pred.clone().requires_grad_()
        out = L.focal_family_loss(x, labels, weight, reduction=reduction, **kw)
        (grad,) = torch.autograd.grad(out.sum(), x)
        return out.detach(), grad

    whole = {r: run(r) for r in ("none", "mean", "sum")}
    monkeypatch.setitem(L.CHUNK_ELEMS, "cpu", 7 * 10)        # 10 rows a chunk, last chunk 3 rows
    for r in ("none", "mean", "sum"):
        out, grad = run(r)
        torch.testing.assert_close(out, whole[r][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, whole[r][1], rtol=1e-12, atol=0)
    # and all agree with the autograd composition on one-hot float targets
    onehot = F.one_hot(labels, 8)[:, :7].double()
    x = pred.clone().requires_grad_()
    ref = L.focal_family_loss(x, onehot, weight, **kw)
    (ref_grad,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(whole["mean"][0], ref.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(whole["mean"][1], ref_grad, rtol=1e-9, atol=1e-15)


def test_empty_input_and_all_background(L):
    pred = torch.zeros(0, 5, requires_grad=True)
    loss = L.ShiftStepFocalLoss()(pred, torch.zeros(0, dtype=torch.long), avg_factor=1.0)
    loss.backward()
    assert loss.item() == 0.0 and pred.grad.shape == (0, 5)
    pred = torch.full((6, 5), -4.6, requires_grad=True)
    loss = L.ShiftStepFocalLoss(reduction="sum")(pred, torch.full((6,), 5))
    ref = L.ssfl_factor_reference(pred.detach().double(), torch.zeros(6, 5, dtype=torch.float64)).sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_backward_keeps_only_logits_labels_and_weight(L):
    pred, labels, _ = _random_case(n=64, c=5)
    x = pred.clone().requires_grad_()
    weight = torch.rand(64)
    loss = L.ShiftStepFocalLoss()(x, labels, weight, avg_factor=3.0)
    node = loss.grad_fn
    while type(node).__name__ != "_FocalFamilyIndexFnBackward":     # through the / avg_factor
        node = node.next_functions[0][0]
    saved = node.saved_tensors
    assert len(saved) == 3
    assert saved[0].data_ptr() == x.data_ptr() and saved[1].data_ptr() == labels.data_ptr()
    assert saved[2].shape == (64, 1) and saved[2].data_ptr() == weight.data_ptr()


def _bench():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_losses.py"
    spec = importlib.util.spec_from_file_location("bench_losses", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_memory_measure_sees_what_is_allocated():
    bench = _bench()
    x = torch.randn(1000, 1000)
    # a, b alive together (8 MB), then a freed, c allocated: peak 8 MB (+ a few bytes of scalars)
    def fn():
        a = x * 2
        b = a + 1
        del a
        c = b.exp()
        del b, c
    peak = bench.peak_extra_bytes(fn)
    assert 8_000_000 <= peak < 8_000_000 + 4096


@pytest.mark.parametrize("loss_name", ["ssfl", "gfl", "focal_family"])
def test_forward_backward_memory_within_1_2x_of_mmdet_focal_loss(L, loss_name):
    """Peak extra memory of fwd+bwd on the CPU: at most 1.2x mmdet's FocalLoss, and about the
    gradient plus a few chunk buffers."""
    bench = _bench()
    pred, labels, weight, avg_factor = bench._make_inputs(20_000, 80, "cpu")
    ours = {"ssfl": L.ShiftStepFocalLoss(), "gfl": L.GeneralizedFocalLossStar(),
            "focal_family": L.FocalFamilyLoss(modulation="focal")}[loss_name]
    ref_mib = bench._peak_mib(_mmdet_focal(), pred, labels, weight, avg_factor)
    mib = bench._peak_mib(ours, pred, labels, weight, avg_factor)
    grad_mib = pred.numel() * 4 / 2**20
    print(f"\n{loss_name}: {mib:.2f} MiB vs mmdet FocalLoss {ref_mib:.2f} MiB (gradient {grad_mib:.2f})")
    assert mib <= 1.2 * ref_mib
    chunk_mib = L.CHUNK_ELEMS["cpu"] * 4 / 2**20
    assert grad_mib <= mib <= grad_mib + 10 * chunk_mib


def test_no_host_sync_or_graph_break_under_dynamo(L):
    import torch._dynamo as dynamo
    pred, labels, _ = _random_case(n=50, c=4)
    weight = torch.rand(50)
    loss = L.ShiftStepFocalLoss()

    def step(x, labels, weight):
        return loss(x, labels, weight, avg_factor=5.0)

    dynamo.reset()
    explained = dynamo.explain(step)(pred.clone().requires_grad_(), labels, weight)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x1, x2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    out = compiled(x1, labels, weight)
    out.backward()
    ref = step(x2, labels, weight)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-8)
    dynamo.reset()
