"""Retry policy: what to do after an attempt ended (NaN, preemption, node failure, error).

Light module (no torch/mmengine at import).

Policy keys (``run.json["retry"]``, from the experiment file; the model is
:class:`ssflctl.workdir.retry_policy.RetryPolicy`, re-exported here), with defaults::

    on_nan: lower_lr        # lower_lr | retry (same lr) | fail
    factor: 0.1             # new lr = lr × factor   (0 < factor < 1)
    max_attempts: 3         # attempts in all, the first included
    from: scratch           # scratch | checkpoint (the last clean one: saved before the NaN)
    on_preempt: resume      # resume | restart | fail     (also Slurm time limit, requeue)
    on_node_fail: resubmit  # resubmit | fail
    on_error: fail          # fail | retry (same lr, a new attempt)

Two traps of mmengine 0.10.7 this module handles:

* ``last_checkpoint`` keeps pointing at checkpoints written after the NaN (poisoned weights):
  :func:`clean_checkpoint` reads each checkpoint's own saved iteration instead.
* ``resume`` restores the optimizer and the schedulers, so a lower lr written in the config is
  silently ignored: ``ssflctl.node.lr_resume`` (``LrOverrideHook``) rewrites the param groups' lr
  and the schedulers' base values after the resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from ssflctl.workdir import checkpoints, mmlogs as logs
from ssflctl.workdir import retry_policy as _policy
from ssflctl.workdir.layout import AttemptDir
from ssflctl.workdir.records import EffectiveLr, NanRecord, is_cuda_oom, lr_differs

# The policy itself is part of run.json's contract: one pydantic model, in ssflctl.workdir.
RetryPolicy = _policy.RetryPolicy
DEFAULTS: Dict[str, Any] = _policy.DEFAULTS
_CHOICES = _policy.CHOICES


@dataclass(frozen=True)
class Decision:
    action: str              # "retry" (a new attempt) | "resume" (same attempt, same lr) | "stop"
    lr: float
    resume_from: Optional[str]
    reason: str              # the human line: "after NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)"
    details: Dict[str, Any] = field(default_factory=dict, compare=False)


def _fmt_lr(lr) -> str:
    return f"{lr:g}" if isinstance(lr, (int, float)) else str(lr)


def _nan_info(attempt_dir: Path, outcome: Dict[str, Any]) -> Dict[str, Any]:
    """The NaN record: outcome["nan"], else the guard's nan.json, else what the logs show."""
    rec = outcome.get("nan") if isinstance(outcome.get("nan"), dict) else None
    if rec is None:
        nan = AttemptDir(attempt_dir).nan  # the guard's record
        rec = nan.to_json() if nan is not None else None
    if rec is None:
        hit = logs.find_nonfinite(attempt_dir)
        if hit:
            rec = {"iter": hit["iter"], "epoch": hit["epoch"], "loss_key": hit["key"],
                   "nonfinite": {hit["key"]: hit["value"]}, "lr": hit.get("lr"),
                   "last_finite_iter": hit.get("after_iter"), "source": hit["source"]}
    return rec or {}


def nan_phrase(rec: Dict[str, Any], lr=None, effective: Optional[EffectiveLr] = None) -> str:
    """``NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)`` (:meth:`NanRecord.describe`); with the
    attempt's :class:`~ssflctl.workdir.records.EffectiveLr` when the optimizer trained at another base
    lr: ``(lr 0.01→0.00125 by auto_scale_lr)``."""
    if rec.get("key") and not rec.get("loss_key"):
        rec = dict(rec, loss_key=rec["key"])
    return (NanRecord.from_json(rec) or NanRecord()).describe(lr, effective)


def _effective(attempt_dir: Path, outcome: Dict[str, Any]) -> Optional[EffectiveLr]:
    """The base lr the attempt trained at: the outcome's ``effective_lr``, else the attempt's files'."""
    got = EffectiveLr.from_json((outcome or {}).get("effective_lr"))
    return got if got is not None else AttemptDir(attempt_dir).effective_lr


