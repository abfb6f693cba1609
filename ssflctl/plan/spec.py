"""Experiment files: YAML -> validated `Experiment` -> expanded `RunSpec`s with stable ids.

Every error is a `UserError` of the form ``<file>:<line>: <key>: <what was expected>`` with a
near-miss suggestion for misspelt keys. Nothing here imports heavy modules.

Schema (see experiments/ssfl_vs_fl.yaml)::

    name: ssfl_vs_fl                        # [A-Za-z0-9_.-]+
    template: retinanet_tiny                # default template (name in templates/ or a path)
    datasets:                               # dataset name -> where it lives (+ per-dataset template,
      coco: {root: data/coco, template: retinanet_r50_fpn_1x_coco, params: {}, resources: {}}
    matrix:                                 # axes: loss, dataset, seed, lr, template params,
      loss: [focal, ssfl]                   #   dotted mmengine keys (model.bbox_head.loss_cls.gamma)
      dataset: [coco]
      seed: [3407]
      lr: [0.01]
      exclude: [{loss: ssfl, dataset: coco}]
      include: [{loss: gfl, dataset: coco}] # extra cells; missing axes take every value
    params: {max_epochs: 12}                # fixed template params
    overrides: {train_cfg.val_interval: 1}  # fixed dotted config keys
    resources: {gpus: 1, cpus: 6, mem: 32G, time: "24:00:00"}
    executor:
      type: slurm                           # slurm | local | auto (slurm when sbatch is found)
      slurm: {partition: gpulab02, qos: gpulab02, account: null, gres: null, constraint: null,
              array_parallelism: null, max_num_timeout: 3, signal_delay_s: null, sbatch: {}, setup: []}
      local: {max_parallel: 2}
    retry: {on_nan: lower_lr, factor: 0.1, max_attempts: 3}
    test: true
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from ssflctl.errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SPECIAL_AXES = ("loss", "dataset", "seed", "lr")
TOP_KEYS = ("name", "description", "template", "datasets", "matrix", "params", "overrides", "resources",
            "executor", "retry", "test")
DATASET_KEYS = ("root", "template", "params", "overrides", "resources")
RESOURCE_KEYS = ("gpus", "cpus", "mem", "time", "nodes")
EXECUTOR_KEYS = ("type", "slurm", "local")
SLURM_KEYS = ("partition", "qos", "account", "gres", "constraint", "array_parallelism", "max_num_timeout",
              "signal_delay_s", "sbatch", "setup")
LOCAL_KEYS = ("max_parallel",)
EXECUTOR_TYPES = ("slurm", "local", "auto")
DEFAULT_RESOURCES = {"gpus": 0, "cpus": 1, "mem_gb": 8, "time_min": 60}


# --------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------

class LDict(dict):
    """A mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    lines: Dict[Any, int]


class LList(list):
    line: int = 0
    lines: List[int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LDict:
    loader.flatten_mapping(node)
    out = LDict()
    out.line = node.start_mark.line + 1
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise UserError(f"{loader.name}:{key_node.start_mark.line + 1}: a mapping key must be a plain "
                            f"value, not {type(key).__name__}")
        if key in out:
            raise UserError(f"{loader.name}:{key_node.start_mark.line + 1}: {key}: duplicate key (first on line "
                            f"{out.lines[key]}); keep one")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LList:
    out = LList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such experiment file")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the experiment file ({exc})")
    loader = _Loader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except UserError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = exc.problem or exc.context or "invalid YAML"
        raise UserError(f"{path}:{line}: invalid YAML: {what}; fix the syntax")
    except yaml.YAMLError as exc:
        raise UserError(f"{path}:1: invalid YAML: {exc}")
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    name: str
    root: Optional[str]
    template: Optional[str]
    params: Dict[str, Any]
    overrides: Dict[str, Any]
    resources: Dict[str, Any]
    line: int = 0


@dataclass
class Experiment:
    name: str
    path: Path
    template: Optional[str]
    datasets: Dict[str, Dataset]
    axes: Dict[str, List[Any]]
    include: List[Dict[str, Any]]
    exclude: List[Dict[str, Any]]
    params: Dict[str, Any]
    overrides: Dict[str, Any]
    resources: Dict[str, Any]
    executor: Dict[str, Any]
    retry: Dict[str, Any]
    test: bool
    description: str = ""
    lines: Dict[str, int] = field(default_factory=dict)  # "matrix.loss" -> line
    warnings: List[str] = field(default_factory=list)

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        if line is None:
            for k in sorted(self.lines, key=len, reverse=True):
                if key.startswith(k + "."):
                    line = self.lines[k]
                    break
        return f"{self.path}:{line or 1}"


