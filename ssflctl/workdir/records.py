"""Typed records of the files in a run directory — the contract between the login node and the node.

One class per file; each is built from the file's JSON with :meth:`from_json` (tolerant: a missing
or malformed field becomes None, never an exception — a run directory may come from an older
ssflctl or a half-written copy) and written back with :meth:`to_json`. Reading and writing the
files themselves is :mod:`ssflctl.workdir.layout`'s job.

===================  ==========================  ==================================================
file                 record                      written by
===================  ==========================  ==================================================
run.json             :class:`RunRecord`          ``ssflctl submit`` (login node)
attempt.json         :class:`AttemptInfo`        the renderer (login node, or the node on a retry)
progress.json        :class:`Progress`           the job, every logging interval (rank 0)
outcome.json         :class:`Outcome`            the job, once, when the attempt ends (rank 0)
(both, nested)       :class:`EffectiveLr`        the job: the base lr the optimizer really has
nan.json             :class:`NanRecord`          the NaN guard, when it trips
recovery.json        list of :class:`Recovery`   the job: interruptions and resumes (rank 0)
metrics.json         dict (docs/design.md)       the test step
===================  ==========================  ==================================================
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional


class OutcomeKind(str, Enum):
    """How an attempt ended (outcome.json ``outcome``)."""
    DONE = "done"            # trained to the end
    NAN = "nan"              # the guard stopped it at a non-finite loss
    FAILED = "failed"        # an exception (code, out of memory): no lr change
    PREEMPTED = "preempted"  # interrupted and the policy says not to resume (on_preempt restart|fail)
    TIMEOUT = "timeout"
    NODE_FAIL = "node_fail"

    @classmethod
    def parse(cls, value: Any) -> "OutcomeKind":
        try:
            return cls(str(value))
        except ValueError:
            return cls.FAILED


#: CUDA's out-of-memory error as torch words it (torch.cuda.OutOfMemoryError; older torch: RuntimeError)
CUDA_OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "CUDA error: out of memory")


def is_cuda_oom(*texts: Optional[str]) -> bool:
    """Whether an outcome's reason or log tail is CUDA's out-of-memory error: a failure to explain
    (``control.state.explain``), never a NaN to retry (``node.retry.decide``)."""
    return any(t and any(m in t for m in CUDA_OOM_MARKERS) for t in texts)


class RunState(str, Enum):
    """A run's state as ``status``, ``report`` and ``submit`` see it (one rule: workdir.state)."""
    PENDING = "pending"        # registered, never submitted
    SUBMITTING = "submitting"  # claimed by a submit in flight
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"        # the scheduler cannot say and the files do not

    def __str__(self) -> str:
        return self.value


ACTIVE = (RunState.SUBMITTING, RunState.QUEUED, RunState.RUNNING)
#: states a new ``submit`` sends again
RESUBMIT = (RunState.PENDING, RunState.FAILED, RunState.CANCELLED, RunState.UNKNOWN)


def _f(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _i(v: Any) -> Optional[int]:
    if isinstance(v, bool):
        return None
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _s(v: Any) -> Optional[str]:
    return None if v is None else str(v)


def fmt_lr(lr: Any) -> str:
    """``0.01`` → ``'0.01'``; None → ``'?'``."""
    return f"{lr:g}" if isinstance(lr, (int, float)) and not isinstance(lr, bool) else ("?" if lr is None else str(lr))


def lr_differs(lr: Any, effective: Any) -> bool:
    """Whether ``effective`` (the lr the optimizer trained with) is another number than ``lr`` (the
    config's): both numbers, not equal to a relative 1e-9 (a float product such as 0.01 × 1.0 is
    the same lr)."""
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lr, effective))
    return ok and not math.isclose(float(lr), float(effective), rel_tol=1e-9, abs_tol=0.0)


def fmt_lr_trained(lr: Any, effective: Any = None, why: Optional[str] = "auto_scale_lr", paren: bool = True) -> str:
    """An attempt's lr for a text view: the config's ``lr`` alone (:func:`fmt_lr`) when the
    optimizer trained with it (or nothing was recorded), else both with an arrow:
    ``0.01→0.00125 (auto_scale_lr)``; ``paren=False``: ``0.01→0.00125 by auto_scale_lr`` (inside
    a sentence that is in parentheses already). ``why`` None: no tail (``0.01→0.00125``)."""
    if not lr_differs(lr, effective):
        return fmt_lr(lr)
    text = f"{fmt_lr(lr)}→{fmt_lr(effective)}"
    if why:
        text += f" ({why})" if paren else f" by {why}"
    return text


