"""NaN guard: stop an mmengine training run at the first non-finite loss and say where.

Use it from any mmengine/mmdet config::

    custom_imports = dict(imports=['ssflctl.node.guard'], allow_failed_imports=False)
    custom_hooks = [dict(type='NanGuardHook')]

Every iteration, ``after_train_iter`` looks at the total loss and each of its parts
(every log variable whose name contains ``loss``, the same rule mmengine's ``parse_losses``
uses to sum them). It reads the values that ``RuntimeInfoHook`` (priority VERY_HIGH, so it
always runs first) has already turned into Python floats in the message hub
(``train/<key>``), so the guard adds no device synchronisation of its own; a tensor is only
``.item()``-ed as a fallback when the message hub does not hold the key.

On the first NaN/Inf it writes ``<work_dir>/nan.json`` atomically, logs one line in the text
log (``NanGuard: ... loss_cls: nan ...``, which ``ssflctl.workdir.mmlogs`` recognises), and raises
:class:`NonFiniteLossError` carrying the same record. The record::

    {"outcome": "nan", "iter": 1234, "epoch": 3, "iter_in_epoch": 34, "loss_key": "loss_cls",
     "nonfinite": {"loss": "nan", "loss_cls": "nan"}, "values": {...},
     "last_finite": {"loss_cls": [0.41, 0.52, ...], ...}, "last_finite_iter": 1233,
     "lr": 0.01, "lrs": {"lr": [0.01]}, "reason": "NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)",
     "work_dir": "...", "time": "2026-...Z"}

``iter`` counts iterations from 1, as mmengine's log and checkpoint names do (``iter_1234.pth``
holds the weights after 1234 iterations); ``epoch`` likewise (None for iteration-based loops).

Several ranks (DDP): a rank's loss is its own (mmengine 0.10.7 reduces no loss across ranks), so
the ranks agree every iteration through one all-reduce of a ``world_size``-long flag vector (rank k
sets slot k when its loss is non-finite; ``benchmarks/bench_guard_dist.py`` measures it against an
iteration). When a slot is set, every rank stops at that same iteration: the records are gathered
(only then), the first rank that saw the non-finite loss gives the record (``rank``, ``ranks``,
``world_size`` added), rank 0 writes nan.json, every rank logs the stop line and raises, so no rank is
ever left waiting in a collective and all of them take part in the retry.

Priority 65: after ``LoggerHook`` (BELOW_NORMAL = 60), so the NaN iteration still reaches the
text log and ``scalars.json`` when it is a logging iteration; before ``ParamSchedulerHook``
(LOW = 70) and ``CheckpointHook`` (VERY_LOW = 90), so no checkpoint is ever written after the
NaN iteration (the exception ends the loop before CheckpointHook's ``after_train_iter`` and
before the epoch's ``after_train_epoch``).
"""
from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssflctl import atomic

try:  # mmengine is only needed on the training side; importing ssflctl.node.guard stays cheap.
    from mmengine.hooks import Hook as _HookBase
    from mmengine.registry import HOOKS as _HOOKS
except Exception:  # pragma: no cover - exercised only without the training stack
    _HookBase = object  # type: ignore[assignment,misc]
    _HOOKS = None

from ssflctl.workdir.layout import NAN as NAN_FILE  # noqa: E402  (the layout owns the name)
#: between LoggerHook (60) and ParamSchedulerHook (70) / CheckpointHook (90)
GUARD_PRIORITY = 65


class NonFiniteLossError(RuntimeError):
    """Raised by :class:`NanGuardHook` at the first non-finite loss; ``.record`` is nan.json."""

    def __init__(self, record: Dict[str, Any]):
        self.record = dict(record)
        super().__init__(self.record.get("reason") or "non-finite loss")

    def __reduce__(self):  # picklable (submitit ships exceptions back to the login node)
        return (self.__class__, (self.record,))


def _nonfinite_name(v: float) -> Optional[str]:
    if v != v:
        return "nan"
    if v == math.inf:
        return "inf"
    if v == -math.inf:
        return "-inf"
    return None


def format_reason(record: Dict[str, Any]) -> str:
    """The one line the status shows, e.g. ``NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)``."""
    from ssflctl.workdir.records import NanRecord

    text = (NanRecord.from_json(record) or NanRecord()).describe()
    amp = record.get("amp") or {}
    if amp.get("dtype") == "float16":
        text += ("; under fp16 AMP, where a value beyond float16's range (65504) is inf: "
                 "try amp: bf16 (float32's range) or amp: null (fp32)")
    return text


def _as_float(value: Any) -> Optional[float]:
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        return float(value)
    item = getattr(value, "item", None)
    if item is None:
        return None
    try:
        if getattr(value, "numel", lambda: 1)() != 1:
            value = value.mean()
        return float(value.item())
    except Exception:
        return None