@dataclass
class RunSpec:
    run_id: str
    name: str
    experiment: str
    axes: Dict[str, Any]
    template: str            # absolute path when resolvable, else as written
    template_name: str       # as written in the YAML
    params: Dict[str, Any]
    overrides: Dict[str, Any]
    resources: Dict[str, Any]
    retry: Dict[str, Any]
    test: bool
    dataset_root: Optional[str] = None
    line: int = 0

    def run_json(self) -> Dict[str, Any]:
        return {
            "run_id": self.run_id, "name": self.name, "experiment": self.experiment, "axes": self.axes,
            "template": self.template, "params": self.params, "overrides": self.overrides,
            "resources": self.resources, "retry": self.retry, "test": self.test,
        }


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------

class _V:
    def __init__(self, path: Path):
        self.path = path
        self.lines: Dict[str, int] = {}

    def fail(self, line: int, key: str, msg: str) -> None:
        raise UserError(f"{self.path}:{line}: {key}: {msg}" if key else f"{self.path}:{line}: {msg}")

    def record(self, prefix: str, mapping: Any) -> None:
        if isinstance(mapping, LDict):
            for k, ln in mapping.lines.items():
                self.lines[f"{prefix}{k}"] = ln

    def mapping(self, value: Any, line: int, key: str, allowed: Optional[Tuple[str, ...]] = None,
                what: str = "a mapping") -> LDict:
        if value is None:
            value = LDict()
            value.line, value.lines = line, {}
        if not isinstance(value, dict):
            self.fail(line, key, f"expected {what}, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str):
                self.fail(_line(value, k, line), key, f"keys must be strings, got {_kind(k)} {k!r}")
            if allowed is not None and k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)
                where = f"{key}.{k}" if key else k
                sugg = f"did you mean '{hint[0]}'?" if hint else f"expected one of: {', '.join(allowed)}"
                self.fail(_line(value, k, line), where, f"unknown key; {sugg}")
        return value


def _line(mapping: Any, key: Any, default: int) -> int:
    if isinstance(mapping, LDict):
        return mapping.lines.get(key, mapping.line or default)
    return default


def _kind(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, str):
        return f"a string ({v!r})"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def parse_mem(v: Any) -> Optional[float]:
    """'32G', '500M', '1T', 32 (GB) -> GB; None if invalid."""
    if _is_num(v) and v > 0:
        return float(v)
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", v, re.I)
        if m:
            n, unit = float(m.group(1)), m.group(2).upper() or "G"
            gb = n * {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1, "T": 1024}[unit]
            return gb if gb > 0 else None
    return None


def parse_time(v: Any) -> Optional[int]:
    """Slurm time ('D-HH:MM:SS', 'HH:MM:SS', 'MM:SS'... ) or minutes (int) -> minutes."""
    if _is_int(v) and v > 0:
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\s*", v)
        if m:
            d = int(m.group(1) or 0)
            parts = [int(p) for p in m.group(2, 3, 4) if p is not None]
            if m.group(1) is not None:  # D-HH[:MM[:SS]]
                parts += [0] * (3 - len(parts))
                h, mi, s = parts
            elif len(parts) == 3:
                h, mi, s = parts
            elif len(parts) == 2:
                h, mi, s = 0, parts[0], parts[1]
            else:
                h, mi, s = 0, parts[0], 0
            total = d * 1440 + h * 60 + mi + (1 if s else 0)
            return total if total > 0 else None
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", v)
        if m:
            minutes = float(m.group(1)) * {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}[m.group(2)]
            return max(1, int(round(minutes))) if minutes > 0 else None
    return None