class _Record:
    """from_json/to_json for flat dataclasses; unknown keys are kept in ``extra``."""

    @classmethod
    def from_json(cls, d: Any):
        if not isinstance(d, dict):
            return None
        names, keys, has_extra = cls._schema()
        conv = getattr(cls, "_CONVERT", {})
        kw = {}
        for n, key in zip(names, keys):
            if key in d:
                kw[n] = conv[n](d[key]) if n in conv else d[key]
        obj = cls(**kw)
        if has_extra:
            obj.extra = {k: v for k, v in d.items() if k not in keys}
        return obj

    @classmethod
    def _schema(cls):
        """(field names but extra, their JSON keys, whether there is an ``extra``), once per class."""
        got = cls.__dict__.get("_schema_cache")
        if got is None:
            fields = [f.name for f in dataclasses.fields(cls)]
            names = tuple(n for n in fields if n != "extra")
            keys = tuple(getattr(cls, "_KEYS", {}).get(n, n) for n in names)
            got = (names, keys, "extra" in fields)
            cls._schema_cache = got
        return got

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            out[getattr(type(self), "_KEYS", {}).get(f.name, f.name)] = v.value if isinstance(v, Enum) else v
        out.update(getattr(self, "extra", {}) or {})
        return out


@dataclass
class EffectiveLr(_Record):
    """The base lr the optimizer trains with, as the job measured it (progress.json and
    outcome.json ``effective_lr``; rank 0 writes it, the login side only reads it).

    mmengine scales the config's lr at ``Runner.train`` when ``auto_scale_lr.enable`` is true
    (``Runner.scale_lr``, mmengine 0.10.7: every param group's lr × real total batch /
    ``auto_scale_lr.base_batch_size``, the real batch being world size × ``train_dataloader.batch_size``),
    so attempt.json's ``lr`` (the config's ``optim_wrapper.optimizer.lr``) is not what the run
    trains at. Fields (lrs are plain learning rates, batches counts of images per optimizer step):

    * ``config``: the optimizer's configured lr (``optimizer.defaults['lr']``: the config's, unscaled);
    * ``effective``: the base lr the optimizer trains with once built, scaled and resumed: the
      param groups' ``initial_lr`` (``lr`` without a schedule), i.e. before the schedule's warmup
      and decay (see ``ssflctl.node.lr_resume.effective_lr`` for the rule with ``paramwise_cfg``);
    * ``scale``: mmengine's factor (total / base), None when auto_scale_lr is off;
    * ``batch``: the real total batch (``world_size`` × per-GPU batch), ``base_batch``:
      ``auto_scale_lr.base_batch_size`` (None when the config has none); ``world_size``: processes.
    """
    config: Optional[float] = None
    effective: Optional[float] = None
    scale: Optional[float] = None
    batch: Optional[int] = None
    base_batch: Optional[int] = None
    world_size: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    _CONVERT = {"config": _f, "effective": _f, "scale": _f, "batch": _i, "base_batch": _i, "world_size": _i}

    @property
    def why(self) -> str:
        """What made ``effective`` differ from the config's lr: ``auto_scale_lr`` when mmengine
        scaled it, else ``optimizer`` (e.g. a resume that restored another attempt's lr)."""
        return "auto_scale_lr" if self.scale is not None else "optimizer"

    def text(self, lr: Any = None, paren: bool = True) -> str:
        """``0.01→0.00125 (auto_scale_lr)`` (:func:`fmt_lr_trained`) against ``lr`` (the
        attempt's config lr; default :attr:`config`)."""
        return fmt_lr_trained(self.config if lr is None else lr, self.effective, self.why, paren)


def _nested(to_json: Dict[str, Any], name: str, value: Optional["_Record"]) -> Dict[str, Any]:
    """``to_json`` with record ``name`` as its own JSON, or without the key when it is None (a file
    written before the field existed stays byte-identical)."""
    if value is None:
        to_json.pop(name, None)
    else:
        to_json[name] = value.to_json()
    return to_json


