"""Retry policy: what to do after an attempt ended (NaN, preemption, node failure, error).

Light module (no torch/mmengine at import); :func:`apply_lr_after_resume` touches a live runner.

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
  silently ignored: :func:`apply_lr_after_resume` (or ``LrOverrideHook`` in ``ssflctl.node.guard``)
  rewrites the param groups' lr and the schedulers' base values after the resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssflctl import atomic
from ssflctl.workdir import mmlogs as logs
from ssflctl.workdir import retry_policy as _policy

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
        rec = atomic.read_json(attempt_dir / "nan.json")  # the guard's record
    if rec is None:
        hit = logs.find_nonfinite(attempt_dir)
        if hit:
            rec = {"iter": hit["iter"], "epoch": hit["epoch"], "loss_key": hit["key"],
                   "nonfinite": {hit["key"]: hit["value"]}, "lr": hit.get("lr"),
                   "last_finite_iter": hit.get("after_iter"), "source": hit["source"]}
    return rec or {}


def nan_phrase(rec: Dict[str, Any], lr=None) -> str:
    """``NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)``."""
    key = rec.get("loss_key") or rec.get("key") or "loss"
    kind = {"nan": "NaN", "inf": "Inf", "-inf": "-Inf"}.get(
        (rec.get("nonfinite") or {}).get(key, rec.get("value", "nan")), "NaN")
    text = f"{kind} in {key}"
    where = []
    if rec.get("epoch") is not None:
        where.append(f"epoch {rec['epoch']}")
    if rec.get("iter") is not None:
        where.append(f"iter {rec['iter']}")
    if where:
        text += " at " + " ".join(where)
    lr_used = lr if lr is not None else rec.get("lr")
    if lr_used is not None:
        text += f" (lr {_fmt_lr(lr_used)})"
    return text


def first_nan_iter(rec: Dict[str, Any]) -> Optional[int]:
    """The earliest iteration the first NaN can have happened at (1-based).

    Exact for the guard's record; for a NaN found in a log (window means every ``interval``
    iterations) it is the iteration after the last finite logging point.
    """
    if rec.get("source") in ("scalars", "text_log") and rec.get("last_finite_iter") is not None:
        return int(rec["last_finite_iter"]) + 1
    if rec.get("source") in ("scalars", "text_log"):
        return 1
    it = rec.get("iter")
    return int(it) if it is not None else None


def clean_checkpoint(attempt_dir, nan_iter: Optional[int]) -> Optional[str]:
    """The last checkpoint of ``attempt_dir`` whose weights are known good, or None.

    ``nan_iter`` is the 1-based iteration whose loss was first non-finite (nan.json "iter").
    The loss of iteration ``k`` is computed from the weights after ``k - 1`` updates, so the
    checkpoint saved at the end of iteration ``nan_iter - 1`` holds finite weights that already
    give the NaN (and a resume replays the same batch, whatever the lr). A clean checkpoint is
    one saved after at most ``nan_iter - 2`` iterations. The iteration is read from each
    checkpoint's own ``meta`` — never from ``last_checkpoint``, which goes on pointing at
    checkpoints written after the NaN.
    """
    if nan_iter is None:
        return None
    limit = int(nan_iter) - 2
    best = None
    for c in logs.list_checkpoints(attempt_dir):
        if c["iter"] is not None and c["iter"] <= limit:
            best = c
    if best is None:
        # an attempt that itself resumed another attempt's (clean) checkpoint and went NaN before
        # saving one of its own: that starting checkpoint is still the last clean one
        start = (atomic.read_json(Path(attempt_dir) / "attempt.json") or {}).get("resume_from")
        if start and Path(start).is_file():
            meta = logs.read_checkpoint_meta(start) or {}
            if meta.get("iter") is not None and int(meta["iter"]) <= limit:
                return str(start)
    return best["path"] if best else None


def decide(policy: RetryPolicy, attempt_dir, attempt: int, lr: float,
           outcome: Dict[str, Any]) -> Decision:
    """What to do after attempt ``attempt`` (run at ``lr``) ended with ``outcome``.

    ``outcome`` is outcome.json's body (``{"outcome": "done"|"nan"|"failed"|"preempted"|
    "timeout"|"node_fail", "reason", "nan": {...}|None, ...}``).

    * done → stop.
    * nan → retry at ``lr × factor`` (``on_nan: lower_lr``) or the same lr (``retry``) while
      attempts are left, from scratch or from :func:`clean_checkpoint`; else stop.
    * preempted / timeout → resume the same attempt at the same lr from its latest checkpoint.
    * node_fail → resume (resubmit) at the same lr from the latest checkpoint.
    * failed (exception, OOM) → stop with its reason (no lr change); ``on_error: retry`` retries
      at the same lr while attempts are left. A failed attempt whose logs show a non-finite loss
      before the exception is treated as a NaN.
    """
    if isinstance(policy, dict) or policy is None:
        policy = RetryPolicy.from_dict(policy)
    attempt_dir = Path(attempt_dir)
    kind = (outcome or {}).get("outcome") or "failed"
    left = attempt < policy.max_attempts
    spent = f"{attempt}/{policy.max_attempts} attempts spent"

    if kind == "done":
        return Decision("stop", lr, None, "finished")

    if kind == "failed" and logs.find_nonfinite(attempt_dir) is not None:
        # the code raised, but the loss had already gone non-finite (e.g. an assertion on NaN
        # boxes in an unguarded run): the NaN is the cause, the retry policy for NaN applies
        kind = "nan"
        outcome = dict(outcome or {}, nan=None)

    if kind == "nan":
        rec = _nan_info(attempt_dir, outcome)
        phrase = nan_phrase(rec, lr)
        if policy.on_nan == "fail":
            return Decision("stop", lr, None, f"{phrase}; on_nan is fail", {"nan": rec})
        if not left:
            return Decision("stop", lr, None, f"{phrase}; {spent}", {"nan": rec})
        # rounded to 12 significant digits: 0.01 × 0.1 is 0.001, not 0.0010000000000000002
        new_lr = float(f"{lr * policy.factor:.12g}") if policy.on_nan == "lower_lr" else lr
        resume_from = None
        note = ""
        if policy.from_ == "checkpoint":
            resume_from = clean_checkpoint(attempt_dir, first_nan_iter(rec))
            note = "" if resume_from else "; no checkpoint saved before the NaN, from scratch"
        return Decision("retry", new_lr, resume_from, f"after {phrase}{note}",
                        {"nan": rec, "from": "checkpoint" if resume_from else "scratch"})

    if kind in ("preempted", "timeout", "requeued"):
        what = {"preempted": "preemption", "timeout": "time limit", "requeued": "requeue"}[kind]
        if policy.on_preempt == "fail":
            return Decision("stop", lr, None, f"{what}; on_preempt is fail")
        where = _where(attempt_dir)
        if policy.on_preempt == "restart":
            return Decision("resume", lr, None, f"after {what}{where}, restarted")
        ck = logs.latest_checkpoint(attempt_dir)
        return Decision("resume", lr, ck, f"after {what}{where}"
                        + (f", resumed from {Path(ck).name}" if ck else ", no checkpoint yet"))

    if kind in ("node_fail", "node_failed", "node_failure"):
        if policy.on_node_fail == "fail":
            return Decision("stop", lr, None, "node failure; on_node_fail is fail")
        ck = logs.latest_checkpoint(attempt_dir)
        return Decision("resume", lr, ck, f"after node failure{_where(attempt_dir)}"
                        + (f", resumed from {Path(ck).name}" if ck else ""))

    # failed (Python exception, out of memory) or anything unknown
    why = (outcome or {}).get("reason") or kind
    if policy.on_error == "retry" and left:
        return Decision("retry", lr, None, f"after error: {why}")
    return Decision("stop", lr, None, f"failed: {why}")


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


# ---------------------------------------------------------------------------------------------
# making a new lr take effect after mmengine's resume
# ---------------------------------------------------------------------------------------------
def _optimizers(runner) -> List[Any]:
    ow = runner.optim_wrapper
    wrappers = list(ow.optim_wrappers.values()) if hasattr(ow, "optim_wrappers") else [ow]
    return [w.optimizer for w in wrappers]


def _schedulers(runner) -> List[Any]:
    ps = getattr(runner, "param_schedulers", None)
    if not ps:
        return []
    if isinstance(ps, dict):
        return [s for v in ps.values() for s in v]
    return list(ps)


def lr_multipliers(runner) -> List[float]:
    """Each param group's base lr relative to the optimizer's configured lr (``defaults``).

    Taken on a freshly built optimizer (before a resume overwrites the groups) this is the
    exact ``paramwise_cfg`` multiplier of every group.
    """
    out = []
    for opt in _optimizers(runner):
        base = float(opt.defaults.get("lr") or 0) or None
        for g in opt.param_groups:
            g_base = float(g.get("initial_lr", g["lr"]))
            out.append(g_base / base if base else 1.0)
    return out


def apply_lr_after_resume(runner, lr: float, multipliers: Optional[List[float]] = None) -> List[float]:
    """Make ``lr`` the base lr of a resumed run; returns the param groups' new current lrs.

    mmengine's resume loads the optimizer's param groups (``lr``, ``initial_lr``) and every
    scheduler's ``base_values``/``_last_value`` from the checkpoint. This rescales each group to
    ``lr × multiplier`` while keeping the schedule's progress (the ratio of the group's current
    lr to its base, e.g. 0.1 after a step decay or the warmup factor), and rewrites the lr
    schedulers' ``base_values`` and ``_last_value`` to match, so the next scheduler step and the
    log both use the new lr.

    ``multipliers`` (per group, see :func:`lr_multipliers`) default to each group's base relative
    to the first group's base.
    """
    lr = float(lr)
    groups = [g for opt in _optimizers(runner) for g in opt.param_groups]
    if not groups:
        return []
    old_bases = [float(g.get("initial_lr", g["lr"])) for g in groups]
    if multipliers is None or len(multipliers) != len(groups):
        ref = old_bases[0] or 1.0
        multipliers = [b / ref for b in old_bases]
    new_lrs = []
    for g, old_base, m in zip(groups, old_bases, multipliers):
        progress = (float(g["lr"]) / old_base) if old_base else 1.0
        new_base = lr * m
        g["initial_lr"] = new_base
        g["lr"] = new_base * progress
        new_lrs.append(g["lr"])
    by_id = {id(g): (float(g["initial_lr"]), float(g["lr"])) for g in groups}
    for s in _schedulers(runner):
        if getattr(s, "param_name", "lr") != "lr":
            continue
        opt = getattr(s, "optimizer", None)
        sg = getattr(opt, "param_groups", None)
        if not sg:
            continue
        if hasattr(s, "base_values"):
            s.base_values = [by_id.get(id(g), (float(g["lr"]),))[0] for g in sg]
        if hasattr(s, "_last_value"):
            s._last_value = [float(g["lr"]) for g in sg]
        if hasattr(s, "base_lrs"):
            s.base_lrs = [by_id.get(id(g), (float(g["lr"]),))[0] for g in sg]
    logger = getattr(runner, "logger", None)
    if logger is not None:
        logger.info(f"ssflctl: lr set to {lr:g} after resume (param group lrs now "
                    f"{', '.join(f'{x:g}' for x in sorted(set(new_lrs)))})")
    return new_lrs
