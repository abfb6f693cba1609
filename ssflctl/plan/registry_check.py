"""Check a rendered config against mmdet's and mmengine's registries, without data or a model.

What the node would build from the config is looked up, not built: every ``type`` under ``model``
resolves in ``MODELS``/``TASK_UTILS`` (``init_cfg`` in ``WEIGHT_INITIALIZERS``), datasets in
``DATASETS``, pipelines in ``TRANSFORMS``, ``optim_wrapper`` in ``OPTIM_WRAPPERS`` and its
``optimizer`` in ``OPTIMIZERS``, schedulers, evaluators, hooks, loops and the visualizer in theirs.
A class whose constructor takes a closed set of keyword arguments (no ``**kwargs``) also has its
keys checked against that set, so ``model.bbox_hed`` (RetinaNet takes ``bbox_head``) or a Focal
Loss left with SSFL's ``shift`` after a merge fail here, on the login node, with the key, instead
of in every job. A class with ``**kwargs`` is not second-guessed.

:func:`problems` returns ``(dotted config path, what)`` pairs; :func:`check` raises
:class:`ConfigProblem` for the first one.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Dict, List, Optional, Tuple

from ssflctl.errors import UserError


class ConfigProblem(UserError):
    """The rendered config names something the node could not build; ``path`` is the dotted key."""

    def __init__(self, path: str, what: str):
        super().__init__(f"{path}: {what}")
        self.path = path
        self.what = what


#: registry family of a section: top-level key -> registry names tried in order
_TOP = {
    "model": ("MODELS", "TASK_UTILS"),
    "optim_wrapper": ("OPTIM_WRAPPERS",),
    "param_scheduler": ("PARAM_SCHEDULERS",),
    "val_evaluator": ("METRICS", "EVALUATOR"),
    "test_evaluator": ("METRICS", "EVALUATOR"),
    "default_hooks": ("HOOKS",),
    "custom_hooks": ("HOOKS",),
    "train_cfg": ("LOOPS",),
    "val_cfg": ("LOOPS",),
    "test_cfg": ("LOOPS",),
    "visualizer": ("VISUALIZERS",),
    "log_processor": ("LOG_PROCESSORS",),
    "train_dataloader": ("DATA_SAMPLERS",),
    "val_dataloader": ("DATA_SAMPLERS",),
    "test_dataloader": ("DATA_SAMPLERS",),
}
#: a child key that switches the registry family, wherever it appears
_CHILD = {
    "dataset": ("DATASETS",), "datasets": ("DATASETS",),
    "pipeline": ("TRANSFORMS",), "transforms": ("TRANSFORMS",),
    "sampler": ("DATA_SAMPLERS", "TASK_UTILS"), "batch_sampler": ("DATA_SAMPLERS",),
    "collate_fn": ("FUNCTIONS",),
    "optimizer": ("OPTIMIZERS",),
    "init_cfg": ("WEIGHT_INITIALIZERS",),
    "vis_backends": ("VISBACKENDS",),
}
#: subtrees built by name outside the registries (mmcv ops) or not built from the config as is
_SKIP = {"nms", "paramwise_cfg", "dist_cfg", "mp_cfg", "metainfo", "data_prefix", "filter_cfg"}
#: keys that builders pop before calling the constructor (not constructor arguments)
_POPPED = {
    "*": {"type", "_scope_"},
    "HOOKS": {"priority"},
    "PARAM_SCHEDULERS": {"convert_to_iter_based"},
    "OPTIM_WRAPPERS": {"constructor", "paramwise_cfg", "optimizer"},
}
#: keys whose constructor arguments are not checked (built by helper functions that pop/rename
#: keys: mmcv's build_norm_layer pops requires_grad, build_conv_layer/activation take layer args)
_NO_KWARGS_CHECK = {"norm_cfg", "act_cfg", "conv_cfg", "upsample_cfg", "dcn", "plugins", "init_cfg"}


_UNCHECKED = object()


@functools.lru_cache(maxsize=1)
def _registries() -> Dict[str, Any]:
    from mmdet import registry as mmdet_registry
    from mmdet.utils import register_all_modules

    from mmengine import registry as mmengine_registry

    register_all_modules(init_default_scope=False)
    regs = {name: getattr(mmengine_registry, name) for name in dir(mmengine_registry) if name.isupper()
            and isinstance(getattr(mmengine_registry, name), mmengine_registry.Registry)}
    regs.update({name: getattr(mmdet_registry, name) for name in dir(mmdet_registry) if name.isupper()})
    return regs


@functools.lru_cache(maxsize=4096)
def _lookup(type_name: str, families) -> Tuple[Optional[Any], Optional[str]]:
    regs = _registries()
    if not any(fam in regs for fam in families):
        return _UNCHECKED, None
    for fam in families:
        reg = regs.get(fam)
        if reg is None:
            continue
        try:
            obj = reg.get(type_name)
        except Exception:  # noqa: BLE001 - a scope prefix of a package that is not installed, etc.
            obj = None
        if obj is not None:
            return obj, fam
    return None, None


def _known_names(families) -> List[str]:
    regs = _registries()
    names: List[str] = []
    for fam in families:
        reg = regs.get(fam)
        while reg is not None:
            names += list(reg.module_dict)
            reg = reg.parent
    return names


@functools.lru_cache(maxsize=None)
def _closed_kwargs(obj) -> Optional[frozenset]:
    """The keyword arguments of a class's constructor, or None when it takes **kwargs (or is not a class)."""
    if not inspect.isclass(obj):
        return None
    init = next((k.__dict__["__init__"] for k in obj.__mro__ if "__init__" in k.__dict__), None)
    if init is None or init is object.__init__:
        return None
    try:
        sig = inspect.signature(init)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params[1:] if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def problems(cfg) -> List[Tuple[str, str]]:
    """Every ``(dotted path, what is wrong)`` of the config's registry lookups and constructor keys."""
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    from mmengine.utils import import_modules_from_strings

    ci = data.get("custom_imports") or {}
    if ci.get("imports"):
        import_modules_from_strings(**ci)
    out: List[Tuple[str, str]] = []
    for key, families in _TOP.items():
        if key in data:
            _walk(data[key], key, families, key, out)
    return out