@dataclass
class NanRecord(_Record):
    """nan.json (the guard's record) or outcome.json's ``nan``: where the loss went non-finite.

    ``source`` is None for the guard's exact record, ``"scalars"``/``"text_log"`` for one found in
    mmengine's logs (then ``iter`` is the logging point and ``last_finite_iter`` the one before).
    ``lr`` is the optimizer's *current* lr at that iteration (after mmengine's auto_scale_lr and the
    schedule), not attempt.json's config lr.
    """
    iter: Optional[int] = None
    epoch: Optional[int] = None
    loss_key: Optional[str] = None
    nonfinite: Dict[str, str] = field(default_factory=dict)
    lr: Optional[float] = None
    last_finite_iter: Optional[int] = None
    source: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    _CONVERT = {"iter": _i, "epoch": _i, "lr": _f, "last_finite_iter": _i,
                "nonfinite": lambda v: dict(v) if isinstance(v, dict) else {}}

    @property
    def kind(self) -> str:
        """'NaN', 'Inf' or '-Inf' of the loss that tripped."""
        key = self.loss_key or "loss"
        raw = self.nonfinite.get(key) or self.extra.get("value") or "nan"
        return {"nan": "NaN", "inf": "Inf", "-inf": "-Inf"}.get(str(raw), "NaN")

    def describe(self, lr: Optional[float] = None, effective: Optional["EffectiveLr"] = None) -> str:
        """The one NaN sentence everywhere: ``NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)``.

        ``lr``: the lr to name (the retry passes attempt.json's config lr), default the record's
        own (the optimizer's current one). ``effective`` (with ``lr``): the attempt's
        :class:`EffectiveLr`; when the optimizer trained at another base lr the sentence names
        both, ``(lr 0.01→0.00125 by auto_scale_lr)``."""
        text = f"{self.kind} in {self.loss_key or 'loss'}"
        where = []
        if self.epoch is not None:
            where.append(f"epoch {self.epoch}")
        if self.iter is not None:
            where.append(f"iter {self.iter}")
        if where:
            text += " at " + " ".join(where)
        used = lr if lr is not None else self.lr
        if used is not None:
            trained = effective.effective if effective is not None and lr is not None else None
            text += f" (lr {fmt_lr_trained(used, trained, effective.why if effective else None, paren=False)})"
        return text

    def first_iter(self) -> Optional[int]:
        """The earliest iteration the first NaN can have happened at (1-based): exact for the
        guard's record; for one found in a log, the iteration after the last finite logging point."""
        if self.source in ("scalars", "text_log"):
            return (self.last_finite_iter + 1) if self.last_finite_iter is not None else 1
        return self.iter


@dataclass
class Outcome(_Record):
    """outcome.json: written once when the attempt ends.

    ``reason`` is one line (an exception's: ``TypeError: ... unexpected keyword argument ...``);
    ``log_tail`` the end of the attempt's text log; ``traceback`` (an attempt an exception ended)
    the exception's own traceback where it was raised: the innermost frames of each exception of
    the chain, causes first (at most ~15 lines; the job also appends it to the text log). Views
    show :attr:`tail` for a failed attempt."""
    outcome: OutcomeKind = OutcomeKind.FAILED
    reason: str = ""
    nan: Optional[NanRecord] = None
    checkpoint: Optional[str] = None
    log_tail: str = ""
    finished_at: Optional[str] = None
    #: the base lr the attempt trained at (:class:`EffectiveLr`; None when the training never began)
    effective_lr: Optional[EffectiveLr] = None
    #: the exception's traceback (innermost frames, chained causes included); "" when none ended it
    traceback: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)
    _CONVERT = {"outcome": OutcomeKind.parse, "nan": NanRecord.from_json, "reason": lambda v: str(v or ""),
                "log_tail": lambda v: str(v or ""), "effective_lr": EffectiveLr.from_json,
                "traceback": lambda v: str(v or "")}

    def to_json(self) -> Dict[str, Any]:
        out = super().to_json()
        out["nan"] = self.nan.to_json() if self.nan is not None else None
        if not self.traceback:  # only an attempt an exception ended has one (older files stay as they were)
            out.pop("traceback", None)
        return _nested(out, "effective_lr", self.effective_lr)

    @property
    def tail(self) -> str:
        """What a view shows under a failed attempt: the exception's traceback when one ended it,
        else the end of its text log."""
        return self.traceback or self.log_tail

    @property
    def done(self) -> bool:
        return self.outcome is OutcomeKind.DONE

    def describe(self) -> str:
        """One line: the reason the job wrote, else the NaN sentence, else the kind."""
        if self.reason:
            return self.reason
        if self.outcome is OutcomeKind.NAN and self.nan is not None:
            return self.nan.describe()
        return self.outcome.value


