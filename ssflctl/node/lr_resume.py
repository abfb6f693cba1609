"""The lr a resumed attempt trains at: one place for the logic and its mmengine hook.

mmengine 0.10.7's ``Runner.resume`` (``mmengine/runner/runner.py``, ``load_or_resume`` →
``resume``) restores the optimizer's param groups and every scheduler's ``base_values`` from the
checkpoint, so an attempt that resumes another attempt's checkpoint at a lower lr (a NaN retry from
the last clean checkpoint) would silently train at the old lr. :class:`LrOverrideHook` records each
param group's multiplier before the resume (``before_run``: the optimizer is built from the new
config) and rewrites the lrs after it (``before_train``), keeping the schedule's progress. Without a
resume it changes nothing when the lr equals the config's.

How ``lr`` travels (YAML → optimizer; and on a NaN retry):
``spec`` (params.lr or the lr axis) → run.json ``params.lr`` → ``render.render_attempt`` (``lr``
override) → config.py ``optim_wrapper.optimizer.lr`` and attempt.json ``lr`` → mmengine builds the
optimizer. On a NaN: ``retry.decide`` (lr × factor) → ``render.render_attempt`` → config.py (+ this
hook with that lr when resuming a checkpoint) → mmengine → :class:`LrOverrideHook`.

The lr in attempt.json and config.py is the config's. With ``auto_scale_lr.enable`` mmengine 0.10.7's
``Runner.train`` multiplies every param group's lr by (world size × ``train_dataloader.batch_size``)
/ ``auto_scale_lr.base_batch_size`` (``Runner.scale_lr``) before the schedulers store their base
values, so the run trains at another base lr. :func:`effective_lr` measures it on the runner (the
job's progress hook records it in progress.json and outcome.json); a NaN retry lowers the config's
lr, which mmengine scales again. :class:`LrOverrideHook`'s multipliers are taken on the built,
already scaled optimizer, so after a resume it keeps the scale factor too.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

from ssflctl.workdir.records import EffectiveLr

try:
    from mmengine.hooks import Hook as _HookBase
    from mmengine.registry import HOOKS as _HOOKS
except ImportError:  # pragma: no cover - light environments (the login node) never run the hook
    _HookBase, _HOOKS = object, None


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


def auto_scale_factor(runner) -> Optional[Tuple[float, int, int]]:
    """``(factor, real total batch, base batch)`` of mmengine's linear lr scaling for ``runner``, or
    None when ``auto_scale_lr`` is off (absent, or ``enable`` false).

    The rule of mmengine 0.10.7's ``Runner.scale_lr`` (``mmengine/runner/runner.py``), recomputed:
    the per-process batch is ``runner._train_dataloader``'s ``batch_size`` (the config dict, or a
    built ``DataLoader``), the real batch ``runner.world_size`` × that, and the factor
    ``float(real) / float(auto_scale_lr['base_batch_size'])``. Raises ``KeyError`` when auto_scale_lr
    is on without ``base_batch_size`` (mmengine asserts the same before training)."""
    asl = getattr(runner, "auto_scale_lr", None)
    if asl is None or not asl.get("enable", False):
        return None
    real = _total_batch(runner)
    base = int(asl["base_batch_size"])
    return float(real) / float(base), real, base


def _total_batch(runner) -> int:
    """World size × the per-process ``batch_size`` of the train dataloader, as ``Runner.scale_lr``
    reads it (mmengine 0.10.7: ``runner._train_dataloader``, a config dict or a ``DataLoader``)."""
    loader = getattr(runner, "_train_dataloader", None)
    if isinstance(loader, dict):
        per = loader["batch_size"]
    else:
        per = getattr(loader, "batch_size", None)
        if per is None:
            per = runner.train_dataloader.batch_size
    return int(runner.world_size) * int(per)


def effective_lr(runner) -> EffectiveLr:
    """The base lr ``runner``'s (first) optimizer trains with: an
    :class:`~ssflctl.workdir.records.EffectiveLr`, all lrs in the optimizer's units.

    Call it once the optimizer is built and scaled and any resume is done (a hook's
    ``before_train``, after :class:`LrOverrideHook`). ``config`` is ``optimizer.defaults['lr']``,
    which mmengine's ``scale_lr`` leaves as the config gave it; each param group's base lr is its
    ``initial_lr`` (set by the first param scheduler, before the schedule's warmup moves ``lr``),
    else its ``lr``. ``effective`` is ``config`` × the auto_scale_lr factor (:func:`auto_scale_factor`;
    1 when off) when some group carries exactly that base lr (every group without a
    ``paramwise_cfg`` multiplier does), else the first group's base lr (a resume restored another lr,
    or every group has a multiplier). Raises ``AttributeError``/``KeyError`` on a runner without a
    built optimizer."""
    opt = _optimizers(runner)[0]
    config = opt.defaults.get("lr")
    config = None if config is None else float(config)
    bases = [float(g.get("initial_lr", g["lr"])) for g in opt.param_groups]
    scaled = auto_scale_factor(runner)
    factor = scaled[0] if scaled is not None else 1.0
    expected = None if config is None else config * factor
    if expected is not None and any(math.isclose(b, expected, rel_tol=1e-9) for b in bases):
        eff = expected
    else:
        eff = bases[0] if bases else expected
    if scaled is not None:
        batch, base = scaled[1], scaled[2]
    else:  # auto_scale_lr off: the batch and the config's base still say whether the lr fits
        try:
            batch = _total_batch(runner)
        except (AttributeError, KeyError, TypeError, ValueError):
            batch = None
        asl = getattr(runner, "auto_scale_lr", None)
        base = asl.get("base_batch_size") if isinstance(asl, dict) else None
    return EffectiveLr(config=config, effective=eff, scale=scaled[0] if scaled else None, batch=batch,
                       base_batch=None if base is None else int(base),
                       world_size=int(getattr(runner, "world_size", 1) or 1))


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


class LrOverrideHook(_HookBase):  # type: ignore[misc,valid-type]
    """Make the config's lr (or ``lr``) win over the one a ``resume`` restores.

    ``before_run`` (the optimizer is built from the new config, nothing resumed yet) records each
    param group's multiplier; ``before_train`` (after ``load_or_resume``, before the first
    iteration and its lr log) calls :func:`apply_lr_after_resume`. Without a
    resume it changes nothing when ``lr`` is None or equals the config's lr.

        custom_hooks = [dict(type='LrOverrideHook', lr=0.001)]
    """

    priority = "VERY_HIGH"

    def __init__(self, lr: Optional[float] = None):
        self.lr = None if lr is None else float(lr)
        self._mult = None
        self.applied: Optional[list] = None

    def before_run(self, runner) -> None:
        try:
            self._mult = lr_multipliers(runner)
        except Exception:
            self._mult = None

    def before_train(self, runner) -> None:
        lr = self.lr
        if lr is None:
            try:
                lr = float(runner.cfg.optim_wrapper.optimizer.lr)
            except Exception:
                return
        self.applied = apply_lr_after_resume(runner, lr, self._mult)


if _HOOKS is not None:  # pragma: no branch
    _HOOKS.register_module(name="LrOverrideHook", module=LrOverrideHook, force=True)