def check(cfg) -> None:
    found = problems(cfg)
    if found:
        raise ConfigProblem(*found[0])


def _walk(node: Any, path: str, families, key: str, out: List[Tuple[str, str]]) -> None:
    if isinstance(node, (list, tuple)):
        for i, x in enumerate(node):
            _walk(x, f"{path}.{i}", families, key, out)
        return
    if not isinstance(node, dict):
        return
    t = node.get("type")
    if isinstance(t, str) and key not in _SKIP:
        obj, fam = _lookup(t, families)
        if obj is None:
            hint = difflib.get_close_matches(t.split(".")[-1], _known_names(families), n=1, cutoff=0.75)
            sugg = f"; did you mean '{hint[0]}'?" if hint else ""
            out.append((f"{path}.type", f"{t!r} is not registered in mmdet/mmengine's "
                                        f"{' or '.join(families)} (nothing of that name can be built){sugg}"))
        elif obj is not _UNCHECKED and key not in _NO_KWARGS_CHECK:
            allowed = _closed_kwargs(obj)
            if allowed is not None:
                popped = _POPPED["*"] | _POPPED.get(fam, set())
                for k in node:
                    if k not in allowed and k not in popped:
                        hint = difflib.get_close_matches(str(k), sorted(allowed), n=1, cutoff=0.6)
                        sugg = f"did you mean '{hint[0]}'?" if hint else f"it takes: {', '.join(sorted(allowed))}"
                        out.append((f"{path}.{k}", f"{getattr(obj, '__name__', t)} has no argument {k!r}; {sugg}"))
    for k, v in node.items():
        if k in _SKIP or not isinstance(v, (dict, list, tuple)):
            continue
        _walk(v, f"{path}.{k}", _CHILD.get(k, families), k, out)