@dataclass
class Progress(_Record):
    """progress.json: the job's last logging point (rank 0). ``lr`` is the optimizer's current lr
    there (after mmengine's auto_scale_lr and the schedule); ``effective_lr`` its base lr."""
    epoch: Optional[int] = None
    max_epochs: Optional[int] = None
    iter: Optional[int] = None
    max_iters: Optional[int] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    time: Optional[float] = None
    updated_at: Optional[str] = None
    #: the base lr the optimizer trains with (:class:`EffectiveLr`, measured once at the start of
    #: training); ``lr`` above is the current one (after the schedule) at this logging point
    effective_lr: Optional[EffectiveLr] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    _CONVERT = {"epoch": _i, "max_epochs": _i, "iter": _i, "max_iters": _i, "loss": _f, "lr": _f, "time": _f,
                "effective_lr": EffectiveLr.from_json}

    def to_json(self) -> Dict[str, Any]:
        return _nested(super().to_json(), "effective_lr", self.effective_lr)

    def short(self) -> str:
        """'epoch 3/12', else 'iter 120/480' (the report's note)."""
        if self.epoch is not None and self.max_epochs:
            return f"epoch {self.epoch}/{self.max_epochs}"
        if self.iter is not None and self.max_iters:
            return f"iter {self.iter}/{self.max_iters}"
        return ""

    def describe(self) -> str:
        """'epoch 3/12 iter 120/480' (what is known)."""
        out = ""
        if self.epoch is not None and self.max_epochs:
            out = f"epoch {self.epoch}/{self.max_epochs}"
        if self.iter is not None:
            out += (" " if out else "") + (f"iter {self.iter}/{self.max_iters}" if self.max_iters else
                                           f"iter {self.iter}")
        return out


class RecoveryKind(str, Enum):
    INTERRUPTED = "interrupted"  # the scheduler's signal (time limit, preemption): requeued
    RESUMED = "resumed"          # the requeued job continued the attempt from a checkpoint
    RESTARTED = "restarted"      # the requeued job found no checkpoint and started the attempt over


@dataclass
class Recovery(_Record):
    """One entry of recovery.json. ``cause`` is structured (what stopped the job, e.g. ``SIGUSR2, a
    time limit by submitit's rule (ran 0.8 of 1 min)``); ``message`` is the human line built from
    the fields, never parsed back."""
    kind: str = ""
    at: Optional[str] = None
    cause: Optional[str] = None
    iter: Optional[int] = None
    checkpoint: Optional[str] = None
    lr: Optional[float] = None
    restart_count: Optional[int] = None
    message: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)
    _CONVERT = {"iter": _i, "lr": _f, "restart_count": _i, "message": lambda v: str(v or ""),
                "kind": lambda v: str(v or "")}

    def to_json(self) -> Dict[str, Any]:
        """Only the facts the entry has (an interruption knows no lr: it keeps the attempt's)."""
        return {k: v for k, v in super().to_json().items() if v is not None}


@dataclass
class AttemptInfo(_Record):
    """attempt.json: what the job needs to run attempt ``attempt`` (written before launch).

    ``lr`` is the config's lr (``optim_wrapper.optimizer.lr`` in config.py): the one a NaN retry
    lowers (× ``retry.factor``). With ``auto_scale_lr`` mmengine trains at another base lr, which the
    job records in progress.json/outcome.json (:class:`EffectiveLr`, ``AttemptDir.effective_lr``)."""
    run_id: Optional[str] = None
    attempt: Optional[int] = None
    config: Optional[str] = None
    lr: Optional[float] = None
    resume_from: Optional[str] = None
    reason: str = ""
    rendered_at: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    _CONVERT = {"attempt": _i, "lr": _f, "reason": lambda v: str(v or "")}

    @property
    def started(self) -> Optional[str]:
        return self.rendered_at or _s(self.extra.get("created_at"))


@dataclass
class RunRecord(_Record):
    """run.json: the run as submitted (docs/design.md shows an example)."""
    run_id: str = ""
    name: str = ""
    experiment: str = ""
    axes: Dict[str, Any] = field(default_factory=dict)
    template: str = ""
    params: Dict[str, Any] = field(default_factory=dict)
    overrides: Dict[str, Any] = field(default_factory=dict)
    resources: Dict[str, Any] = field(default_factory=dict)
    retry: Dict[str, Any] = field(default_factory=dict)
    test: bool = True
    submission_id: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    _CONVERT = {"axes": lambda v: dict(v or {}), "params": lambda v: dict(v or {}),
                "overrides": lambda v: dict(v or {}), "resources": lambda v: dict(v or {}),
                "retry": lambda v: dict(v or {}), "test": lambda v: bool(True if v is None else v),
                "run_id": lambda v: str(v or ""), "name": lambda v: str(v or ""),
                "experiment": lambda v: str(v or ""), "template": lambda v: str(v or "")}

    @property
    def max_attempts(self) -> int:
        return int((self.retry or {}).get("max_attempts", 3) or 3)

    @property
    def retries_on_nan(self) -> bool:
        return (self.retry or {}).get("on_nan", "lower_lr") != "fail"

    @property
    def base_lr(self) -> Optional[float]:
        return _f(self.params.get("lr", self.axes.get("lr")))


def recovery_list(items: Any) -> List[Recovery]:
    """recovery.json's body as records (entries that are not mappings are dropped)."""
    if not isinstance(items, list):
        return []
    return [r for r in (Recovery.from_json(x) for x in items) if r is not None and r.kind]
