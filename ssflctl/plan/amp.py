"""Mixed precision for a rendered config: the ``amp`` template param (``fp16`` | ``bf16`` | null).

``amp: bf16`` (or ``fp16``) turns the template's ``optim_wrapper`` into mmengine's
``AmpOptimWrapper`` (mmengine 0.10.7, ``mmengine/optim/optimizer/amp_optimizer_wrapper.py``) with
``dtype='bfloat16'`` (``'float16'``) and ``loss_scale='dynamic'`` -- what mmdet 3.3's
``tools/train.py --amp`` sets, plus the dtype. The type written is its subclass
``AnyDeviceAmpOptimWrapper`` (``ssflctl.extensions.amp_runtime``, added to ``custom_imports``): mmengine's own
on a GPU, and usable on the CPU too, where mmengine's asserts an accelerator. The forward pass then runs under ``torch.autocast``
of that dtype; ``loss.backward()`` goes through a ``GradScaler`` (dynamic loss scale: a step whose
gradients overflow is skipped and the scale halved; on the CPU torch disables the scaler, bf16
needs none).

The losses: ssflctl's family (``ShiftStepFocalLoss``, ``GeneralizedFocalLossStar``,
``FocalFamilyLoss``) computes in float32 whatever the logits' dtype. mmdet's ``FocalLoss`` does
not: on CUDA it feeds mmcv 2.1.0's fused kernel, which has no bfloat16 implementation, so every
``FocalLoss`` in the model becomes ``FocalLossAMP`` (``ssflctl.extensions.losses``: the same loss, computed
in float32). ``null`` (the default) leaves the config untouched.

Light module (no torch import): the renderer calls :func:`apply_amp` on an ``mmengine.Config``.
"""
from __future__ import annotations

from typing import Any

from ssflctl.errors import UserError

__all__ = ["AMP_DTYPES", "amp_dtype", "apply_amp"]

#: mmengine's AmpOptimWrapper, also on the CPU (ssflctl/amp_runtime.py; on a GPU it is mmengine's)
WRAPPER = "AnyDeviceAmpOptimWrapper"
#: the param's values -> the dtype name AmpOptimWrapper takes
AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
_OFF = ("", "null", "none", "off", "fp32", "false")
_AMP_LOSSES = {"FocalLoss": "FocalLossAMP", "mmdet.FocalLoss": "FocalLossAMP"}


def amp_dtype(amp: Any, where: str = "params.amp"):
    """``'float16'`` / ``'bfloat16'`` for ``amp`` = fp16 / bf16; None for None/False/'null'/'fp32'.

    Raises UserError for anything else.
    """
    if amp is None or amp is False:
        return None
    if isinstance(amp, str):
        key = amp.strip().lower()
        if key in _OFF:
            return None
        if key in AMP_DTYPES:
            return AMP_DTYPES[key]
    raise UserError(f"{where}: {amp!r} is not fp16, bf16 or null (full precision)")


def _swap_losses(node: Any) -> int:
    """Replace ``type='FocalLoss'`` by ``'FocalLossAMP'`` in every dict under ``node``; count them."""
    n = 0
    if isinstance(node, dict):
        if node.get("type") in _AMP_LOSSES:
            node["type"] = _AMP_LOSSES[node["type"]]
            n += 1
        for value in node.values():
            n += _swap_losses(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            n += _swap_losses(value)
    return n


def apply_amp(cfg, amp: Any, where: str) -> None:
    """Set up mixed precision on a rendered config in place (see the module docstring).

    ``cfg`` is an ``mmengine.Config`` with an ``optim_wrapper`` of type ``OptimWrapper`` (or
    already ``AmpOptimWrapper``); raises UserError otherwise or for a bad ``amp`` value.
    """
    dtype = amp_dtype(amp, f"{where}: params.amp")
    if dtype is None:
        return
    ow = cfg.get("optim_wrapper")
    if not isinstance(ow, dict):
        raise UserError(f"{where}: params.amp needs an optim_wrapper in the config; it has none")
    kind = ow.get("type", "OptimWrapper")
    if kind not in ("OptimWrapper", "AmpOptimWrapper", WRAPPER):
        raise UserError(f"{where}: params.amp works with optim_wrapper type OptimWrapper; the "
                        f"template uses {kind!r}")
    ow["type"] = WRAPPER
    ow["dtype"] = dtype
    ow.setdefault("loss_scale", "dynamic")
    _swap_losses(cfg.get("model"))
    ci = dict(cfg.get("custom_imports") or {})
    imports = list(ci.get("imports") or [])
    for module in ("ssflctl.extensions.amp_runtime", "ssflctl.extensions.losses"):
        if module not in imports:
            imports.append(module)
    cfg["custom_imports"] = dict(ci, imports=imports, allow_failed_imports=False)
