"""Check a rendered config against mmdet's and mmengine's registries, without data or a model.

What the node would build from the config is looked up, not built: every ``type`` under ``model``
resolves in ``MODELS``/``TASK_UTILS`` (``init_cfg`` in ``WEIGHT_INITIALIZERS``), datasets in
``DATASETS``, pipelines in ``TRANSFORMS``, ``optim_wrapper`` in ``OPTIM_WRAPPERS`` and its
``optimizer`` in ``OPTIMIZERS``, schedulers, evaluators, hooks, loops and the visualizer in theirs.
A class whose constructor takes a closed set of keyword arguments (no ``**kwargs``) also has its
keys checked against that set, so ``model.bbox_hed`` (RetinaNet takes ``bbox_head``) or a Focal
Loss left with SSFL's ``shift`` after a merge fail here, on the login node, with the key, instead
of in every job. A constructor with ``**kwargs`` that only hands them on to its parent's
``__init__`` is followed up the MRO (``model.bbox_head.anchor_generatr``: RetinaHead passes its
``**kwargs`` to AnchorHead, which takes no such key); one that uses them in any other way, or that
cannot be read for sure, leaves the set open and is not second-guessed.

:func:`problems` returns ``(dotted config path, what)`` pairs; :func:`check` raises
:class:`ConfigProblem` for the first one.
"""
from __future__ import annotations

import ast
import builtins
import difflib
import functools
import inspect
import textwrap
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
    """The keyword arguments a class's constructor accepts, or None when the set is open (or unknown).

    A constructor without ``**kwargs`` closes the set with its named parameters. One with ``**kwargs``
    that only hands them on to the next ``__init__`` (``super().__init__(..., **kwargs)``,
    ``super(Cls, self).__init__(...)`` or ``Base.__init__(self, ..., **kwargs)``) adds its named
    parameters and the walk goes on up the MRO, to the first ``__init__`` without ``**kwargs``
    (RetinaHead -> AnchorHead closes it, BaseModule adds ``init_cfg``). Whatever cannot be read for
    sure keeps the set open (None): an ``__init__`` that uses its ``**kwargs`` in any other way (reads,
    pops, updates or passes them elsewhere; ``kw.get(k)``, ``kw[k]`` and ``k in kw`` only peek and
    are fine), returns before handing them on, a decorated one, one without readable source, and a walk
    that reaches ``object`` (or torch's ``nn.Module.__init__``, which does its own check).
    """
    if not inspect.isclass(obj):
        return None
    mro = obj.__mro__
    names: set = set()
    start, seen = 0, set()
    while True:
        i = next((j for j in range(start, len(mro)) if "__init__" in mro[j].__dict__), None)
        if i is None or i in seen:
            return None
        seen.add(i)
        init = mro[i].__dict__["__init__"]
        if init is object.__init__:
            return None
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            return None
        params = list(sig.parameters.values())
        if not params:
            return None
        var_kw = next((p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        names.update(p.name for p in params[1:]
                     if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
        if var_kw is None:
            return frozenset(names)
        if type(obj).__call__ is not type.__call__:
            return None  # a metaclass that may take or rename keys before __init__ sees them
        nxt = _passed_on_to(mro, i, init, params[0].name, var_kw.name)
        if nxt is None:
            return None
        start = nxt


def _passed_on_to(mro, i: int, init, self_name: str, kw_name: str) -> Optional[int]:
    """Where in ``mro`` the search for the next ``__init__`` goes on when ``mro[i].__init__`` only hands
    its ``**kw_name`` to a parent's ``__init__``; None when that is not certain."""
    if not inspect.isfunction(init) or getattr(init, "__wrapped__", None) is not None:
        return None  # a decorator may rename or consume keys (mmcv's deprecated_api_warning)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name != "__init__":
        return None
    calls = [c for c in ast.walk(fn) if isinstance(c, ast.Call)
             and any(k.arg is None and isinstance(k.value, ast.Name) and k.value.id == kw_name for k in c.keywords)]
    if len(calls) != 1:
        return None  # handed to nothing, or to something else as well
    call = calls[0]
    if any(isinstance(n, ast.Return) and n.lineno < call.lineno for n in ast.walk(fn)):
        return None  # a way out before the keys are handed on
    passed = next(k.value for k in call.keywords if k.arg is None and isinstance(k.value, ast.Name)
                  and k.value.id == kw_name)
    parent = {id(child): node for node in ast.walk(fn) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(fn):  # besides the hand-on, only peeks that leave every key in place
        if (isinstance(node, ast.Name) and node.id == kw_name and node is not passed
                and not _is_peek(node, parent.get(id(node)), parent)):
            return None  # popped, changed, assigned, or handed to something else
    f = call.func
    if not (isinstance(f, ast.Attribute) and f.attr == "__init__"):
        return None
    target = f.value
    if isinstance(target, ast.Call) and isinstance(target.func, ast.Name) and target.func.id == "super":
        if not target.args and not target.keywords:  # the class the function was defined in
            cell = dict(zip(init.__code__.co_freevars, init.__closure__ or ()))
            after = cell["__class__"].cell_contents if "__class__" in cell else None
        elif (len(target.args) == 2 and not target.keywords and isinstance(target.args[1], ast.Name)
              and target.args[1].id == self_name):
            after = _resolve(target.args[0], init)
        else:
            return None
        if after not in mro:
            return None
        return mro.index(after) + 1
    # Base.__init__(self, ..., **kwargs): the first __init__ in Base's MRO, where it is in ours
    if not (call.args and isinstance(call.args[0], ast.Name) and call.args[0].id == self_name):
        return None
    base = _resolve(target, init)
    if not inspect.isclass(base) or base not in mro:
        return None
    owner = next((k for k in base.__mro__ if "__init__" in k.__dict__), None)
    return mro.index(owner) if owner in mro else None


def _is_peek(name: ast.Name, up, parent) -> bool:
    """Whether this use of the kwargs dict only reads it: ``kw.get(k)``, ``kw[k]``, ``k in kw``."""
    if isinstance(up, ast.Attribute) and up.attr == "get":
        return isinstance(parent.get(id(up)), ast.Call) and parent[id(up)].func is up
    if isinstance(up, ast.Subscript):
        return up.value is name and isinstance(up.ctx, ast.Load)
    if isinstance(up, ast.Compare):
        return all(isinstance(op, (ast.In, ast.NotIn)) for op in up.ops) and name is not up.left
    return False


def _resolve(node, func) -> Any:
    """The object a ``Name`` or dotted ``Attribute`` in ``func``'s source names, from its globals; None if unknown."""
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, func)
        return getattr(base, node.attr, None) if base is not None else None
    if isinstance(node, ast.Name):
        glob = getattr(func, "__globals__", {})
        if node.id in glob:
            return glob[node.id]
        return getattr(builtins, node.id, None)
    return None


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