class NanGuardHook(_HookBase):  # type: ignore[misc,valid-type]
    """Stop training at the first non-finite loss; write ``nan.json``; raise NonFiniteLossError.

    Args:
        keep: how many of the last finite values to keep per loss key.
        keys: loss keys to check; default every output key containing ``loss``.
        out_file: where to write the record; default ``<work_dir>/nan.json``.
        raise_error: raise :class:`NonFiniteLossError` (default). With False the hook only
            records and asks the loop to stop (``runner.train_loop.stop_training``) — only
            useful for experiments; raising is what keeps checkpoints clean.
    """

    priority = GUARD_PRIORITY

    def __init__(self, keep: int = 5, keys=None, out_file: Optional[str] = None,
                 raise_error: bool = True, priority: Any = None):
        if priority is not None:
            self.priority = priority
        self.keep = int(keep)
        self.keys = tuple(keys) if keys else None
        self.out_file = out_file
        self.raise_error = raise_error
        self.history: Dict[str, deque] = {}
        self.last_finite_iter: Optional[int] = None
        self.tripped: Optional[Dict[str, Any]] = None
        self._t0 = float("inf")
        self._flags = None  # the agreement vector, allocated once per training (several ranks)

    # -- reading the values ---------------------------------------------------------------
    def _values(self, runner, outputs) -> Dict[str, float]:
        if not outputs or not isinstance(outputs, dict):
            return {}
        hub = getattr(runner, "message_hub", None)
        scalars = getattr(hub, "log_scalars", None) or {}
        vals: Dict[str, float] = {}
        for key, raw in outputs.items():
            if self.keys is not None:
                if key not in self.keys:
                    continue
            elif "loss" not in key:
                continue
            v = None
            if isinstance(raw, (float, int)) and not isinstance(raw, bool):
                v = float(raw)
            else:
                buf = scalars.get(f"train/{key}")
                if buf is not None:
                    try:
                        v = float(buf.current())  # already a Python float: no sync
                    except Exception:
                        v = None
                if v is None:
                    v = _as_float(raw)
            if v is not None:
                vals[key] = v
        return vals

    # -- mmengine hook API -----------------------------------------------------------------
    def before_train(self, runner) -> None:
        self.history = {}
        self.tripped = None
        self._t0 = time.time()
        self._flags = None
        from ssflctl.node import dist

        if dist.initialized():
            import torch
            import torch.distributed as td

            self._flags = torch.zeros(td.get_world_size(), device=dist.device())
            self._rank = td.get_rank()

    def _agree(self, bad: bool) -> List[int]:
        """The ranks whose loss was non-finite at this iteration (one all-reduce of a flag per rank)."""
        import torch.distributed as td

        flags = self._flags
        flags.zero_()
        if bad:
            flags[self._rank] = 1.0
        td.all_reduce(flags)
        return [i for i, v in enumerate(flags.tolist()) if v]

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        vals = self._values(runner, outputs)
        bad = {k: n for k, v in vals.items() if (n := _nonfinite_name(v)) is not None}
        it = int(getattr(runner, "iter", 0)) + 1
        ranks = self._agree(bool(bad)) if self._flags is not None else None
        if not bad and not ranks:
            for k, v in vals.items():
                self.history.setdefault(k, deque(maxlen=self.keep)).append(v)
            self.last_finite_iter = it
            return
        self.trip(runner, batch_idx, vals, bad, ranks)

    # -- the trip ----------------------------------------------------------------------------
    def trip(self, runner, batch_idx: int, vals: Dict[str, float], bad: Dict[str, str],
             ranks: Optional[List[int]] = None) -> None:
        """Record and stop. ``ranks`` (several ranks): who saw a non-finite loss at this iteration;
        every rank is here at the same iteration, so gathering the records cannot wait."""
        record = build_record(runner, batch_idx, vals, bad,
                              {k: list(d) for k, d in self.history.items()},
                              self.last_finite_iter) if bad else None
        path = Path(self.out_file) if self.out_file else Path(runner.work_dir) / NAN_FILE
        main = True
        if ranks:
            import torch.distributed as td

            gathered: List[Any] = [None] * td.get_world_size()
            td.all_gather_object(gathered, record)
            first = ranks[0]
            record = dict(gathered[first], rank=first, ranks=list(ranks), world_size=len(gathered))
            where = f"rank {first}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
            record["reason"] = f"{record['reason']} on {where} of {len(gathered)}"
            vals = dict(record["values"])
            main = self._rank == 0
        self.tripped = record
        record["file"] = str(path)
        if ranks:
            if main:  # one writer: rank 0, with the record of the rank that saw it
                atomic.write_json(path, record)
        else:
            # a nan.json left by an earlier start of the same work_dir is replaced
            try:
                fresh = path.stat().st_mtime >= getattr(self, "_t0", float("inf"))
            except FileNotFoundError:
                fresh = False
            if not fresh:
                atomic.write_json(path, record)
        logger = getattr(runner, "logger", None)
        if logger is not None:
            parts = "  ".join(f"{k}: {vals[k]}" for k in vals)
            logger.error(f"NanGuard: stopping at the first non-finite loss: {record['reason']}; "
                         f"Iter(train) [{record['iter']}]  {parts}  (record: {path})")
        if self.raise_error:
            raise NonFiniteLossError(record)
        loop = getattr(runner, "train_loop", None)
        if loop is not None and hasattr(loop, "stop_training"):
            loop.stop_training = True


