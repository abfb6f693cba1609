"""The batch a run really trains with, and whether its lr was scaled for it (the plan's check).

mmdet configs give the lr for a total batch, ``auto_scale_lr.base_batch_size`` (16 for the 1x
schedules: 8 GPUs × 2 images). A run trains with ``nodes × gpus × batch_size`` images per step
(``batch_size`` per GPU, at least one process on a CPU). mmengine's ``auto_scale_lr.enable=True``
applies the linear rule at ``Runner.train`` (``Runner.scale_lr``: lr × total / base); without it
the template's lr is used as is. Seed 000's setting, 1 GPU × 2 images at lr 0.01 with base 16,
trains at 8× the lr the rule gives (0.00125).

The numbers come from the rendered config (template + params + overrides), so derived settings and
overrides count; rendering is cached per template and the params that can change them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

#: params that cannot change the batch or the lr (rendering is cached without them)
_IRRELEVANT = ("seed", "loss")


@dataclass(frozen=True)
class BatchPlan:
    gpus: int                    # per node (0: one CPU process)
    nodes: int
    per_gpu: Optional[int]       # train_dataloader.batch_size
    base: Optional[int]          # auto_scale_lr.base_batch_size (None: the template has none)
    lr: Optional[float]          # optim_wrapper.optimizer.lr as rendered
    auto: bool                   # auto_scale_lr.enable

    @property
    def processes(self) -> int:
        return self.nodes * max(1, self.gpus)

    @property
    def total(self) -> Optional[int]:
        return None if self.per_gpu is None else self.processes * self.per_gpu

    @property
    def scaled_lr(self) -> Optional[float]:
        """The linear rule's lr for this batch: lr × total / base."""
        if self.lr is None or not self.base or self.total is None:
            return None
        return float(f"{self.lr * self.total / self.base:.6g}")

    @property
    def linear(self) -> bool:
        """True when the lr trained with follows the linear rule (or nothing can be said)."""
        return self.auto or self.scaled_lr is None or self.total == self.base

    def column(self) -> str:
        """``2 (base 16)``; with auto_scale_lr ``2 (base 16, lr→0.00125)``."""
        if self.total is None:
            return "?"
        if self.base is None:
            return f"{self.total}"
        tail = f", lr→{self.scaled_lr:g}" if self.auto and self.scaled_lr is not None and self.total != self.base \
            else ""
        return f"{self.total} (base {self.base}{tail})"

    def warning(self, who: str) -> Optional[str]:
        if self.linear:
            return None
        gpu = f"{self.gpus} GPU" if self.gpus else "1 CPU process"
        return (f"{who}: lr {self.lr:g} is for a batch of {self.base} (auto_scale_lr.base_batch_size) but the run "
                f"trains with {self.total} ({gpu} × {self.nodes} node × {self.per_gpu} images); the linear rule "
                f"gives lr {self.scaled_lr:g}: set params.auto_scale_lr: true (mmengine scales it) or params.lr: "
                f"{self.scaled_lr:g}")


_CACHE: Dict[Tuple[str, str, str], Tuple[Optional[int], Optional[int], Optional[float], bool]] = {}


def _from_config(template: str, params: Dict[str, Any], overrides: Dict[str, Any]):
    key = (str(template), json.dumps({k: v for k, v in params.items() if k not in _IRRELEVANT}, sort_keys=True,
                                     default=str), json.dumps(overrides, sort_keys=True, default=str))
    if key not in _CACHE:
        from ssflctl.plan import render

        p = {k: v for k, v in params.items() if k not in _IRRELEVANT}
        if "classes" in render.template_params(template):
            p["classes"] = ["_"]  # None would read the annotation file: not needed for the batch
        cfg = render.render_config(template, p, overrides, cache=render.RenderCache())  # the template parsed once
        loader = cfg.get("train_dataloader") or {}
        asl = cfg.get("auto_scale_lr") or {}
        lr = ((cfg.get("optim_wrapper") or {}).get("optimizer") or {}).get("lr")
        _CACHE[key] = (loader.get("batch_size"), asl.get("base_batch_size"),
                       None if lr is None else float(lr), bool(asl.get("enable", False)))
    return _CACHE[key]


def of_run(run) -> Optional[BatchPlan]:
    """A :class:`BatchPlan` for a ``RunSpec`` (None when the config cannot be rendered here, e.g.
    without mmengine, or a param needs data this machine does not have)."""
    try:
        per_gpu, base, lr, auto = _from_config(run.template, dict(run.params), dict(run.overrides or {}))
    except Exception:  # noqa: BLE001 - the plan is shown without the column's value
        return None
    res = run.resources or {}
    return BatchPlan(gpus=int(res.get("gpus", 0) or 0), nodes=int(res.get("nodes", 1) or 1),
                     per_gpu=None if per_gpu is None else int(per_gpu),
                     base=None if base is None else int(base), lr=lr, auto=auto)
