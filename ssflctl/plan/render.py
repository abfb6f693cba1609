"""Render a template + named params + dotted overrides into one attempt's mmengine config.

A template (``templates/*.py``) is an ordinary mmengine config that also declares its named
parameters and their defaults in a top-level ``ssflctl_params`` dict (and, optionally,
``ssflctl_bindings``: param name -> list of dotted config keys the value is written to).

Values never travel as source text: the template is parsed by ``mmengine.Config.fromfile``, the
values are set through the Config API, and the result is written with ``Config.dump``. A string
from a YAML file therefore stays a string in the dumped config, whatever characters it contains.

The params every template understands (only those the template declares are accepted):

=============  ===================================================================================
loss           ``focal`` | ``ssfl`` (ShiftStepFocalLoss, shift 0.1) | ``gfl`` (shift 0) | a dict
               (the full ``loss_cls`` config, with ``type``) -> ``model.bbox_head.loss_cls``
lr             ``optim_wrapper.optimizer.lr``
seed           ``randomness.seed``
max_epochs     ``train_cfg.max_epochs``; epoch-based schedulers (``end``/``milestones``/``T_max``)
               are rescaled proportionally from the template's own schedule
max_iters      ``train_cfg.max_iters`` (iteration-based templates)
batch_size     ``train_dataloader.batch_size`` (per GPU, as in mmdet)
workers        ``num_workers`` of every dataloader (``persistent_workers`` only when > 0)
data_root      every dataset's ``data_root`` and the evaluators' ``ann_file``
train_ann ...  ``train_ann``/``val_ann``/``test_ann`` (relative to data_root) and
               ``train_img``/``val_img``/``test_img`` (image prefix)
classes        dataset ``metainfo.classes`` and ``model.bbox_head.num_classes``; ``None`` reads
               the category names from the training annotation file at render time
load_from      ``load_from`` (a checkpoint to initialise from, e.g. a COCO model for Cityscapes)
val_interval   ``train_cfg.val_interval`` (``None``: validate only after the last epoch)
log_interval   ``default_hooks.logger.interval``
ckpt_interval  ``default_hooks.checkpoint.interval``
auto_scale_lr  ``auto_scale_lr.enable``
amp            ``fp16`` | ``bf16`` | ``None``: mixed precision (``AmpOptimWrapper`` with that dtype,
               dynamic loss scale; mmdet's FocalLoss -> ``FocalLossAMP``); see ssflctl/amp.py
=============  ===================================================================================
"""
from __future__ import annotations

import contextvars
import copy
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from ssflctl.atomic import load_json, write_text
from ssflctl.errors import UserError
from ssflctl.plan import overrides as overrides_mod
from ssflctl.plan.config_check import check_rendered, check_text  # noqa: F401  (check_rendered re-exported)
from ssflctl.plan.config_text import Unsupported, dump_text
from ssflctl.plan.losses import LOSSES  # noqa: F401  (re-exported: loss name -> loss_cls config)
from ssflctl.plan.templates import (  # noqa: F401  (ast-only; re-exported for callers of render)
    REPO_TEMPLATES, _literal_assign, list_templates, resolve_template, template_dirs, template_params)
from ssflctl.plan.templates import template_bindings as _template_bindings
from ssflctl.workdir.layout import RunDir
from ssflctl.workdir.records import AttemptInfo

_SPLITS = ("train", "val", "test")
#: params _apply_params knows (others need ssflctl_bindings or ssflctl_derived in the template)
_HANDLED = frozenset({"loss", "lr", "seed", "max_epochs", "max_iters", "val_interval", "batch_size",
                      "workers", "data_root", "classes", "load_from", "log_interval", "ckpt_interval",
                      "auto_scale_lr", "amp"} | {f"{s}_{k}" for s in ("train", "val", "test") for k in ("ann", "img")})
_DATASET_WRAPPERS = ("RepeatDataset", "ClassBalancedDataset", "MultiImageMixDataset")
_VERSIONED = ("torch", "mmcv", "mmdet", "mmengine", "ssflctl", "numpy", "pycocotools")