def _lr_of(runner):
    try:
        lrs = runner.optim_wrapper.get_lr()
    except Exception:
        return None, None
    lrs = {k: [float(x) for x in v] for k, v in dict(lrs).items()}
    first = None
    for k in ("lr", *lrs.keys()):
        if lrs.get(k):
            first = lrs[k][0]
            break
    return first, lrs


def _amp_of(runner) -> Optional[Dict[str, Any]]:
    """Mixed-precision facts of an mmengine ``AmpOptimWrapper`` (mmengine 0.10.7), else None.

    ``{"dtype": "float16" | "bfloat16", "loss_scale": <GradScaler scale> | None}``. A loss-scale
    overflow that the GradScaler handles (inf/NaN *gradients*: the step is skipped, the scale
    halved) leaves the loss finite and never reaches the guard; a non-finite *loss* under fp16
    AMP may still be a float16 overflow in the forward pass that fp32 or bf16 would not have.
    """
    wrapper = getattr(runner, "optim_wrapper", None)
    if wrapper is None or not any(c.__name__ == "AmpOptimWrapper" for c in type(wrapper).__mro__):
        return None
    dtype = getattr(wrapper, "cast_dtype", None)
    # mmengine's autocast: dtype None -> float16 on CUDA (torch's default)
    name = "float16" if dtype is None else str(dtype).replace("torch.", "")
    scale = None
    scaler = getattr(wrapper, "loss_scaler", None)
    try:
        if scaler is not None and scaler.is_enabled():
            scale = float(scaler.get_scale())
    except Exception:
        scale = None
    return {"dtype": name, "loss_scale": scale}


def _by_epoch(loop) -> bool:
    if loop is None:
        return False
    try:
        from mmengine.runner import IterBasedTrainLoop
        if isinstance(loop, IterBasedTrainLoop):
            return False
    except Exception:  # pragma: no cover
        pass
    if type(loop).__name__ == "IterBasedTrainLoop":
        return False
    return hasattr(loop, "max_epochs")


def build_record(runner, batch_idx, vals, bad, last_finite, last_finite_iter) -> Dict[str, Any]:
    """The nan.json body (see the module docstring)."""
    it = int(getattr(runner, "iter", 0)) + 1
    by_epoch = _by_epoch(getattr(runner, "train_loop", None))
    epoch = int(getattr(runner, "epoch", 0)) + 1 if by_epoch else None
    parts = [k for k in bad if k != "loss"]
    loss_key = parts[0] if parts else next(iter(bad))
    lr, lrs = _lr_of(runner)
    record: Dict[str, Any] = {
        "outcome": "nan",
        "iter": it,
        "epoch": epoch,
        "iter_in_epoch": (int(batch_idx) + 1) if by_epoch and batch_idx is not None else None,
        "loss_key": loss_key,
        "nonfinite": dict(bad),
        "values": {k: (bad[k] if k in bad else v) for k, v in vals.items()},
        "last_finite": last_finite,
        "last_finite_iter": last_finite_iter,
        "lr": lr,
        "lrs": lrs,
        "work_dir": str(getattr(runner, "work_dir", "")),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    amp = _amp_of(runner)
    if amp is not None:
        record["amp"] = amp
    record["reason"] = format_reason(record)
    return record


def read_nan_record(work_dir) -> Optional[Dict[str, Any]]:
    """The guard's record in ``work_dir`` (nan.json), or None."""
    return atomic.read_json(Path(work_dir) / NAN_FILE)


if _HOOKS is not None:  # pragma: no branch
    _HOOKS.register_module(name="NanGuardHook", module=NanGuardHook, force=True)


# registered in mmengine's HOOKS beside NanGuardHook (configs import ssflctl.node.guard)
from ssflctl.node.lr_resume import LrOverrideHook  # noqa: E402,F401