def _resources(v: _V, value: Any, line: int, key: str) -> Dict[str, Any]:
    m = v.mapping(value, line, key, RESOURCE_KEYS)
    v.record(key + ".", m)
    out: Dict[str, Any] = {}
    for k, val in m.items():
        ln = _line(m, k, line)
        if k in ("gpus", "cpus", "nodes"):
            lo = 0 if k == "gpus" else 1
            if not _is_int(val) or val < lo:
                v.fail(ln, f"{key}.{k}", f"expected a whole number >= {lo}, got {_kind(val)}")
            out[k] = val
        elif k == "mem":
            gb = parse_mem(val)
            if gb is None:
                v.fail(ln, f"{key}.mem", f"expected a memory size like 32G or 500M (or GB as a number), got {_kind(val)}")
            out["mem_gb"] = round(gb, 3)
        elif k == "time":
            mins = parse_time(val)
            if mins is None:
                v.fail(ln, f"{key}.time", "expected a time limit like '24:00:00', '1-02:00:00', '90m' or "
                                          f"minutes as a whole number, got {_kind(val)}")
            out["time_min"] = mins
    return out


def _value_dict(v: _V, value: Any, line: int, key: str, dotted: bool) -> Dict[str, Any]:
    m = v.mapping(value, line, key)
    v.record(key + ".", m)
    for k, val in m.items():
        ln = _line(m, k, line)
        if dotted and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_0-9][A-Za-z0-9_]*)*", k):
            v.fail(ln, f"{key}.{k}", "expected a dotted config key like model.bbox_head.loss_cls.gamma")
        if not dotted and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            v.fail(ln, f"{key}.{k}", "expected a template parameter name (letters, digits, _)")
        _check_plain(v, val, ln, f"{key}.{k}")
    return dict(m)


def _check_plain(v: _V, val: Any, line: int, key: str) -> None:
    """Values must be plain YAML data (no timestamps/binary)."""
    if _is_scalar(val):
        if isinstance(val, float) and val != val:
            v.fail(line, key, "NaN is not a valid value")
        return
    if isinstance(val, list):
        for i, item in enumerate(val):
            _check_plain(v, item, val.lines[i] if isinstance(val, LList) else line, f"{key}[{i}]")
        return
    if isinstance(val, dict):
        for k, item in val.items():
            if not isinstance(k, str):
                v.fail(line, key, f"keys must be strings, got {_kind(k)}")
            _check_plain(v, item, _line(val, k, line), f"{key}.{k}")
        return
    v.fail(line, key, f"expected plain YAML data (string, number, bool, list, mapping), got {type(val).__name__}; "
                      "quote it")


# --------------------------------------------------------------------------------------------
# load()
# --------------------------------------------------------------------------------------------

