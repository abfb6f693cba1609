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
nan.json             :class:`NanRecord`          the NaN guard, when it trips
recovery.json        list of :class:`Recovery`   the job: interruptions and resumes (rank 0)
metrics.json         dict (docs/design.md)       the test step
===================  ==========================  ==================================================
"""
from __future__ import annotations

import dataclasses
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
class NanRecord(_Record):
    """nan.json (the guard's record) or outcome.json's ``nan``: where the loss went non-finite.

    ``source`` is None for the guard's exact record, ``"scalars"``/``"text_log"`` for one found in
    mmengine's logs (then ``iter`` is the logging point and ``last_finite_iter`` the one before).
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

    def describe(self, lr: Optional[float] = None) -> str:
        """The one NaN sentence everywhere: ``NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)``."""
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
            text += f" (lr {fmt_lr(used)})"
        return text

    def first_iter(self) -> Optional[int]:
        """The earliest iteration the first NaN can have happened at (1-based): exact for the
        guard's record; for one found in a log, the iteration after the last finite logging point."""
        if self.source in ("scalars", "text_log"):
            return (self.last_finite_iter + 1) if self.last_finite_iter is not None else 1
        return self.iter


@dataclass
class Outcome(_Record):
    """outcome.json: written once when the attempt ends."""
    outcome: OutcomeKind = OutcomeKind.FAILED
    reason: str = ""
    nan: Optional[NanRecord] = None
    checkpoint: Optional[str] = None
    log_tail: str = ""
    finished_at: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    _CONVERT = {"outcome": OutcomeKind.parse, "nan": NanRecord.from_json, "reason": lambda v: str(v or ""),
                "log_tail": lambda v: str(v or "")}

    def to_json(self) -> Dict[str, Any]:
        out = super().to_json()
        out["nan"] = self.nan.to_json() if self.nan is not None else None
        return out

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
    """progress.json: the job's last logging point (rank 0)."""
    epoch: Optional[int] = None
    max_epochs: Optional[int] = None
    iter: Optional[int] = None
    max_iters: Optional[int] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    time: Optional[float] = None
    updated_at: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    _CONVERT = {"epoch": _i, "max_epochs": _i, "iter": _i, "max_iters": _i, "loss": _f, "lr": _f, "time": _f}

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
    """attempt.json: what the job needs to run attempt ``attempt`` (written before launch)."""
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