def _lr_facts(lr: float, new_lr: float, eff: Optional[EffectiveLr], lowered: bool) -> Dict[str, Any]:
    """Decision.details["lr"]: which lr the retry changes (``lowered``: ``"config"``, the config's
    ``optim_wrapper.optimizer.lr`` that attempt.json records, or None when it is kept) and what the
    optimizer makes of it (``effective``, ``scale``: mmengine's auto_scale_lr factor, applied to the
    new config lr too: ``new_effective``). Empty without a measured :class:`EffectiveLr`."""
    if eff is None or eff.effective is None:
        return {}
    factor = eff.scale if eff.scale is not None else (eff.effective / lr if lr else 1.0)
    return {"lowered": "config" if lowered else None, "config": lr, "new_config": new_lr,
            "effective": eff.effective, "scale": eff.scale, "new_effective": float(f"{new_lr * factor:.12g}")}


def first_nan_iter(rec: Dict[str, Any]) -> Optional[int]:
    """The earliest iteration the first NaN can have happened at (:meth:`NanRecord.first_iter`)."""
    return (NanRecord.from_json(rec) or NanRecord()).first_iter()


def fp16_overflow(rec: Dict[str, Any]) -> bool:
    """True when the guard's record is a pure float16 overflow: the run trains under fp16 AMP
    (nan.json ``amp.dtype``) and every non-finite loss term is ±inf, none NaN. (An overflow of the
    *gradients* is the GradScaler's job: it skips the step and the loss stays finite, so the guard
    never sees it.)"""
    amp = rec.get("amp") if isinstance(rec.get("amp"), dict) else {}
    bad = [str(v) for v in (rec.get("nonfinite") or {}).values()]
    return amp.get("dtype") == "float16" and bool(bad) and all(v in ("inf", "-inf") for v in bad)


def clean_checkpoint(attempt_dir, nan_iter: Optional[int]) -> Optional[str]:
    """The last checkpoint saved before the NaN (:meth:`AttemptDir.last_clean_checkpoint`)."""
    return AttemptDir(attempt_dir).last_clean_checkpoint(nan_iter)


