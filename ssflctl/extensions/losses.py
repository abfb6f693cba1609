"""The Focal Loss family for MMDetection 3.x: Focal Loss, SSFL* and GFL*, computed from logits.

Importing this module registers into mmdet's ``MODELS`` registry:

- ``ShiftStepFocalLoss`` -- SSFL* from the seed report (shift ``s = 0.1`` there);
- ``GeneralizedFocalLossStar`` -- the seed's commented-out GFL* variant (``ShiftStepFocalLoss`` with
  ``shift=0``);
- ``FocalFamilyLoss`` -- one loss with a switchable modulating factor (``modulation='focal'`` is
  mmdet's ``FocalLoss``, ``'ssfl'`` is SSFL*), used to compare the factors with everything else equal.

A config selects one through ``custom_imports``::

    custom_imports = dict(imports=['ssflctl.extensions.losses'], allow_failed_imports=False)
    model = dict(bbox_head=dict(loss_cls=dict(
        type='ShiftStepFocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, shift=0.1,
        loss_weight=1.0)))

The interface and the semantics are those of mmdet's ``FocalLoss`` (mmdet 3.3): ``pred`` are logits
of shape (N, C); ``target`` is either class indices of shape (N,) with the background index ``C``
(converted to one-hot exactly as mmdet does: ``F.one_hot(target, C + 1)[:, :C]``) or a float
(soft or one-hot) target of the same shape as ``pred``; ``weight`` has shape (N,), (N, C) or
(N * C,); ``reduction``/``avg_factor``/``loss_weight`` go through mmdet's own ``weight_reduce_loss``.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.models.losses.focal_loss import FocalLoss
from mmdet.models.losses.utils import weight_reduce_loss
from mmdet.registry import MODELS

from ssflctl.errors import UserError

__all__ = [
    "MODULATIONS",
    "log_modulating_factor",
    "focal_family_loss",
    "ssfl_factor_reference",
    "FocalFamilyLoss",
    "ShiftStepFocalLoss",
    "GeneralizedFocalLossStar",
    "FocalLossAMP",
    "compute_dtype",
]

MODULATIONS = ("focal", "ssfl")


class LossConfigError(UserError, ValueError):
    """A bad loss parameter in a config (a UserError for the CLI, a ValueError for mmengine)."""


def _check_params(modulation: str, gamma: float, alpha: float, shift: float,
                  max_weight: Optional[float]) -> None:
    if modulation not in MODULATIONS:
        raise LossConfigError(f"loss_cls.modulation: {modulation!r} is not one of {MODULATIONS}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise LossConfigError(f"loss_cls.gamma: {gamma!r} must be a finite number >= 0")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise LossConfigError(f"loss_cls.alpha: {alpha!r} must be a number in [0, 1]")
    if not (isinstance(shift, (int, float)) and 0.0 <= shift < 1.0):
        raise LossConfigError(f"loss_cls.shift: {shift!r} must be a number in [0, 1) "
                              "(q = (1 - shift) * sigmoid(x) + shift)")
    if max_weight is not None and not (isinstance(max_weight, (int, float)) and max_weight > 0):
        raise LossConfigError(f"loss_cls.max_weight: {max_weight!r} must be None or a number > 0")


def _log_odds_q(pred: torch.Tensor, shift: float) -> torch.Tensor:
    """log(q / (1 - q)) for q = (1 - s) * sigmoid(x) + s, exactly and stably.

    q / (1 - q) = (e^x + s) / (1 - s), so the log-odds are logaddexp(x, log s) - log(1 - s):
    one log-sum-exp, no 1/(1 - q) and no log(0) for any finite x.
    """
    if shift == 0.0:
        return pred
    return torch.logaddexp(pred, pred.new_tensor(math.log(shift))) - math.log1p(-shift)


def log_modulating_factor(pred: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
                          modulation: str = "ssfl", shift: float = 0.1,
                          binary: bool = False) -> torch.Tensor:
    """log of the modulating factor ``pt ** gamma`` (no alpha, no BCE), elementwise.

    ``target`` is a float tensor of the shape of ``pred``. With ``binary=True`` it must hold only 0
    and 1 (the one-hot path: one cheap sign flip); otherwise soft targets ``t`` mix the two branches
    linearly before the power, as the seed's code does: ``pt = A * t + B * (1 - t)``.

    - ``'focal'``: A = 1 - p, B = p (mmdet's ``py_sigmoid_focal_loss``).
    - ``'ssfl'``:  A = (1 - q) / q, B = q / (1 - q), q = (1 - s) p + s (SSFL*; GFL* for s = 0).
    """
    if modulation == "focal":
        log_a = F.logsigmoid(-pred)         # log(1 - p)
        log_b = F.logsigmoid(pred)          # log p
    else:
        r = _log_odds_q(pred, shift)        # log(q / (1 - q))
        log_a, log_b = -r, r
    if binary:
        log_pt = torch.where(target > 0.5, log_a, log_b)
    else:
        # log(t * A + (1 - t) * B); log(0) = -inf drops a branch exactly (logaddexp(-inf, y) = y).
        log_pt = torch.logaddexp(torch.log(target) + log_a, torch.log1p(-target) + log_b)
    return gamma * log_pt


def _broadcast_weight(weight: Optional[torch.Tensor], loss: torch.Tensor) -> Optional[torch.Tensor]:
    """mmdet's weight handling in ``py_sigmoid_focal_loss``: (N,) -> (N, 1), (N*C,) -> (N, C)."""
    if weight is None:
        return None
    if weight.shape != loss.shape:
        if weight.size(0) == loss.size(0):
            # the usual case: one weight per prior, broadcast over the classes
            weight = weight.view(-1, 1)
        else:
            # a weight per prior and class, flattened to (N * C,)
            if weight.numel() != loss.numel():
                raise ValueError(f"loss weight of shape {tuple(weight.shape)} fits neither "
                                 f"(N,) nor (N, C) for a loss of shape {tuple(loss.shape)}")
            weight = weight.view(loss.size(0), -1)
    if weight.ndim != loss.ndim:
        raise ValueError(f"loss weight of shape {tuple(weight.shape)} does not broadcast to "
                         f"the loss of shape {tuple(loss.shape)}")
    return weight


def focal_family_loss(pred: torch.Tensor, target: torch.Tensor,
                      weight: Optional[torch.Tensor] = None, *, gamma: float = 2.0,
                      alpha: float = 0.25, modulation: str = "ssfl", shift: float = 0.1,
                      max_weight: Optional[float] = None, reduction: str = "mean",
                      avg_factor: Optional[float] = None) -> torch.Tensor:
    r"""Sigmoid Focal-Loss-family loss from logits: ``alpha_t * factor * BCEWithLogits(pred, t)``.

    With ``p = sigmoid(x)`` and, for SSFL*, ``q = (1 - s) * p + s`` (``s = shift``):

    ====================  ===========================  ===========================
    modulation            positive (t = 1)             negative (t = 0)
    ====================  ===========================  ===========================
    ``'focal'``           ``(1 - p) ** gamma``         ``p ** gamma``
    ``'ssfl'`` (SSFL*)    ``((1 - q) / q) ** gamma``   ``(q / (1 - q)) ** gamma``
    ``'ssfl'``, s = 0     ``((1 - p) / p) ** gamma``   ``(p / (1 - p)) ** gamma``   (GFL*)
    ====================  ===========================  ===========================

    times ``alpha`` for positives and ``1 - alpha`` for negatives, times
    ``binary_cross_entropy_with_logits``. Gradients flow through the factor, as in the seed's code
    and in mmdet's ``py_sigmoid_focal_loss``.

    **How it is computed.** Everything is in the log domain from the logit ``x``. For SSFL* the
    odds of q are exactly ``q / (1 - q) = (e^x + s) / (1 - s)``, so
    ``log factor = -/+ gamma * (logaddexp(x, log s) - log(1 - s))`` (``-`` for positives); the
    focal factor uses ``log(1 - p) = logsigmoid(-x)`` and ``log p = logsigmoid(x)``. There is no
    ``1 / (1 - q)`` that overflows when ``sigmoid(x)`` rounds to 1, and no ``0 * inf`` NaN. Values
    and gradients are finite in float32 for ``|x| <= 30`` and ``gamma <= 2``.

    **Cost.** Class-index targets (what RetinaNet passes) go through one autograd Function with
    the closed-form gradient that saves only the logits, the labels and the weights; the loss is
    computed in row chunks (every element as a negative, then each row's positive overwritten) and,
    for ``'mean'``/``'sum'``, summed inside, so no (N, C) loss tensor exists: the peak memory of
    forward+backward is the (N, C) gradient plus a few chunk buffers. No host sync on CUDA (label
    range check by ``torch._assert_async`` there), no graph break under ``torch.compile``.
    Measured on the CPU (2 cores, [100k, 80] logits): ``python benchmarks/bench_losses.py``.

    **Precision (AMP).** float16/bfloat16 logits (a head under ``torch.autocast``) are computed in
    float32 with autocast off (:func:`compute_dtype`): the loss is float32 and finite wherever
    float32 is; the gradient is returned in the logits' dtype (rounded once).

    **Very confident wrong predictions** (this is the loss itself, not a numerical artefact):

    - GFL* (``s = 0``): the factor is ``exp(gamma * |x|)`` *exactly* for a wrong prediction of either
      sign (``(1 - p) / p = e^{-x}``), so the loss of one element is ``~ alpha_t * |x| * e^{gamma |x|}``
      and its gradient ``~ alpha_t * gamma * |x| * e^{gamma |x|}`` -- unbounded.
    - SSFL* (``s > 0``), positives (x -> -inf): the factor ``((1 - s) / (e^x + s)) ** gamma``
      increases monotonically to the finite limit ``((1 - s) / s) ** gamma`` (81 for s = 0.1,
      gamma = 2); only the BCE term keeps growing, linearly in |x|.
    - SSFL* (``s > 0``), negatives (x -> +inf): the factor ``((e^x + s) / (1 - s)) ** gamma``
      grows without bound like ``e^{gamma x} / (1 - s) ** gamma``.
    - SSFL* also never lets easy negatives go to zero weight: for x -> -inf their factor tends to
      ``(s / (1 - s)) ** gamma`` (1/81 for s = 0.1) instead of focal's ``p ** gamma -> 0``. At
      RetinaNet's prior (p = 0.01, x = -4.6) an SSFL* negative weighs ~150x and a positive ~68x
      what Focal Loss gives them (GFL*: a positive ~10,000x).

    Measured with RetinaNet's prior on every logit, 100 positives among 100k anchors x 80 classes,
    avg_factor = 100: ``loss_cls`` starts at 1.19 with Focal Loss, 86 with SSFL* and 11,284 with
    GFL*, and the classification gradients are scaled alike. On top of that, one anchor whose
    logit overshoots gets a gradient that grows exponentially with the overshoot; at lr 0.01 the
    next SGD step overshoots further and the loss reaches inf/NaN within a few iterations -- the
    NaN the seed report met at lr 0.01 and avoided with lr 0.001.

    **max_weight** (default None = off, the seed's loss): if set, the modulating factor (without
    alpha) is clamped to ``<= max_weight`` (in the log domain). Where the clamp is active the factor
    is a constant, so the element's gradient is ``alpha_t * max_weight * dBCE/dx``, bounded by
    ``alpha_t * max_weight``. ``max_weight = ((1 - s) / s) ** gamma`` bounds negatives the way
    positives already are. It changes the loss wherever it is active; it does not touch the focal
    factor unless that exceeds ``max_weight`` (focal's factor is <= 1).

    Args:
        pred: logits, shape (N, C), any float dtype.
        target: class indices (N,) with background ``C`` (long), or float targets of shape (N, C).
        weight: (N,), (N, C) or (N * C,) elementwise weights, as mmdet.
        reduction: 'none' | 'mean' | 'sum'; ``avg_factor`` divides the sum for 'mean' (mmdet
            3.3's ``weight_reduce_loss``: ``sum / (avg_factor + float32 eps)``; with 'sum' it is a
            ValueError).

    Returns:
        (N, C) for 'none', else a 0-dim tensor; dtype :func:`compute_dtype` of ``pred``.

    Raises:
        ValueError: labels outside [0, C] (on the CPU; a device-side assert on CUDA), bad shapes.
        LossConfigError: bad gamma/alpha/shift/max_weight/modulation.
    """
    _check_params(modulation, gamma, alpha, shift, max_weight)
    cdtype = compute_dtype(pred.dtype)
    if pred.dim() == target.dim():
        # float (one-hot or soft) targets of the same shape: mmdet's py_sigmoid_focal_loss path,
        # composed of torch ops (autograd), in float32 at least (AMP: the cast is differentiable)
        with _no_autocast(pred):
            loss = _elementwise_loss_autograd(pred.to(cdtype), target.to(cdtype), gamma=gamma,
                                              alpha=alpha, modulation=modulation, shift=shift,
                                              max_weight=max_weight, binary=False)
        weight = _broadcast_weight(weight, loss)
        return weight_reduce_loss(loss, weight, reduction, avg_factor)

    # class indices with background = num_classes (the positives of mmdet's
    # F.one_hot(target, C + 1)[:, :C]): closed-form backward that keeps only pred and the labels
    _check_labels(pred, target)
    params = _HardParams(float(gamma), float(alpha), modulation, float(shift),
                         None if max_weight is None else float(max_weight))
    weight = _broadcast_weight(weight, pred)
    if weight is not None and not weight.requires_grad:
        weight = weight.to(cdtype)
    if reduction == "none" or (weight is not None and weight.requires_grad):
        loss = _FocalFamilyIndexFn.apply(pred, target, None, params, False)
        return weight_reduce_loss(loss, weight, reduction, avg_factor)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: {reduction!r} is not 'none', 'mean' or 'sum'")
    # mean/sum: the weighted sum is fused into the Function (no (N, C) loss tensor); the division
    # below is mmdet 3.3's weight_reduce_loss on that sum (mmdet/models/losses/utils.py)
    total = _FocalFamilyIndexFn.apply(pred, target, weight, params, True)
    if avg_factor is None:
        return total / pred.numel() if reduction == "mean" else total
    if reduction == "mean":
        # Avoid causing ZeroDivisionError when avg_factor is 0.0, as mmdet does
        return total / (avg_factor + torch.finfo(torch.float32).eps)
    raise ValueError('avg_factor can not be used with reduction="sum"')


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the family computes in for logits of ``dtype``: float32, or float64 for float64.

    float16/bfloat16 logits (a head under ``torch.autocast``) are computed in float32: the losses
    are finite wherever float32 is (|x| <= 30), which float16 is not (SSFL*/GFL* factors reach
    e^(2|x|)); the loss comes back in float32, the gradient in the logits' dtype.
    """
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(t: torch.Tensor):
    """A context that turns autocast off for ``t``'s device (nothing for devices without autocast)."""
    if t.device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()


def _check_labels(pred: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ValueError unless ``labels`` are class indices (N,) in [0, C] for logits (N, C).

    On the CPU the range is checked on the host (a clear message). On CUDA, and while
    ``torch.compile`` traces, it is ``torch._assert_async`` instead: no host sync, no graph break
    (a bad label then stops the CUDA stream with a device-side assert).
    """
    num_classes = pred.size(1)
    if labels.dim() != 1 or labels.size(0) != pred.size(0):
        raise ValueError(f"class-index targets must have shape ({pred.size(0)},) for logits of "
                         f"shape {tuple(pred.shape)}; got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"class-index targets must be integers, got {labels.dtype}")
    if not labels.numel():
        return
    if labels.device.type == "cpu" and not _compiling():
        lo, hi = labels.aminmax()
        if int(lo) < 0 or int(hi) > num_classes:
            raise ValueError(f"class-index targets must lie in [0, {num_classes}] (background = "
                             f"{num_classes}); got [{int(lo)}, {int(hi)}]")
    else:
        torch._assert_async(((labels >= 0) & (labels <= num_classes)).all(),
                            f"class-index targets must lie in [0, {num_classes}] "
                            f"(background = {num_classes})")


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def positive_mask(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bool (N, C) mask equal to ``F.one_hot(labels, C + 1)[:, :C] == 1`` (background = C).

    Raises ValueError for labels that are not integers of shape (N,) in [0, C].
    """
    _check_labels(pred, labels)
    classes = torch.arange(pred.size(1), device=labels.device, dtype=labels.dtype)
    return labels.unsqueeze(1) == classes


def _elementwise_loss_autograd(pred: torch.Tensor, target: torch.Tensor, *, gamma: float,
                               alpha: float, modulation: str, shift: float,
                               max_weight: Optional[float], binary: bool) -> torch.Tensor:
    """Elementwise loss composed of torch ops (autograd); float targets of the shape of pred."""
    log_factor = log_modulating_factor(pred, target, gamma=gamma, modulation=modulation,
                                       shift=shift, binary=binary)
    if max_weight is not None:
        log_factor = log_factor.clamp(max=math.log(max_weight))
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    return bce * alpha_t * torch.exp(log_factor)


class _HardParams(NamedTuple):
    gamma: float
    alpha: float
    modulation: str
    shift: float
    max_weight: Optional[float]


#: elements per chunk of the class-index path. CPU: just under ATen's parallel grain size (32768,
#: ``at::internal::GRAIN_SIZE``), so every elementwise op of a chunk runs in cache on the calling
#: thread with no OpenMP fork/join: on a shared 2-core machine those joins, one per op, made a
#: 2-thread run 5-15x slower than one thread (measured, 100k x 80 logits); CUDA: large, so that
#: kernel-launch overhead stays small (~16 chunks at RetinaNet R50 batch 16).
CHUNK_ELEMS = {"cpu": (1 << 15) - 1, "cuda": 1 << 24}
_CHUNK_ELEMS_OTHER = 1 << 24
def _chunk_rows(pred: torch.Tensor) -> int:
    if _compiling():               # one chunk: a traced loop would unroll per shape
        return max(1, pred.size(0))
    elems = CHUNK_ELEMS.get(pred.device.type, _CHUNK_ELEMS_OTHER)
    return max(1, elems // max(1, pred.size(1)))


class _Workspace:
    """Chunk buffers reused across the chunks of one call (no allocation per chunk).

    On the CPU a fresh allocation of a chunk-sized tensor costs page faults that took longer than
    the arithmetic (measured: ~220 us for an allocating op on 2^16 floats vs ~15 us in place);
    on CUDA the caching allocator would hide that, but reuse keeps the peak fixed there too.
    """

    def __init__(self, rows: int, num_classes: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.num_classes, self.dtype, self.device = rows, num_classes, dtype, device
        self._flat: dict = {}
        #: softplus(x) = x above this (the difference is below the dtype's rounding)
        self.thr = 40.0 if dtype == torch.float64 else 20.0

    def __call__(self, name: str, rows: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A (rows, C) view of buffer ``name`` (created on first use)."""
        flat = self._flat.get(name)
        if flat is None:
            flat = torch.empty(self.rows * self.num_classes, dtype=dtype or self.dtype,
                               device=self.device)
            self._flat[name] = flat
        return flat[:rows * self.num_classes].view(rows, self.num_classes)


def _neg_scale(p: _HardParams) -> float:
    """alpha_t of a negative times the constant of its factor: (1 - alpha) / (1 - s)^gamma (SSFL*)."""
    if p.modulation == "ssfl" and p.shift > 0.0:
        return (1.0 - p.alpha) / (1.0 - p.shift) ** p.gamma
    return 1.0 - p.alpha


def _factor_bound(p: _HardParams) -> Optional[float]:
    """max_weight in the units of the bulk factor ``base ** gamma`` (see :func:`_bulk_negative`)."""
    if p.max_weight is None:
        return None
    if p.modulation == "ssfl" and p.shift > 0.0:
        return p.max_weight * (1.0 - p.shift) ** p.gamma
    return p.max_weight


_LOG2E = 1.0 / math.log(2.0)


def _exp(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """e^x into ``out``. On the CPU as 2^(x log2 e): ATen's CPU ``exp`` (like ``log``/``log1p``)
    is a VML function split across threads from 2048 elements on, one OpenMP fork/join per call,
    which on a shared 2-core machine took 8 ms per 32k-element chunk instead of 20 us (measured,
    torch 2.13); ``exp2`` and ``mul`` stay on the calling thread below 32768 elements. The extra
    rounding of x log2 e is |x| ulp relative (3.6e-6 at x = 30 in float32), what exp(m) of a
    rounded m = gamma * r costs anyway."""
    if x.device.type != "cpu":
        return torch.exp(x, out=out)
    return torch.exp2(torch.mul(x, _LOG2E, out=out), out=out)


def _bulk_negative(x: torch.Tensor, p: _HardParams, ws: _Workspace, backward: bool, out):
    """Every element of a chunk as a negative (target 0), into ``out`` (rows, C); x is not modified.

    With ``base`` = e^x + s (SSFL*), e^x (GFL*) or sigmoid(x) (focal), the factor without alpha is
    ``base ** gamma`` (/ (1 - s)^gamma for SSFL*), BCE = softplus(x). Forward: ``out`` = the loss
    ``c * base^gamma * softplus(x)``, c = :func:`_neg_scale`. Backward: ``out`` = its derivative
    divided by c (the caller folds c into its own scale), ``base^gamma * (gamma * u * BCE + sigmoid(x))`` with u = d log(base)/dx = e^x / (e^x + s)
    (SSFL*), 1 (GFL*), 1 - sigmoid(x) (focal), and u = 0 where the max_weight clamp is active.
    Same values as the log-domain formulas of :func:`_hard_terms_small` up to rounding; 2-3x
    cheaper (no where/logaddexp, one exp and one softplus per element).
    """
    rows = x.size(0)
    bce = F.softplus(x, 1.0, ws.thr, out=ws("bce", rows))
    u = None
    if p.modulation == "focal":
        base = torch.sigmoid(x, out=ws("base", rows))
        if backward:
            u = torch.neg(x, out=ws("u", rows)).sigmoid_()               # 1 - p, exactly
    elif p.shift == 0.0:
        base = _exp(x, ws("base", rows))
    else:
        e = _exp(x, ws("e", rows))
        base = torch.add(e, p.shift, out=ws("base", rows))
        if backward:
            u = torch.div(e, base, out=ws("u", rows))
    if p.gamma == 2.0:
        f = torch.mul(base, base, out=ws("f", rows))
    elif p.gamma == 1.0:
        f = base
    else:
        f = torch.pow(base, p.gamma, out=ws("f", rows))
    bound = _factor_bound(p)
    if bound is not None:
        if backward:
            clamped = torch.gt(f, bound, out=ws("clamped", rows, torch.bool))
            if u is None:
                u = ws("u", rows).fill_(1.0)
            u.masked_fill_(clamped, 0.0)
        f.clamp_(max=bound)               # f may be base's buffer (gamma 1): base is not used again
    if not backward:
        return torch.mul(f, bce, out=out).mul_(_neg_scale(p))
    d = torch.sigmoid(x, out=ws("d", rows))                              # dBCE/dx
    inner = d.add_(bce if u is None else u.mul_(bce), alpha=p.gamma)    # sigmoid(x) + gamma*u*BCE
    return torch.mul(f, inner, out=out)


def _hard_terms_small(xp: torch.Tensor, p: _HardParams, positive: bool, backward: bool):
    """Log-domain loss (or its derivative) of a small tensor of logits, all of one target.

    With sg = -1 (positive) or +1 (negative), z = sg * x: BCE = softplus(z); the log factor
    ``m = gamma * log sigmoid(z)`` (focal) or ``gamma * sg * r`` (SSFL*,
    ``r = log(s / (1 - s)) + softplus(x - log s) = log(q / (1 - q))``; GFL*: r = x), clamped to
    log max_weight; loss = alpha_t * e^m * BCE and
    ``dloss/dx = alpha_t * e^m * sg * (gamma * BCE * u + sigmoid(z))`` with u = sigmoid(-z)
    (focal), sigmoid(x - log s) (SSFL*), 1 (GFL*), 0 where the clamp is active. Used for the
    positives of a chunk (at most one per row), gathered.
    """
    thr = 40.0 if xp.dtype == torch.float64 else 20.0
    sg = -1.0 if positive else 1.0
    z = xp * sg
    bce = F.softplus(z, 1.0, thr)
    if p.modulation == "focal":
        m = (z - bce) * p.gamma
        u = torch.sigmoid(-z)
    elif p.shift == 0.0:
        m = z * p.gamma
        u = torch.ones_like(xp)
    else:
        t = xp - math.log(p.shift)
        m = (F.softplus(t, 1.0, thr) + (math.log(p.shift) - math.log1p(-p.shift))) * (sg * p.gamma)
        u = torch.sigmoid(t)
    if p.max_weight is not None:
        log_max = math.log(p.max_weight)
        u = u.masked_fill(m > log_max, 0.0)
        m = m.clamp(max=log_max)
    w = _exp(m, torch.empty_like(m)) * (p.alpha if positive else 1.0 - p.alpha)
    if not backward:
        return w * bce
    return w * sg * (p.gamma * bce * u + torch.sigmoid(z))


def _fix_positives(out: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, p: _HardParams,
                   backward: bool, scale=None) -> None:
    """Overwrite, in ``out`` (rows, C), the element of each row's positive class (label < C) with
    the positive's loss (or derivative, times ``scale`` (rows, 1) or a 0-dim tensor).

    Fixed shapes (gather/scatter over all rows, background rows write their own value back): no
    data-dependent shape, so no host sync on CUDA.
    """
    num_classes = x.size(1)
    is_pos = (labels < num_classes).unsqueeze(1)
    cols = labels.clamp(max=num_classes - 1).unsqueeze(1)
    val = _hard_terms_small(x.gather(1, cols), p, True, backward)
    if scale is not None:
        val = val * scale
    out.scatter_(1, cols, torch.where(is_pos, val.to(out.dtype), out.gather(1, cols)))


def _chunk_input(pred: torch.Tensor, r0: int, r1: int, ws: _Workspace, cdtype: torch.dtype):
    x = pred[r0:r1]
    if x.dtype == cdtype:
        return x
    return ws("x", r1 - r0).copy_(x)


class _FocalFamilyIndexFn(torch.autograd.Function):
    """The loss for hard (0/1) targets given as class indices, with a closed-form gradient.

    forward(pred (N, C), labels (N,) long, weight (N, 1) | (N, C) | None, params, reduce):
    ``reduce=False`` -> the elementwise loss (N, C) (weight must be None; mmdet's
    weight_reduce_loss weights it); ``reduce=True`` -> the 0-dim weighted sum
    ``sum(weight * loss)``. Computed in :func:`compute_dtype` in row chunks of
    :data:`CHUNK_ELEMS` elements: every element as a negative (:func:`_bulk_negative`), then each
    row's positive overwritten (:func:`_fix_positives`). Saved for backward: only ``pred``,
    ``labels`` and ``weight`` (every intermediate is recomputed per chunk), so the extra memory
    beyond the gradient (N, C) is a few chunks. The gradient is in pred's dtype.
    """

    @staticmethod
    def forward(ctx, pred, labels, weight, params, reduce):
        cdtype = compute_dtype(pred.dtype)
        n, num_classes = pred.shape
        rows = min(_chunk_rows(pred), max(1, n))
        ctx.save_for_backward(pred, labels, weight)
        ctx.params, ctx.reduce = params, reduce
        with torch.no_grad(), _no_autocast(pred):
            ws = _Workspace(rows, num_classes, cdtype, pred.device)
            if reduce:    # chunk sums accumulated in float64 (a 0-dim tensor: no host sync)
                total = torch.zeros((), dtype=torch.float64, device=pred.device)
            else:
                out = torch.empty(pred.shape, dtype=cdtype, device=pred.device)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                x = _chunk_input(pred, r0, r1, ws, cdtype)
                loss = _bulk_negative(x, params, ws, False,
                                      ws("loss", r1 - r0) if reduce else out[r0:r1])
                _fix_positives(loss, x, labels[r0:r1], params, False)
                if not reduce:
                    continue
                if weight is None:
                    total += loss.sum()
                elif weight.size(1) == 1 and num_classes > 1:
                    total += torch.dot(loss.sum(1), weight[r0:r1, 0])
                else:
                    total += loss.mul_(weight[r0:r1]).sum()
        return total.to(cdtype) if reduce else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        pred, labels, weight = ctx.saved_tensors
        p = ctx.params
        cdtype = compute_dtype(pred.dtype)
        n, num_classes = pred.shape
        rows = min(_chunk_rows(pred), max(1, n))
        grad = torch.empty_like(pred, memory_format=torch.contiguous_format)
        with _no_autocast(pred):
            ws = _Workspace(rows, num_classes, cdtype, pred.device)
            g = grad_out.to(cdtype)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                x = _chunk_input(pred, r0, r1, ws, cdtype)
                if ctx.reduce:
                    scale = g if weight is None else weight[r0:r1] * g
                else:
                    scale = g[r0:r1]
                dst = grad[r0:r1] if grad.dtype == cdtype else ws("grad", r1 - r0)
                small = scale.dim() == 0 or scale.size(1) == 1
                bulk = _bulk_negative(x, p, ws, True, dst)
                if small:
                    bulk.mul_(scale * _neg_scale(p))
                else:
                    bulk.mul_(scale).mul_(_neg_scale(p))
                _fix_positives(dst, x, labels[r0:r1], p, True, scale if small else
                               scale.gather(1, labels[r0:r1].clamp(max=num_classes - 1).unsqueeze(1)))
                if grad.dtype != cdtype:
                    grad[r0:r1].copy_(dst)
        return grad, None, None, None, None


def ssfl_factor_reference(pred: torch.Tensor, target: torch.Tensor, shift: float = 0.1,
                          gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """The seed's literal SSFL* formula, elementwise (no reduction), for tests (use float64).

    Transcribed from the seed's modified ``py_sigmoid_focal_loss`` with 0.9/0.1 replaced by
    (1 - shift)/shift; ``target`` is a float tensor of the shape of ``pred``. It divides by
    ``1 - q`` and is only finite where that does not underflow.
    """
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    q = (1 - shift) * pred_sigmoid + shift
    pt = ((1 - q) / q) * target + (q / (1 - q)) * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight


@MODELS.register_module()
class FocalFamilyLoss(nn.Module):
    """Sigmoid focal-family loss with a switchable modulating factor; see :func:`focal_family_loss`.

    Drop-in for mmdet's ``FocalLoss`` (same arguments, same forward signature) plus
    ``modulation`` ('focal' | 'ssfl'), ``shift`` (SSFL* only) and ``max_weight`` (None = off).
    ``modulation='focal'`` equals mmdet's ``FocalLoss`` (computed in the log domain).
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25,
                 reduction: str = "mean", loss_weight: float = 1.0, modulation: str = "ssfl",
                 shift: float = 0.1, max_weight: Optional[float] = None, activated: bool = False):
        super().__init__()
        if activated:
            raise LossConfigError(f"loss_cls.activated: {activated!r}: {type(self).__name__} takes "
                                  "logits, not probabilities; set activated=False")
        if use_sigmoid is not True:
            raise LossConfigError(f"loss_cls.use_sigmoid: {use_sigmoid!r}: only the sigmoid "
                                  f"form of {type(self).__name__} is implemented (as for "
                                  "mmdet's FocalLoss); set use_sigmoid=True")
        if reduction not in ("none", "mean", "sum"):
            raise LossConfigError(f"loss_cls.reduction: {reduction!r} is not 'none', 'mean' "
                                  "or 'sum'; use one of those")
        _check_params(modulation, gamma, alpha, shift, max_weight)
        self.use_sigmoid = use_sigmoid
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.modulation = modulation
        self.shift = float(shift)
        self.max_weight = None if max_weight is None else float(max_weight)

    def extra_repr(self) -> str:
        return (f"modulation={self.modulation!r}, gamma={self.gamma}, alpha={self.alpha}, "
                f"shift={self.shift}, max_weight={self.max_weight}, "
                f"reduction={self.reduction!r}, loss_weight={self.loss_weight}")

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                weight: Optional[torch.Tensor] = None, avg_factor: Optional[float] = None,
                reduction_override: Optional[str] = None) -> torch.Tensor:
        """Loss of logits ``pred`` (N, C) against ``target`` (N,) class indices or (N, C) floats."""
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueError(f"reduction_override: {reduction_override!r} is not None, 'none', "
                             "'mean' or 'sum'")
        reduction = reduction_override if reduction_override else self.reduction
        return self.loss_weight * focal_family_loss(
            pred, target, weight, gamma=self.gamma, alpha=self.alpha,
            modulation=self.modulation, shift=self.shift, max_weight=self.max_weight,
            reduction=reduction, avg_factor=avg_factor)


@MODELS.register_module()
class ShiftStepFocalLoss(FocalFamilyLoss):
    """SSFL* (Shift Step Focal Loss*) from the seed report; ``shift=0`` is GFL*.

    With ``p = sigmoid(x)``, ``q = (1 - shift) * p + shift``: the modulating factor is
    ``((1 - q) / q) ** gamma`` for positives and ``(q / (1 - q)) ** gamma`` for negatives, times
    ``alpha`` / ``1 - alpha``, times BCE with logits. Computed stably from logits; see
    :func:`focal_family_loss` for the behaviour on confident wrong predictions (the weight of a
    wrong negative grows like ``exp(gamma * x)``) and for the optional ``max_weight`` clamp.

    Config: ``dict(type='ShiftStepFocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
    shift=0.1, loss_weight=1.0)`` (add ``max_weight=...`` to bound the factor).
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25,
                 shift: float = 0.1, reduction: str = "mean", loss_weight: float = 1.0,
                 max_weight: Optional[float] = None, activated: bool = False):
        super().__init__(use_sigmoid=use_sigmoid, gamma=gamma, alpha=alpha, reduction=reduction,
                         loss_weight=loss_weight, modulation="ssfl", shift=shift,
                         max_weight=max_weight, activated=activated)


@MODELS.register_module()
class GeneralizedFocalLossStar(ShiftStepFocalLoss):
    """GFL*: the seed's commented-out variant, ``ShiftStepFocalLoss`` with ``shift=0``.

    Factor ``((1 - p) / p) ** gamma`` for positives, ``(p / (1 - p)) ** gamma`` for negatives, i.e.
    ``exp(-/+ gamma * x)``: unbounded for confident wrong predictions of either sign.
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25,
                 shift: float = 0.0, reduction: str = "mean", loss_weight: float = 1.0,
                 max_weight: Optional[float] = None, activated: bool = False):
        super().__init__(use_sigmoid=use_sigmoid, gamma=gamma, alpha=alpha, shift=shift,
                         reduction=reduction, loss_weight=loss_weight, max_weight=max_weight,
                         activated=activated)


@MODELS.register_module()
class FocalLossAMP(FocalLoss):
    """mmdet's ``FocalLoss`` (mmdet 3.3.0, ``mmdet/models/losses/focal_loss.py``), run in float32.

    Same arguments and results as ``FocalLoss`` for float32 logits (it *is* ``FocalLoss.forward``,
    with autocast off and the logits cast to :func:`compute_dtype`). It exists for mixed precision:
    under ``torch.autocast`` a head gives float16/bfloat16 logits, and on CUDA ``FocalLoss`` feeds
    them to mmcv 2.1.0's fused ``sigmoid_focal_loss`` kernel, which has no BFloat16 implementation
    (``NotImplementedError ... 'BFloat16'``, measured on an H200, torch 2.11); on the CPU it runs
    mmdet's exact PyTorch ``py_sigmoid_focal_loss``. Here both get float32: the kernel runs as in
    full precision and the loss (float32) is identical to ``FocalLoss`` on the float32-cast logits.
    The gradient flows back through the cast in the logits' dtype. ssflctl's renderer selects it for
    ``loss: focal`` when a run sets ``amp`` (ssflctl/amp.py).
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                weight: Optional[torch.Tensor] = None, avg_factor: Optional[float] = None,
                reduction_override: Optional[str] = None) -> torch.Tensor:
        """As ``FocalLoss.forward``: ``pred`` (N, C) logits of any float dtype; returns float32+."""
        with _no_autocast(pred):
            pred = pred.to(compute_dtype(pred.dtype))
            if weight is not None and weight.is_floating_point():
                weight = weight.to(pred.dtype)
            if target.is_floating_point():
                target = target.to(pred.dtype)
            return super().forward(pred, target, weight, avg_factor=avg_factor,
                                   reduction_override=reduction_override)
