"""Training-side half of ``ssflctl.plan.amp``: an ``AmpOptimWrapper`` that also runs on the CPU.

mmengine 0.10.7's ``AmpOptimWrapper`` asserts a CUDA/NPU/MLU/MUSA device in ``__init__`` and its
``autocast`` allows only bfloat16 on the CPU, so ``amp: bf16`` could not be tried (or tested) on a
CPU machine. :class:`AnyDeviceAmpOptimWrapper` is ``AmpOptimWrapper`` unchanged wherever mmengine
supports it (a GPU node: same scaler, same autocast); without an accelerator it runs
``torch.autocast('cpu', dtype)`` (bfloat16, or float16 where torch's CPU autocast has it) with a
``torch.amp.GradScaler('cpu')`` that is enabled for float16 only (bfloat16 has float32's range and
needs no loss scale). A checkpoint saved with a disabled scaler (empty state) loads back.

Imported through the rendered config's ``custom_imports`` (``ssflctl.plan.amp.apply_amp`` adds it).
"""
from __future__ import annotations

import contextlib
from typing import Union

import torch
from mmengine.device import is_cuda_available, is_mlu_available, is_npu_available
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

__all__ = ["AnyDeviceAmpOptimWrapper"]


def _accelerator() -> bool:
    try:
        from mmengine.device import is_musa_available
        musa = is_musa_available()
    except ImportError:  # pragma: no cover - older mmengine
        musa = False
    return bool(is_cuda_available() or is_npu_available() or is_mlu_available() or musa)


@OPTIM_WRAPPERS.register_module()
class AnyDeviceAmpOptimWrapper(AmpOptimWrapper):
    """mmengine's ``AmpOptimWrapper`` (same arguments), also usable without an accelerator.

    Args:
        loss_scale: ``'dynamic'``, a float (static) or a dict of ``GradScaler`` arguments.
        dtype: ``'float16'`` | ``'bfloat16'`` | a torch dtype | None (CUDA: float16; CPU:
            bfloat16, as mmengine's autocast defaults).
    """

    def __init__(self, loss_scale: Union[str, float, dict] = "dynamic",
                 dtype: Union[str, torch.dtype, None] = None, use_fsdp: bool = False, **kwargs):
        self._cpu = not _accelerator()
        if not self._cpu:
            super().__init__(loss_scale=loss_scale, dtype=dtype, use_fsdp=use_fsdp, **kwargs)
            return
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = None
        if isinstance(dtype, str):
            if dtype not in ("float16", "bfloat16"):
                raise ValueError(f"dtype should be float16 or bfloat16, got {dtype!r}")
            dtype = getattr(torch, dtype)
        self.cast_dtype = dtype or torch.bfloat16
        enabled = self.cast_dtype == torch.float16
        if loss_scale == "dynamic":
            self.loss_scaler = torch.amp.GradScaler("cpu", enabled=enabled)
        elif isinstance(loss_scale, float):
            self._scale_update_param = loss_scale
            self.loss_scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale, enabled=enabled)
        elif isinstance(loss_scale, dict):
            self.loss_scaler = torch.amp.GradScaler("cpu", **{"enabled": enabled, **loss_scale})
        else:
            raise TypeError(f'loss_scale must be of type float, dict, or "dynamic", got {loss_scale}')

    @contextlib.contextmanager
    def optim_context(self, model):
        """As ``AmpOptimWrapper.optim_context``; on the CPU ``torch.autocast('cpu', dtype)``."""
        if not self._cpu:
            with super().optim_context(model):
                yield
            return
        with OptimWrapper.optim_context(self, model), torch.autocast("cpu", dtype=self.cast_dtype):
            yield

    def load_state_dict(self, state_dict: dict):
        """As ``AmpOptimWrapper.load_state_dict``, skipping a scaler state that a disabled
        ``GradScaler`` saved (an empty dict, which ``GradScaler.load_state_dict`` refuses)."""
        if not state_dict.get("loss_scaler") or not self.loss_scaler.is_enabled():
            state_dict = dict(state_dict)
            state_dict.pop("loss_scaler", None)
        super().load_state_dict(state_dict)