def decide(policy: RetryPolicy, attempt_dir, attempt: int, lr: float,
           outcome: Dict[str, Any]) -> Decision:
    """What to do after attempt ``attempt`` (run at ``lr``) ended with ``outcome``.

    ``outcome`` is outcome.json's body (``{"outcome": "done"|"nan"|"failed"|"preempted"|
    "timeout"|"node_fail", "reason", "nan": {...}|None, ...}``).

    * done → stop.
    * nan → retry at ``lr × factor`` (``on_nan: lower_lr``) or the same lr (``retry``) while
      attempts are left, from scratch or from :func:`clean_checkpoint`; else stop. ``lr`` and the
      new lr are config lrs (attempt.json); when the attempt's ``effective_lr`` (outcome.json or
      progress.json) shows mmengine's auto_scale_lr trained it at another base lr, the reason names
      both (``(lr 0.01→0.00125 by auto_scale_lr)``) and says the config lr is the one lowered, and
      ``details["lr"]`` has the numbers (:func:`_lr_facts`).
    * preempted / timeout → resume the same attempt at the same lr from its latest checkpoint.
    * node_fail → resume (resubmit) at the same lr from the latest checkpoint.
    * failed (exception, OOM) → stop with its reason (no lr change); ``on_error: retry`` retries
      at the same lr while attempts are left. A failed attempt whose logs show a non-finite loss
      before the exception is treated as a NaN, unless the exception is CUDA's out of memory.
    """
    if isinstance(policy, dict) or policy is None:
        policy = RetryPolicy.from_dict(policy)
    attempt_dir = Path(attempt_dir)
    kind = (outcome or {}).get("outcome") or "failed"
    left = attempt < policy.max_attempts
    spent = f"{attempt}/{policy.max_attempts} attempts spent"

    if kind == "done":
        return Decision("stop", lr, None, "finished")

    if kind == "failed" and not _cuda_oom(outcome) and logs.find_nonfinite(attempt_dir) is not None:
        # the code raised, but the loss had already gone non-finite (e.g. an assertion on NaN
        # boxes in an unguarded run): the NaN is the cause, the retry policy for NaN applies
        kind = "nan"
        outcome = dict(outcome or {}, nan=None)

    if kind == "nan":
        rec = _nan_info(attempt_dir, outcome)
        eff = _effective(attempt_dir, outcome)
        phrase = nan_phrase(rec, lr, eff)
        if policy.on_nan == "fail":
            return Decision("stop", lr, None, f"{phrase}; on_nan is fail", {"nan": rec})
        if fp16_overflow(rec):
            # an inf (not a NaN) under fp16 AMP: float16's range (65504) was exceeded in the forward
            # pass; a lower lr does not widen the range, so it is not retried at one
            return Decision("stop", lr, None, f"{phrase}: a float16 overflow under amp: fp16 (the loss reached "
                            "float16's range, 65504); not retried at a lower lr — set amp: bf16 (float32's "
                            "range) or amp: null (fp32) and submit again", {"nan": rec, "fp16_overflow": True})
        if not left:
            return Decision("stop", lr, None, f"{phrase}; {spent}", {"nan": rec})
        # rounded to 12 significant digits: 0.01 × 0.1 is 0.001, not 0.0010000000000000002
        new_lr = float(f"{lr * policy.factor:.12g}") if policy.on_nan == "lower_lr" else lr
        resume_from = None
        note = ""
        if policy.from_ == "checkpoint":
            resume_from = clean_checkpoint(attempt_dir, first_nan_iter(rec))
            note = "" if resume_from else "; no checkpoint saved before the NaN, from scratch"
        lowered = policy.on_nan == "lower_lr"
        facts = _lr_facts(lr, new_lr, eff, lowered)
        if lowered and eff is not None and eff.scale is not None and lr_differs(lr, eff.effective):
            # the new lr is a config lr, which mmengine scales again at the next Runner.train
            note += f"; the config lr is lowered (auto_scale_lr ×{eff.scale:g} applies to it again)"
        return Decision("retry", new_lr, resume_from, f"after {phrase}{note}",
                        {"nan": rec, "from": "checkpoint" if resume_from else "scratch",
                         **({"lr": facts} if facts else {})})

    if kind in ("preempted", "timeout", "requeued"):
        what = {"preempted": "preemption", "timeout": "time limit", "requeued": "requeue"}[kind]
        if policy.on_preempt == "fail":
            return Decision("stop", lr, None, f"{what}; on_preempt is fail")
        where = _where(attempt_dir)
        if policy.on_preempt == "restart":
            return Decision("resume", lr, None, f"after {what}{where}, restarted")
        ck = checkpoints.latest_checkpoint(attempt_dir)
        return Decision("resume", lr, ck, f"after {what}{where}"
                        + (f", resumed from {Path(ck).name}" if ck else ", no checkpoint yet"))

    if kind in ("node_fail", "node_failed", "node_failure"):
        if policy.on_node_fail == "fail":
            return Decision("stop", lr, None, "node failure; on_node_fail is fail")
        ck = checkpoints.latest_checkpoint(attempt_dir)
        return Decision("resume", lr, ck, f"after node failure{_where(attempt_dir)}"
                        + (f", resumed from {Path(ck).name}" if ck else ""))

    # failed (Python exception, out of memory) or anything unknown
    why = (outcome or {}).get("reason") or kind
    if policy.on_error == "retry" and left:
        return Decision("retry", lr, None, f"after error: {why}")
    return Decision("stop", lr, None, f"failed: {why}")


def _cuda_oom(outcome: Optional[Dict[str, Any]]) -> bool:
    """CUDA out of memory (torch.cuda.OutOfMemoryError): a failure to explain, never a NaN to retry."""
    return is_cuda_oom((outcome or {}).get("reason"), (outcome or {}).get("log_tail"))


def _where(attempt_dir: Path) -> str:
    p = logs.last_progress(attempt_dir)
    if not p:
        return ""
    parts = []
    if p.get("epoch") is not None:
        parts.append(f"epoch {p['epoch']}")
    if p.get("iter") is not None:
        parts.append(f"iter {p['iter']}")
    return (" at " + " ".join(parts)) if parts else ""


# the lr after a resume: ssflctl.node.lr_resume (one place, with its hook)
from ssflctl.node.lr_resume import apply_lr_after_resume, lr_multipliers  # noqa: E402,F401
