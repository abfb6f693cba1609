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

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
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
        pred: logits, shape (N, C).
        target: class indices (N,) with background ``C`` (long), or float targets of shape (N, C).
        weight: (N,), (N, C) or (N * C,) elementwise weights, as mmdet.
        reduction: 'none' | 'mean' | 'sum'; ``avg_factor`` divides the sum for 'mean' (mmdet).
    """
    _check_params(modulation, gamma, alpha, shift, max_weight)
    if pred.dim() == target.dim():
        # float (one-hot or soft) targets of the same shape: mmdet's py_sigmoid_focal_loss path
        loss = _elementwise_loss_autograd(pred, target.type_as(pred), gamma=gamma, alpha=alpha,
                                          modulation=modulation, shift=shift,
                                          max_weight=max_weight, binary=False)
    else:
        # class indices with background = num_classes: the positives of mmdet's
        # F.one_hot(target, C + 1)[:, :C], as a bool mask, with a closed-form backward
        loss = _FocalFamilyIndexFn.apply(pred, positive_mask(pred, target), float(gamma),
                                         float(alpha), modulation, float(shift),
                                         None if max_weight is None else float(max_weight))
    weight = _broadcast_weight(weight, loss)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def positive_mask(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bool (N, C) mask equal to ``F.one_hot(labels, C + 1)[:, :C] == 1`` (background = C)."""
    num_classes = pred.size(1)
    if labels.dim() != 1 or labels.size(0) != pred.size(0):
        raise ValueError(f"class-index targets must have shape ({pred.size(0)},) for logits of "
                         f"shape {tuple(pred.shape)}; got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"class-index targets must be integers, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(f"class-index targets must lie in [0, {num_classes}] (background = "
                         f"{num_classes}); got [{int(labels.min())}, {int(labels.max())}]")
    classes = torch.arange(num_classes, device=labels.device, dtype=labels.dtype)
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


class _FocalFamilyIndexFn(torch.autograd.Function):
    """Elementwise loss for hard (0/1) targets given as a bool mask, with a closed-form gradient.

    With sg = -1 for positives, +1 for negatives and z = sg * x:
    BCE = softplus(z); log factor m = gamma * log sigmoid(z) (focal) or gamma * sg * r (SSFL*,
    r = logaddexp(x, log s) - log(1 - s)). loss = alpha_t * e^m * BCE and
    dloss/dx = alpha_t * e^m * sg * (gamma * BCE * u + sigmoid(z)), u = sigmoid(-z) (focal) or
    sigmoid(x - log s) (SSFL*; 1 for s = 0), u = 0 where the max_weight clamp is active.
    sigmoid(-z) = exp(-BCE) and sigmoid(z) = -expm1(-BCE) exactly, so the backward reuses BCE.
    """

    @staticmethod
    def forward(ctx, pred, pos, gamma, alpha, modulation, shift, max_weight):
        sg = pos.to(pred.dtype).mul_(-2.0).add_(1.0)              # -1 positives, +1 negatives
        z = pred * sg
        bce = F.logsigmoid(z.neg()).neg_()                        # softplus(z), exact for all z
        if modulation == "focal":
            log_factor = (z - bce).mul_(gamma)                    # gamma * log sigmoid(z)
        else:
            log_factor = (_log_odds_q(pred, shift) * sg).mul_(gamma)   # never in place on pred
        clamped = None
        if max_weight is not None:
            log_max = math.log(max_weight)
            clamped = log_factor > log_max
            log_factor = log_factor.clamp_(max=log_max)
        alpha_t = sg * (0.5 - alpha) + 0.5                        # alpha positives, 1 - alpha negatives
        w = log_factor.exp_().mul_(alpha_t)
        loss = w * bce
        ctx.save_for_backward(pred, sg, w, bce, clamped)
        ctx.gamma, ctx.modulation, ctx.shift = gamma, modulation, shift
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        pred, sg, w, bce, clamped = ctx.saved_tensors
        if ctx.modulation == "focal":
            u = torch.exp(-bce)                                   # sigmoid(-z)
        elif ctx.shift == 0.0:
            u = torch.ones_like(pred)
        else:
            u = torch.sigmoid(pred - math.log(ctx.shift))
        if clamped is not None:
            u = u.masked_fill_(clamped, 0.0)
        inner = u.mul_(bce).mul_(ctx.gamma).sub_(torch.expm1(-bce))  # gamma*BCE*u + sigmoid(z)
        grad = inner.mul_(w).mul_(sg).mul_(grad_out)
        return grad, None, None, None, None, None, None


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