# --------------------------------------------------------------------------------------------
# the config
# --------------------------------------------------------------------------------------------
def loss_config(loss: Any, where: str = "params.loss") -> Dict[str, Any]:
    if isinstance(loss, str):
        key = loss.strip().lower()
        if key not in LOSSES:
            raise UserError(f"{where}: unknown loss {loss!r}; use one of {', '.join(LOSSES)} or a dict with 'type'")
        return copy.deepcopy(LOSSES[key])
    if isinstance(loss, dict):
        if not isinstance(loss.get("type"), str):
            raise UserError(f"{where}: a loss dict needs a 'type' (e.g. FocalLoss, ShiftStepFocalLoss)")
        return copy.deepcopy(dict(loss))
    raise UserError(f"{where}: expected a loss name or a dict, got {type(loss).__name__}")


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _get(cfg, dotted: str, default=None):
    cur = getattr(cfg, "_cfg_dict", cfg)  # mmengine.Config wraps a ConfigDict
    for part in dotted.split("."):
        if isinstance(cur, (list, tuple)) and part.lstrip("-").isdigit():
            idx = int(part)
            if not -len(cur) <= idx < len(cur):
                return default
            cur = cur[idx]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return default
    return cur


def _inner_datasets(ds) -> List[dict]:
    """The real datasets inside wrappers (RepeatDataset, ConcatDataset, ...)."""
    if ds is None:
        return []
    if ds.get("type") == "ConcatDataset" or "datasets" in ds:
        return [x for d in ds.get("datasets", []) for x in _inner_datasets(d)]
    if ds.get("type") in _DATASET_WRAPPERS and "dataset" in ds:
        return _inner_datasets(ds["dataset"])
    return [ds]


def _evaluators(ev) -> List[dict]:
    if ev is None:
        return []
    return [e for e in (ev if isinstance(ev, (list, tuple)) else [ev]) if isinstance(e, dict)]


def _join(root: Optional[str], rel: str) -> str:
    if not root or os.path.isabs(rel):
        return rel
    return os.path.join(root, rel)


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(_coerce(v, None) for v in value)
    return value


def _scale_epoch_schedule(cfg, old: int, new: int) -> None:
    scheds = cfg.get("param_scheduler")
    if not scheds or old == new or not old:
        return
    for s in scheds if isinstance(scheds, (list, tuple)) else [scheds]:
        if not s.get("by_epoch", True):
            continue
        if s.get("end") == old:
            s["end"] = new
        if "milestones" in s:
            s["milestones"] = sorted({min(new, max(1, round(m * new / old))) for m in s["milestones"]})
        if "T_max" in s:
            s["T_max"] = max(1, round(s["T_max"] * new / old))


def _read_classes(ann_file: str, where: str) -> Optional[tuple]:
    cache = _ACTIVE.get()
    if cache is not None:
        return cache.classes(ann_file, where)
    return _read_classes_now(ann_file, where, lenient=False)