def load(path) -> Experiment:
    """Read and validate an experiment file (structure only; see `check` for templates/data)."""
    path = Path(path)
    data = load_yaml(path)
    v = _V(path)
    if data is None:
        v.fail(1, "", "the experiment file is empty; it needs at least 'name', 'template' or 'datasets', and 'matrix'")
    top = v.mapping(data, 1, "", TOP_KEYS, what="a mapping of experiment keys (name, template, matrix, ...)")
    v.record("", top)
    L = lambda k: _line(top, k, 1)  # noqa: E731

    if "name" not in top:
        v.fail(1, "name", "missing; give the experiment a name like ssfl_vs_fl")
    name = top["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        v.fail(L("name"), "name", f"expected a name of letters, digits, '_', '.', '-', got {_kind(name)}")

    description = top.get("description") or ""
    if not isinstance(description, str):
        v.fail(L("description"), "description", f"expected a string, got {_kind(description)}")

    template = top.get("template")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        v.fail(L("template"), "template", f"expected a template name (see templates/) or a config path, got {_kind(template)}")

    params = _value_dict(v, top.get("params"), L("params"), "params", dotted=False)
    overrides = _value_dict(v, top.get("overrides"), L("overrides"), "overrides", dotted=True)
    resources = _resources(v, top.get("resources"), L("resources"), "resources")

    # datasets
    datasets: Dict[str, Dataset] = {}
    dsm = v.mapping(top.get("datasets"), L("datasets"), "datasets", what="a mapping of dataset name -> {root, template}")
    v.record("datasets.", dsm)
    for ds_name, ds_val in dsm.items():
        ln = _line(dsm, ds_name, L("datasets"))
        key = f"datasets.{ds_name}"
        if not NAME_RE.match(ds_name):
            v.fail(ln, key, "expected a dataset name of letters, digits, '_', '.', '-'")
        if isinstance(ds_val, str):  # shorthand: name: root
            ds_val = {"root": ds_val}
        m = v.mapping(ds_val, ln, key, DATASET_KEYS, what="a mapping with root and optionally template")
        v.record(key + ".", m)
        root = m.get("root")
        if root is not None and (not isinstance(root, str) or not root.strip()):
            v.fail(_line(m, "root", ln), f"{key}.root", f"expected a directory path, got {_kind(root)}")
        ds_t = m.get("template")
        if ds_t is not None and (not isinstance(ds_t, str) or not ds_t.strip()):
            v.fail(_line(m, "template", ln), f"{key}.template", f"expected a template name or a config path, got {_kind(ds_t)}")
        datasets[ds_name] = Dataset(
            name=ds_name, root=root, template=ds_t,
            params=_value_dict(v, m.get("params"), _line(m, "params", ln), f"{key}.params", dotted=False),
            overrides=_value_dict(v, m.get("overrides"), _line(m, "overrides", ln), f"{key}.overrides", dotted=True),
            resources=_resources(v, m.get("resources"), _line(m, "resources", ln), f"{key}.resources"),
            line=ln,
        )

    # matrix
    if "matrix" not in top:
        v.fail(1, "matrix", "missing; list the axes, e.g. matrix: {loss: [focal, ssfl], seed: [3407]}")
    mat = v.mapping(top["matrix"], L("matrix"), "matrix", what="a mapping of axis -> list of values")
    v.record("matrix.", mat)
    axes: Dict[str, List[Any]] = {}
    include: List[Dict[str, Any]] = []
    exclude: List[Dict[str, Any]] = []
    for ax, vals in mat.items():
        ln = _line(mat, ax, L("matrix"))
        key = f"matrix.{ax}"
        if ax in ("include", "exclude"):
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_0-9][A-Za-z0-9_]*)*", ax):
            v.fail(ln, key, "expected an axis name (loss, dataset, seed, lr, a template parameter, or a dotted "
                            "config key like model.bbox_head.loss_cls.gamma)")
        if not isinstance(vals, list):
            vals = [vals]
        if len(vals) == 0:
            v.fail(ln, key, "empty axis; give at least one value or remove the axis")
        seen = []
        for i, val in enumerate(vals):
            iln = vals.lines[i] if isinstance(vals, LList) else ln
            _check_plain(v, val, iln, key)
            if val in seen and type(val) is type(seen[seen.index(val)]):
                v.fail(iln, key, f"value {val!r} is listed twice; list each value once")
            seen.append(val)
        axes[ax] = list(vals)
    if not axes:
        v.fail(L("matrix"), "matrix", "no axes; give at least one, e.g. loss: [focal, ssfl]")
    for rule in ("include", "exclude"):
        if rule not in mat:
            continue
        rln = _line(mat, rule, L("matrix"))
        items = mat[rule]
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            v.fail(rln, f"matrix.{rule}", f"expected a list of {{axis: value}} mappings, got {_kind(items)}")
        for i, item in enumerate(items):
            iln = items.lines[i] if isinstance(items, LList) else rln
            m = v.mapping(item, iln, f"matrix.{rule}[{i}]", what="a mapping of axis -> value")
            if not m:
                v.fail(iln, f"matrix.{rule}[{i}]", "empty rule; name at least one axis value")
            for k, val in m.items():
                kl = _line(m, k, iln)
                if rule == "exclude" and k not in axes:
                    hint = difflib.get_close_matches(k, list(axes), n=1, cutoff=0.6)
                    sugg = f"did you mean '{hint[0]}'?" if hint else f"axes are: {', '.join(axes)}"
                    v.fail(kl, f"matrix.{rule}[{i}].{k}", f"not an axis of the matrix; {sugg}")
                if rule == "include" and k not in axes and k not in SPECIAL_AXES and "." not in k:
                    hint = difflib.get_close_matches(k, list(axes) + list(SPECIAL_AXES), n=1, cutoff=0.6)
                    if hint:
                        v.fail(kl, f"matrix.{rule}[{i}].{k}", f"not an axis of the matrix; did you mean '{hint[0]}'?")
                if isinstance(val, (list, dict)):
                    v.fail(kl, f"matrix.{rule}[{i}].{k}", f"expected one value, got {_kind(val)}")
                _check_plain(v, val, kl, f"matrix.{rule}[{i}].{k}")
            v.lines[f"matrix.{rule}[{i}]"] = iln
            (include if rule == "include" else exclude).append(dict(m))

    # executor
    exm = v.mapping(top.get("executor"), L("executor"), "executor", EXECUTOR_KEYS)
    v.record("executor.", exm)
    ex_type = exm.get("type", "auto")
    if ex_type not in EXECUTOR_TYPES:
        hint = difflib.get_close_matches(str(ex_type), EXECUTOR_TYPES, n=1, cutoff=0.5)
        v.fail(_line(exm, "type", L("executor")), "executor.type",
               f"expected one of slurm, local, auto, got {_kind(ex_type)}" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    eln = L("executor")
    slm = v.mapping(exm.get("slurm"), _line(exm, "slurm", eln), "executor.slurm", SLURM_KEYS)
    v.record("executor.slurm.", slm)
    slurm: Dict[str, Any] = {}
    for k, val in slm.items():
        kl = _line(slm, k, eln)
        key = f"executor.slurm.{k}"
        if k in ("partition", "qos", "account", "gres", "constraint"):
            if val is not None and (not isinstance(val, str) or not val.strip() or any(c.isspace() for c in val)):
                v.fail(kl, key, f"expected a single word like gpulab02, got {_kind(val)}")
            slurm[k] = val
        elif k == "array_parallelism":
            if val is not None and (not _is_int(val) or val < 1):
                v.fail(kl, key, f"expected a whole number >= 1 (the %N throttle of the job array), got {_kind(val)}")
            slurm[k] = val
        elif k == "max_num_timeout":
            if not _is_int(val) or val < 0:
                v.fail(kl, key, "expected a whole number >= 0 (how many times a run that reaches its time limit "
                       f"is requeued to resume from its checkpoint), got {_kind(val)}")
            slurm[k] = val
        elif k == "signal_delay_s":
            if val is not None and (not _is_int(val) or val < 1):
                v.fail(kl, key, "expected a whole number of seconds >= 1 (how long before the time limit Slurm "
                       f"sends SIGUSR2 to checkpoint and requeue), got {_kind(val)}")
            slurm[k] = val
        elif k == "sbatch":
            sm = v.mapping(val, kl, key, what="a mapping of sbatch option -> value (e.g. mail-type: END)")
            for opt, oval in sm.items():
                if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", opt):
                    v.fail(_line(sm, opt, kl), f"{key}.{opt}", "expected an sbatch long option name without '--'")
                if not _is_scalar(oval) or oval is None:
                    v.fail(_line(sm, opt, kl), f"{key}.{opt}", f"expected a string or number, got {_kind(oval)}")
            slurm[k] = {str(a).replace("-", "_"): b for a, b in sm.items()}
        elif k == "setup":
            if isinstance(val, str):
                val = [val]
            if not isinstance(val, list) or not all(isinstance(s, str) for s in val):
                v.fail(kl, key, "expected a list of shell lines run before the job (e.g. source .venv/bin/activate)")
            slurm[k] = list(val)
    lom = v.mapping(exm.get("local"), _line(exm, "local", eln), "executor.local", LOCAL_KEYS)
    local: Dict[str, Any] = {}
    if "max_parallel" in lom:
        mp = lom["max_parallel"]
        if not _is_int(mp) or mp < 1:
            v.fail(_line(lom, "max_parallel", eln), "executor.local.max_parallel",
                   f"expected a whole number >= 1, got {_kind(mp)}")
        local["max_parallel"] = mp
    executor = {"type": ex_type, "slurm": slurm, "local": local}

    # retry
    retry_raw = top.get("retry")
    if retry_raw is None:  # the policy's defaults, written out in run.json
        retry_raw = LDict()
        retry_raw.line, retry_raw.lines = L("retry"), {}
    retry: Dict[str, Any] = {}
    try:
        from ssflctl.node import retry as retry_mod  # light module (owned by the NaN work)
    except ImportError:  # pragma: no cover
        retry_mod = None
    allowed = tuple(getattr(retry_mod, "DEFAULTS", {})) or None
    rm = v.mapping(retry_raw, L("retry"), "retry", allowed, what="a mapping (on_nan, factor, max_attempts, ...)")
    retry = dict(rm)
    if retry_mod is not None:
        try:
            policy = retry_mod.RetryPolicy.from_dict(retry, where="retry")
        except UserError as exc:
            msg = str(exc)
            m = re.match(r"retry\.([A-Za-z_]+)", msg)
            bad = m.group(1) if m and m.group(1) in rm else None
            if not msg.startswith("retry"):
                msg = f"retry: {msg}"
            v.fail(_line(rm, bad, L("retry")) if bad else L("retry"), "", msg)
        except (TypeError, ValueError, KeyError) as exc:
            bad = next((k for k in rm if k in str(exc)), None)
            v.fail(_line(rm, bad, L("retry")) if bad else L("retry"), "retry", f"invalid retry policy: {exc}")
        else:
            retry = _policy_dict(policy, retry)

    test = top.get("test", True)
    if not isinstance(test, bool):
        v.fail(L("test"), "test", f"expected true or false, got {_kind(test)}")

    exp = Experiment(
        name=name, path=path, template=template, datasets=datasets, axes=axes, include=include,
        exclude=exclude, params=params, overrides=overrides, resources=resources, executor=executor,
        retry=retry, test=test, description=description, lines=v.lines,
    )
    _check_axes(v, exp)
    return exp


def _policy_dict(policy: Any, fallback: Dict[str, Any]) -> Dict[str, Any]:
    for attr in ("to_dict", "as_dict"):
        if hasattr(policy, attr):
            return dict(getattr(policy, attr)())
    try:
        import dataclasses

        if dataclasses.is_dataclass(policy):
            return dataclasses.asdict(policy)
    except Exception:  # pragma: no cover
        pass
    return dict(fallback)


def _check_axes(v: _V, exp: Experiment) -> None:
    def ln(k: str) -> int:
        return exp.lines.get(k, 1)

    if "dataset" in exp.axes:
        for val in exp.axes["dataset"]:
            if not isinstance(val, str) or val not in exp.datasets:
                hint = difflib.get_close_matches(str(val), list(exp.datasets), n=1, cutoff=0.6)
                sugg = f"did you mean '{hint[0]}'?" if hint else (
                    f"declare it under datasets: ({', '.join(exp.datasets) or 'none declared'})")
                v.fail(ln("matrix.dataset"), "matrix.dataset", f"unknown dataset {val!r}; {sugg}")
    if "seed" in exp.axes:
        for val in exp.axes["seed"]:
            if not _is_int(val) or val < 0:
                v.fail(ln("matrix.seed"), "matrix.seed", f"expected whole numbers >= 0, got {_kind(val)}")
    if "lr" in exp.axes:
        for val in exp.axes["lr"]:
            if not _is_num(val) or val <= 0:
                v.fail(ln("matrix.lr"), "matrix.lr", f"expected positive numbers like 0.01, got {_kind(val)}")
    if "loss" in exp.axes:
        for val in exp.axes["loss"]:
            if not (isinstance(val, str) and val.strip()) and not isinstance(val, dict):
                v.fail(ln("matrix.loss"), "matrix.loss", f"expected loss names (focal, ssfl, gfl) or loss_cls "
                                                         f"mappings, got {_kind(val)}")
    if exp.template is None and not exp.datasets:
        v.fail(1, "template", "missing; name a template (see templates/) or give each dataset a template")
    if exp.template is None:
        for ds in exp.datasets.values():
            if ds.template is None:
                v.fail(ds.line, f"datasets.{ds.name}.template", "missing (and no top-level template); name a template")
    if exp.datasets and "dataset" not in exp.axes and len(exp.datasets) > 1:
        v.fail(ln("matrix"), "matrix.dataset", f"several datasets are declared ({', '.join(exp.datasets)}) "
                                               "but no dataset axis; add matrix.dataset")


# --------------------------------------------------------------------------------------------
# expand()
# --------------------------------------------------------------------------------------------

def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def settings_hash(settings: Dict[str, Any]) -> str:
    return hashlib.sha256(canonical(settings).encode()).hexdigest()[:8]


def _short(v: Any) -> str:
    if isinstance(v, float):
        s = f"{v:g}"
    elif isinstance(v, dict):
        s = str(v.get("type", "custom"))
    else:
        s = str(v)
    s = re.sub(r"[^A-Za-z0-9.]+", "_", s).strip("_")
    return s[:24] or "x"


def _readable(cell: Dict[str, Any], varying: List[str]) -> str:
    parts = []
    if "loss" in cell:
        parts.append(_short(cell["loss"]).lower())
    if "dataset" in cell:
        parts.append(_short(cell["dataset"]))
    if "seed" in cell:
        parts.append(f"s{cell['seed']}")
    if "lr" in cell and "lr" in varying:
        parts.append(f"lr{_short(cell['lr'])}")
    for k in cell:
        if k in SPECIAL_AXES or k not in varying:
            continue
        parts.append(f"{k.split('.')[-1]}{_short(cell[k])}")
    return "-".join(parts) or "run"


def _cells(exp: Experiment) -> List[Tuple[Dict[str, Any], str]]:
    names = list(exp.axes)
    out: List[Tuple[Dict[str, Any], str]] = []
    for combo in itertools.product(*(exp.axes[n] for n in names)):
        cell = dict(zip(names, combo))
        if any(all(_same(cell.get(k, _MISSING), v) for k, v in rule.items()) for rule in exp.exclude):
            continue
        out.append((cell, "matrix"))
    for i, rule in enumerate(exp.include):
        free = [n for n in names if n not in rule]
        for combo in itertools.product(*(exp.axes[n] for n in free)):
            cell = dict(rule)
            cell.update(zip(free, combo))
            cell = {k: cell[k] for k in names + [k for k in rule if k not in names]}
            out.append((cell, f"matrix.include[{i}]"))
    return out


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    return a is not _MISSING and canonical(a) == canonical(b)


def _template_path(name: str, base: Path) -> Tuple[str, Optional[str]]:
    """(path for run.json, error) without importing heavy modules."""
    try:
        from ssflctl.plan import render
    except ImportError:  # pragma: no cover - render is part of the package
        render = None
    if render is not None and hasattr(render, "resolve_template"):
        p = Path(name).expanduser()
        if p.suffix == ".py" and not p.is_absolute() and not p.exists() and (base / p).exists():
            name = str(base / p)
        try:
            return str(Path(render.resolve_template(name)).resolve()), None
        except UserError as exc:
            return name, str(exc)
    p = Path(name).expanduser()
    for cand in (p, base / p, Path(__file__).resolve().parents[2] / "templates" / f"{name}.py"):
        if cand.suffix == ".py" and cand.is_file():
            return str(cand.resolve()), None
    return name, f"unknown template {name!r}"


def _template_params(path: str) -> Optional[Dict[str, Any]]:
    try:
        from ssflctl.plan import render
        return dict(render.template_params(path))
    except UserError:
        raise
    except Exception:
        return None


def expand(exp: Experiment, check_paths: bool = True, dry_run: bool = False) -> List[RunSpec]:
    """Expand the matrix into runs with stable ids; validate templates, params and dataset paths.

    A missing dataset directory is an error unless ``dry_run`` (then a warning in ``exp.warnings``).
    """
    v = _V(exp.path)
    base = exp.path.resolve().parent
    cells = _cells(exp)
    if not cells:
        v.fail(exp.lines.get("matrix", 1), "matrix", "the include/exclude rules leave no runs; loosen an exclude rule")
    varying = [k for k, vals in exp.axes.items() if len(vals) > 1]
    for rule in exp.include:
        for k, val in rule.items():
            if k in exp.axes and not any(_same(val, x) for x in exp.axes[k]) and k not in varying:
                varying.append(k)
            elif k not in exp.axes and k not in varying:
                varying.append(k)
    template_cache: Dict[str, Tuple[str, Optional[Dict[str, Any]]]] = {}
    runs: List[RunSpec] = []
    seen: Dict[str, str] = {}
    for cell, origin in cells:
        where = exp.lines.get(origin, exp.lines.get("matrix", 1))
        ds = None
        if "dataset" in cell:
            ds = exp.datasets.get(cell["dataset"]) if isinstance(cell["dataset"], str) else None
            if ds is None:
                v.fail(where, f"{origin}.dataset", f"unknown dataset {cell['dataset']!r}; declare it under datasets:")
        elif len(exp.datasets) == 1:
            ds = next(iter(exp.datasets.values()))
        tkey = "template"
        tname = exp.template
        if ds is not None and ds.template:
            tname, tkey = ds.template, f"datasets.{ds.name}.template"
        if tname not in template_cache:
            tpath, err = _template_path(tname, base)
            if err:
                hint = ""
                try:
                    from ssflctl.plan import render
                    close = difflib.get_close_matches(tname, list(render.list_templates()), n=1, cutoff=0.5)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                except Exception:
                    pass
                msg = err.split(": ", 1)[-1] if err.startswith(str(tname)) else err
                v.fail(exp.lines.get(tkey, 1), tkey, f"{msg}{hint}")
            template_cache[tname] = (tpath, _template_params(tpath))
        tpath, tparams = template_cache[tname]

        params: Dict[str, Any] = dict(exp.params)
        overrides: Dict[str, Any] = dict(exp.overrides)
        resources: Dict[str, Any] = dict(DEFAULT_RESOURCES)
        resources.update(exp.resources)
        root_written = None
        if ds is not None:
            params.update(ds.params)
            overrides.update(ds.overrides)
            resources.update(ds.resources)
            if ds.root is not None:
                root_written = ds.root
        axes_out: Dict[str, Any] = {}
        for k, val in cell.items():
            axes_out[k] = val
            if k == "dataset":
                continue
            if "." in k:
                overrides[k] = val
            else:
                params[k] = val
        # validate params against the template's declared parameters
        if tparams is not None:
            for k in params:
                if k not in tparams:
                    src = _param_source(exp, ds, cell, k)
                    hint = difflib.get_close_matches(k, list(tparams), n=1, cutoff=0.6)
                    sugg = f"did you mean '{hint[0]}'?" if hint else f"it takes: {', '.join(sorted(tparams))}"
                    v.fail(exp.lines.get(src, exp.lines.get(src.rsplit('.', 1)[0], 1)), src,
                           f"not a parameter of template {Path(tpath).stem}; {sugg} (or use a dotted config key)")
        hashed_params = dict(params)
        if root_written is not None:
            hashed_params["data_root"] = root_written
        settings = {"experiment": exp.name, "template": tname, "axes": axes_out, "params": hashed_params,
                    "overrides": overrides, "test": exp.test}
        name = _readable(cell, varying)
        rid = f"{name}-{settings_hash(settings)}"
        if rid in seen:
            v.fail(where, origin, f"this cell {canonical(axes_out)} resolves to the same settings as an earlier one "
                                  f"({seen[rid]}); remove the duplicate (check include rules and repeated values)")
        seen[rid] = origin
        if root_written is not None:
            root_abs = Path(root_written).expanduser()
            if not root_abs.is_absolute():
                root_abs = Path.cwd() / root_abs
            params["data_root"] = str(root_abs.resolve()) + "/"
            if check_paths and not root_abs.is_dir():
                msg = (f"{exp.path}:{exp.lines.get(f'datasets.{ds.name}.root', ds.line)}: datasets.{ds.name}.root: "
                       f"directory {root_written} does not exist (resolved to {root_abs}); "
                       "download/convert the data or fix the path")
                if dry_run:
                    if msg not in exp.warnings:
                        exp.warnings.append(msg)
                else:
                    raise UserError(msg)
        runs.append(RunSpec(
            run_id=rid, name=name, experiment=exp.name, axes=axes_out, template=tpath, template_name=tname,
            params=params, overrides=overrides, resources=resources, retry=dict(exp.retry), test=exp.test,
            dataset_root=params.get("data_root"), line=where,
        ))
    return runs


def _param_source(exp: Experiment, ds: Optional[Dataset], cell: Dict[str, Any], k: str) -> str:
    if k in cell:
        return f"matrix.{k}"
    if ds is not None and k in ds.params:
        return f"datasets.{ds.name}.params.{k}"
    return f"params.{k}"


def executor_kind(exp: Experiment, override: Optional[str] = None) -> str:
    """'slurm' or 'local' for a submission (override from --executor wins)."""
    kind = override or exp.executor.get("type", "auto")
    if kind not in EXECUTOR_TYPES:
        raise UserError(f"--executor: expected slurm, local or auto, got {kind!r}")
    if kind == "auto":
        return "slurm" if slurm_answers() else "local"
    return kind


def slurm_answers(timeout: float = 15.0) -> bool:
    """True when a Slurm controller answers (``sinfo`` lists a partition): having the client
    installed (``sbatch`` on PATH) is not enough for ``auto`` to pick Slurm."""
    import subprocess

    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return False
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and bool(p.stdout.strip())