def _read_classes_now(ann_file: str, where: str, lenient: bool) -> Optional[tuple]:
    if lenient and not os.path.exists(ann_file):
        return None  # a dry run without the data: the classes are checked when submitting
    try:
        with open(ann_file, encoding="utf-8") as fh:
            cats = json.load(fh).get("categories", [])
    except FileNotFoundError:
        raise UserError(f"{where}: classes not given and {ann_file} does not exist; "
                        "set params.classes or make the annotation file available") from None
    except (json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{ann_file}: not a COCO annotation file ({exc})") from None
    if not cats:
        raise UserError(f"{ann_file}: has no categories; set params.classes")
    return tuple(c["name"] for c in sorted(cats, key=lambda c: c["id"]))


def _apply_params(cfg, p: Dict[str, Any], declared: Dict[str, Any], bindings: Dict[str, List[str]],
                  where: str) -> None:
    loaders = {s: cfg.get(f"{s}_dataloader") for s in _SPLITS}
    datasets = {s: _inner_datasets(l.get("dataset")) if l else [] for s, l in loaders.items()}
    evaluators = {"val": _evaluators(cfg.get("val_evaluator")), "test": _evaluators(cfg.get("test_evaluator"))}

    if "loss" in p:
        if _get(cfg, "model.bbox_head") is None:
            raise UserError(f"{where}: the template has no model.bbox_head to set the loss on")
        cfg.model.bbox_head.loss_cls = loss_config(p["loss"])
    if "lr" in p:
        lr = p["lr"]
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise UserError(f"{where}: params.lr must be a number > 0, got {lr!r}")
        cfg.optim_wrapper.optimizer.lr = float(lr)
    if "seed" in p:
        cfg.randomness = dict(cfg.get("randomness") or {}, seed=p["seed"])
    if "max_epochs" in p and p["max_epochs"] is not None:
        old = cfg.train_cfg.get("max_epochs")
        new = int(p["max_epochs"])
        _scale_epoch_schedule(cfg, old, new)
        cfg.train_cfg.max_epochs = new
    if "max_iters" in p and p["max_iters"] is not None:
        cfg.train_cfg.max_iters = int(p["max_iters"])
    if "val_interval" in p:
        cfg.train_cfg.val_interval = int(p["val_interval"]) if p["val_interval"] else \
            int(cfg.train_cfg.get("max_epochs") or cfg.train_cfg.get("max_iters") or 1)
    if "batch_size" in p and loaders["train"] is not None:
        loaders["train"].batch_size = int(p["batch_size"])
    if "workers" in p:
        for l in loaders.values():
            if l is not None:
                l.num_workers = int(p["workers"])
                l.persistent_workers = int(p["workers"]) > 0
    root = p.get("data_root")
    for s in _SPLITS:
        for ds in datasets[s]:
            if root is not None:
                ds.data_root = root
            if p.get(f"{s}_ann") is not None:
                ds.ann_file = p[f"{s}_ann"]
            if p.get(f"{s}_img") is not None:
                ds.data_prefix = dict(ds.get("data_prefix") or {}, img=p[f"{s}_img"])
        for ev in evaluators.get(s, []):
            if "ann_file" in ev and datasets[s]:
                ds = datasets[s][0]
                ev.ann_file = _join(ds.get("data_root"), ds.ann_file)
    if "classes" in p:
        classes = p["classes"]
        if classes is None:
            ds = datasets["train"][0]
            classes = _read_classes(_join(ds.get("data_root"), ds.ann_file), f"{where}: params.classes")
    if "classes" in p and classes is not None:
        if isinstance(classes, str) or not classes or not all(isinstance(c, str) for c in classes):
            raise UserError(f"{where}: params.classes must be a non-empty list of class names")
        classes = tuple(classes)
        for s in _SPLITS:
            for ds in datasets[s]:
                ds.metainfo = dict(ds.get("metainfo") or {}, classes=classes)
        cfg.model.bbox_head.num_classes = len(classes)
    if "load_from" in p:
        cfg.load_from = p["load_from"]
    if "log_interval" in p:
        cfg.default_hooks.logger.interval = int(p["log_interval"])
    if "ckpt_interval" in p:
        cfg.default_hooks.checkpoint.interval = int(p["ckpt_interval"])
    if "auto_scale_lr" in p:
        cfg.auto_scale_lr = dict(cfg.get("auto_scale_lr") or {}, enable=bool(p["auto_scale_lr"]))
    for name, keys in bindings.items():
        if name in p:
            value = _coerce(p[name], declared.get(name))
            for key in keys:
                _set_existing(cfg, key, value, f"{where}: ssflctl_bindings.{name}")


def _set_existing(cfg, dotted: str, value: Any, where: str) -> None:
    parent_key, _, leaf = dotted.rpartition(".")
    parent = _get(cfg, parent_key) if parent_key else getattr(cfg, "_cfg_dict", cfg)
    if not isinstance(parent, (dict, list)):
        raise UserError(f"{where}: {dotted!r}: {parent_key!r} does not exist in the config")
    if isinstance(parent, list):
        if not leaf.lstrip("-").isdigit() or not -len(parent) <= int(leaf) < len(parent):
            raise UserError(f"{where}: {dotted!r}: index {leaf!r} is out of range")
        parent[int(leaf)] = value
    else:
        parent[leaf] = value


def _imports() -> List[str]:
    mods = ["ssflctl.extensions.compat", "ssflctl.extensions.losses", "ssflctl.node.guard"]
    return [m for m in mods if _module_exists(m)]


class RenderCache:
    """What rendering many runs of one submission shares, computed once.

    Each template's config is parsed by ``Config.fromfile`` once (mmdet's ``_base_`` files are the
    cost: 0.7-1.4 s per parse here); each run then renders from a deep copy of the parsed config
    (1 ms), so runs cannot see each other's changes. Also kept: the template's declared params,
    bindings and ``ssflctl_derived`` table, its sha256, the category names of each annotation file,
    the git state of the working directory and the package versions. Entries are keyed by the
    file's path, mtime and size, so an edited template is parsed again. ``lenient`` (a dry run):
    ``classes: None`` with an annotation file that does not exist yet is left to the submission
    instead of refused.
    """

    def __init__(self, lenient: bool = False):
        self.lenient = lenient
        self._templates = _TEMPLATES  # shared by every cache of this process (the plan's batch check,
        # the data pre-flight and the submission each rendered the template: 3 parses of ~1 s)
        self._classes: Dict[Any, Optional[tuple]] = {}
        self._git: Dict[str, Dict[str, Any]] = {}
        self._versions: Optional[Dict[str, Optional[str]]] = None

    @staticmethod
    def _key(path: Union[str, Path]):
        st = os.stat(path)
        return str(path), st.st_mtime_ns, st.st_size

    @staticmethod
    def _template_key(path: Union[str, Path]):
        """A template's path, mtime, size and content hash: an edit within the file system's
        timestamp granularity that keeps the size is still seen (the parsed copy is process-wide)."""
        data = Path(path).read_bytes()
        st = os.stat(path)
        return str(path), st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest()

    def template(self, path: Path) -> Dict[str, Any]:
        key = self._template_key(path)
        hit = self._templates.get(key)
        if hit is None:
            hit = self._templates[key] = _load_template(path)
        return hit

    def classes(self, ann_file: str, where: str) -> Optional[tuple]:
        try:
            key = self._key(ann_file)
        except OSError:
            return _read_classes_now(ann_file, where, self.lenient)
        if key not in self._classes:
            self._classes[key] = _read_classes_now(ann_file, where, self.lenient)
        return self._classes[key]

    def git_info(self, cwd: Path) -> Dict[str, Any]:
        if str(cwd) not in self._git:
            self._git[str(cwd)] = _git_info(cwd)
        return dict(self._git[str(cwd)])

    def versions(self) -> Dict[str, Optional[str]]:
        if self._versions is None:
            self._versions = versions()
        return dict(self._versions)


#: parsed templates (see RenderCache.template), one store per process; each run renders from a copy
_TEMPLATES: Dict[Any, Dict[str, Any]] = {}

#: the cache of the render_config call in progress (read by _read_classes inside _apply_params)
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("ssflctl_render_cache", default=None)


def _load_template(path: Path) -> Dict[str, Any]:
    """Parse a template with mmengine and read its declarations: what every run of it shares."""
    from mmengine.config import Config

    declared = template_params(path)
    try:
        cfg = Config.fromfile(str(path))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: mmengine cannot load this template ({type(exc).__name__}: {exc})") from None
    cfg.pop("ssflctl_bindings", None)
    cfg.pop("ssflctl_derived", None)
    derived_table: Dict[Any, Any] = {}
    if _module_exists("ssflctl.plan.derived"):
        from ssflctl.plan import derived

        derived_table = derived.read(path)
    data = path.read_bytes()
    return {"cfg": cfg, "data": cfg.to_dict(), "declared": declared, "bindings": _template_bindings(path), "derived": derived_table,
            "sha256": hashlib.sha256(data).hexdigest()}


def render_config(template: Union[str, Path], params: Optional[Dict[str, Any]] = None,
                  overrides: Optional[Dict[str, Any]] = None, cache: Optional[RenderCache] = None):
    """Template + params + overrides -> ``mmengine.Config`` (not written anywhere).

    Unknown params are an error; ``overrides`` merge into the config by mmengine's inheritance
    rule (``ssflctl.plan.overrides``: dotted keys or nested mappings, ``_delete_: true`` replaces,
    list indices allowed). ``cache`` (a :class:`RenderCache`) parses the template once for many
    runs; the result is the same config as without it.
    """
    from mmengine.config import ConfigDict

    path = resolve_template(template)
    tpl = cache.template(path) if cache is not None else _load_template(path)
    declared = tpl["declared"]
    params = dict(params or {})
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise UserError(f"params: {', '.join(unknown)} not known to template {path.name}; "
                        f"it takes {', '.join(sorted(declared))}")
    resolved = {**declared, **params}
    if str(resolved.get("loss", "")).lower() in ("ssfl", "gfl") and not _module_exists("ssflctl.extensions.losses"):
        raise UserError("params.loss: ShiftStepFocalLoss needs ssflctl.extensions.losses, which is not installed")
    if cache is not None:  # a copy of the parsed template's data (deepcopy of the Config: 5x slower)
        from mmengine.config import Config

        cfg = Config(_copy_data(tpl["data"]))
    else:
        cfg = tpl["cfg"]
    bindings = tpl["bindings"]
    where = f"template {path.name}"
    derived_names = set(tpl["derived"])
    idle = sorted(set(declared) - _HANDLED - set(bindings) - derived_names)
    if idle:
        raise UserError(f"{path}: ssflctl_params declares {', '.join(idle)} but nothing sets it; "
                        "bind it in ssflctl_bindings (param -> dotted config keys)")
    token = _ACTIVE.set(cache)
    try:
        _apply_params(cfg, resolved, declared, bindings, where)
        if derived_names:
            from ssflctl.plan import derived

            # derived settings override the template's defaults; explicit params still win
            if derived.apply(cfg, path, resolved, where, table=tpl["derived"]):
                _apply_params(cfg, params, declared, bindings, where)
    finally:
        _ACTIVE.reset(token)
    overrides_mod.merge(cfg, overrides or {})
    if "amp" in declared:  # last: it sees the final optim_wrapper and loss_cls (plan/amp.py)
        from ssflctl.plan.amp import apply_amp

        apply_amp(cfg, resolved.get("amp"), where)

    ci = cfg.get("custom_imports") or {}
    imports = list(ci.get("imports", []))
    imports += [m for m in _imports() if m not in imports]
    cfg.custom_imports = dict(imports=imports, allow_failed_imports=False)
    if "ssflctl.node.guard" in imports:
        hooks = list(cfg.get("custom_hooks") or [])
        if not any(isinstance(h, dict) and h.get("type") == "NanGuardHook" for h in hooks):
            hooks.append(dict(type="NanGuardHook"))
        cfg.custom_hooks = hooks
    cfg.ssflctl_params = ConfigDict(_jsonable(resolved))
    # as Config.fromfile does for a file: the in-memory config is usable right away
    from mmengine.utils import import_modules_from_strings

    import_modules_from_strings(**cfg.custom_imports)
    return cfg


def config_text(cfg, meant: Optional[Dict[str, Any]] = None) -> str:
    """The text of ``cfg`` as a ``.py`` config: :func:`ssflctl.plan.config_text.dump_text` (no yapf),
    or mmengine's own ``pretty_text`` for a config holding something that is not plain data."""
    try:
        return dump_text(cfg.to_dict() if meant is None else meant)
    except Unsupported:
        return cfg.pretty_text


def _copy_data(x: Any) -> Any:
    """copy.deepcopy for config data (dicts, lists, tuples of immutable leaves), 10x faster."""
    t = type(x)
    if t is dict:
        return {k: _copy_data(v) for k, v in x.items()}
    if t is list:
        return [_copy_data(v) for v in x]
    if t is tuple:
        return tuple(_copy_data(v) for v in x)
    if t in (str, int, float, bool, type(None)):
        return x
    return copy.deepcopy(x)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------------------------
# attempts
# --------------------------------------------------------------------------------------------
def attempt_dir(run_dir: Union[str, Path], attempt: int) -> Path:
    return RunDir(run_dir).attempt(attempt).path


def read_run(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """run.json's body; UserError naming the file when it is missing, unreadable or has no template."""
    path = RunDir(run_dir).run_json_path
    run = load_json(path, path.name, f"; is {run_dir} a run directory (ssflctl submit writes it)?")
    if not isinstance(run, dict) or "template" not in run:
        raise UserError(f"{path}: needs at least a 'template' key")
    return run


def _git_info(cwd: Path) -> Dict[str, Any]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"repo": None, "commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        top = git("rev-parse", "--show-toplevel")
        return {"repo": top.stdout.strip() or None, "commit": head.stdout.strip(),
                "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"repo": None, "commit": None, "dirty": None}


def versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out: Dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(run: Dict[str, Any], template: Path, resolved: Dict[str, Any],
               cache: Optional[RenderCache] = None) -> Dict[str, Any]:
    return {
        "run_id": run.get("run_id"),
        "template": str(template),
        "template_sha256": cache.template(template)["sha256"] if cache is not None
        else hashlib.sha256(template.read_bytes()).hexdigest(),
        "params": _jsonable(resolved),
        "overrides": _jsonable(run.get("overrides") or {}),
        "git": cache.git_info(Path.cwd()) if cache is not None else _git_info(Path.cwd()),
        "cwd": str(Path.cwd()),
        "versions": cache.versions() if cache is not None else versions(),
        "host": socket.gethostname(),
        "rendered_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def render_attempt(run_dir: Union[str, Path], attempt: int, *, lr: Optional[float] = None,
                   resume_from: Optional[str] = None, reason: str = "first attempt",
                   force: bool = False, run: Optional[Dict[str, Any]] = None,
                   cache: Optional[RenderCache] = None, check: Optional[Callable[[Any], None]] = None) -> Path:
    """Write ``<run_dir>/attempt-<n>/{config.py, provenance.json, attempt.json}``; return the dir.

    ``run`` is the run's run.json body (``RunSpec.run_json()``); read from ``run_dir`` when not
    given (the node's retry loop). ``lr`` overrides the run's ``params.lr``; ``resume_from`` (a
    checkpoint path) makes the attempt resume that checkpoint (``resume=True, load_from=...`` in
    the config). An attempt that was already rendered (attempt.json exists) is not overwritten
    unless ``force``. ``cache`` shares the parsed template between the runs of a submission;
    ``check(cfg)`` (e.g. ``registry_check.check``) runs on the config before anything is written.
    """
    run_dir = Path(run_dir)
    if run is None:
        run = read_run(run_dir)
    a = RunDir(run_dir).attempt(attempt)
    adir = a.path
    if a.rendered and not force:
        raise UserError(f"{adir}: attempt {attempt} was already rendered; use a new attempt number")
    template = resolve_template(run["template"])
    params = dict(run.get("params") or {})
    if lr is not None:
        params["lr"] = float(lr)
    cfg = render_config(template, params, run.get("overrides") or {}, cache=cache)
    if resume_from:
        # resume another attempt's checkpoint; LrOverrideHook makes this attempt's lr win over the
        # lr that mmengine's resume restores with the optimizer and scheduler state
        cfg.resume = True
        cfg.load_from = str(resume_from)
        if "ssflctl.node.guard" in (cfg.get("custom_imports") or {}).get("imports", []):
            hooks = [h for h in (cfg.get("custom_hooks") or []) if h.get("type") != "LrOverrideHook"]
            hooks.append(dict(type="LrOverrideHook", lr=float(cfg.optim_wrapper.optimizer.lr)))
            cfg.custom_hooks = hooks
    meant = cfg.to_dict()
    if check is not None:
        check(meant)
    text = config_text(cfg, meant)
    # the written file must parse back, without running, to exactly what was meant
    check_text(text, meant, a.config_path)
    write_text(a.config_path, text)
    resolved = dict(cfg.ssflctl_params)
    a.write_provenance(provenance(run, template, resolved, cache))
    a.write_info(AttemptInfo(
        run_id=run.get("run_id"), attempt=int(attempt), config=str(a.config_path.resolve()),
        lr=float(cfg.optim_wrapper.optimizer.lr), resume_from=str(resume_from) if resume_from else None,
        reason=reason, rendered_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        extra={"template": str(template), "test": bool(run.get("test", True))}))
    return adir
