"""The experiment file's schema as pydantic models (pydantic v2, ``pydantic>=2`` in pyproject.toml).

``validate(data, path)`` turns the line-numbered data of :mod:`ssflctl.plan.yamlio` into an
:class:`ExperimentModel` or raises one :class:`~ssflctl.errors.UserError` of the form
``<file>:<line>: <key>: <what was expected>``. How:

* Every check raises ``pydantic_core.PydanticCustomError`` carrying its finished message in the
  context (``ctx["message"]``; ``ctx["key"]``, a key or a tuple of keys, extends the location).
* ``ValidationError.errors()`` locations (``("executor", "slurm", "partiton")``) are walked through
  the raw :class:`~ssflctl.plan.yamlio.LDict`/``LList`` data to the line of the deepest key found;
  of several errors the one on the earliest line is reported.
* Unknown keys get a did-you-mean from the model's own field names (:func:`unknown_key_message`).

The values of the template params every template understands (``seed``, ``lr``, ``loss``,
``batch_size``, ``max_epochs``, ...) are checked wherever they are given (``params``, a dataset's
``params``, a matrix axis, an include rule) by :data:`PARAM_RULES`, so ``seed: 4294967296``,
``batch_size: 0``, ``lr: .inf`` or ``loss: fcal`` fail here, at plan time, not on the node.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from ssflctl.errors import UserError
from ssflctl.plan.losses import loss_problem
from ssflctl.plan.yamlio import LDict, LList
from ssflctl.workdir.retry_policy import RetryPolicy, error, unknown_key_message

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")          # used with fullmatch
PARAM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DOTTED_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_0-9][A-Za-z0-9_]*)*")
SPECIAL_AXES = ("loss", "dataset", "seed", "lr")
EXECUTOR_TYPES = ("slurm", "local", "auto")
SEED_MAX = 2 ** 32 - 1  # numpy.random.seed's range, which mmengine's set_random_seed feeds
MAX_RUNS = 10_000       # runs one experiment file may expand to (counted from the axes, before expanding)


# --------------------------------------------------------------------------------------------
# value helpers
# --------------------------------------------------------------------------------------------

def kind(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, str):
        return f"a string ({v[:60]!r})"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def parse_mem(v: Any) -> Optional[float]:
    """'32G', '500M', '1T', 32 (GB) -> GB; None if invalid."""
    if is_num(v) and v > 0 and math.isfinite(v):
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
    if is_int(v) and v > 0:
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


def plain_problem(val: Any, path: Tuple = ()) -> Optional[Tuple[Tuple, str]]:
    """(sub-path, message) when ``val`` is not plain YAML data (no NaN, no timestamps), else None."""
    stack = [(val, path)]
    while stack:
        v, p = stack.pop()
        if is_scalar(v):
            if isinstance(v, float) and v != v:
                return p, "NaN is not a valid value"
        elif isinstance(v, list):
            stack.extend((item, p + (i,)) for i, item in reversed(list(enumerate(v))))
        elif isinstance(v, dict):
            for k, item in reversed(list(v.items())):
                if not isinstance(k, str):
                    return p, f"keys must be strings, got {kind(k)}"
                stack.append((item, p + (k,)))
        else:
            return p, (f"expected plain YAML data (string, number, bool, list, mapping), got {type(v).__name__}; "
                       "quote it")
    return None


def _check_plain(val: Any, path: Tuple = ()) -> None:
    bad = plain_problem(val, path)
    if bad:
        raise error(bad[1], key=bad[0])


# --------------------------------------------------------------------------------------------
# the params every template understands: checked wherever a value is given
# --------------------------------------------------------------------------------------------

def _whole(lo: int, hi: Optional[int] = None, none_ok: bool = False, what: str = "") -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if v is None and none_ok:
            return None
        if is_int(v) and v >= lo and (hi is None or v <= hi):
            return None
        rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        return f"expected a whole number {rng}{what}{' or null' if none_ok else ''}, got {kind(v)}"
    return check


def _positive(v: Any) -> Optional[str]:
    if is_num(v) and v > 0 and math.isfinite(v):
        return None
    return f"expected a positive finite number like 0.01, got {kind(v)}"


def _text(none_ok: bool = True) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if (v is None and none_ok) or (isinstance(v, str) and v.strip()):
            return None
        return f"expected a path (a string), got {kind(v)}"
    return check


def _classes(v: Any) -> Optional[str]:
    if v is None or (isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)):
        return None
    return f"expected a list of class names (or null: read them from the annotation file), got {kind(v)}"


def _bool(v: Any) -> Optional[str]:
    return None if isinstance(v, bool) else f"expected true or false, got {kind(v)}"


#: template param -> check(value) -> problem or None. The params ``ssflctl.plan.render`` sets itself
#: (its ``_HANDLED``), with the types mmengine/mmdet need there.
PARAM_RULES: Dict[str, Callable[[Any], Optional[str]]] = {
    "seed": _whole(0, SEED_MAX, what=" (a random seed)"),
    "lr": _positive,
    "loss": lambda v: loss_problem(v),
    "max_epochs": _whole(1, none_ok=True),
    "max_iters": _whole(1, none_ok=True),
    "batch_size": _whole(1, what=" (images per GPU)"),
    "workers": _whole(0, what=" (dataloader workers)"),
    "val_interval": _whole(0, none_ok=True),
    "log_interval": _whole(1),
    "ckpt_interval": _whole(1),
    "auto_scale_lr": _bool,
    "classes": _classes,
    "load_from": _text(),
    "data_root": _text(),
    **{f"{s}_{k}": _text() for s in ("train", "val", "test") for k in ("ann", "img")},
}


def param_problem(name: str, value: Any) -> Optional[str]:
    """What is wrong with ``value`` for the template param ``name`` (None: fine or not known here)."""
    rule = PARAM_RULES.get(name)
    return rule(value) if rule is not None else None


# --------------------------------------------------------------------------------------------
# field types
# --------------------------------------------------------------------------------------------

def _v(check: Callable[[Any], Any]) -> PlainValidator:
    return PlainValidator(check)


def _word(v: Any) -> Optional[str]:
    if v is not None and (not isinstance(v, str) or not v.strip() or any(c.isspace() for c in v)):
        raise error(f"expected a single word like gpulab02, got {kind(v)}")
    return v


def _opt_int(lo: int, what: str, none_ok: bool = True) -> Callable[[Any], Optional[int]]:
    def check(v: Any) -> Optional[int]:
        if (v is None and none_ok) or (is_int(v) and v >= lo):
            return v
        raise error(f"expected a whole number {what}, got {kind(v)}")
    return check


def _nonempty_str(what: str) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise error(f"expected {what}, got {kind(v)}")
        return v
    return check


def _value_mapping(dotted: bool) -> Callable[[Any], Dict[str, Any]]:
    def check(m: Any) -> Dict[str, Any]:
        if m is None:
            return {}
        if not isinstance(m, dict):
            raise error(f"expected a mapping, got {kind(m)}")
        for k, val in m.items():
            if not isinstance(k, str):
                raise error(f"keys must be strings, got {kind(k)} {k!r}", key=k)
            if dotted and not DOTTED_RE.fullmatch(k):
                raise error("expected a dotted config key like model.bbox_head.loss_cls.gamma", key=k)
            if not dotted and not PARAM_RE.fullmatch(k):
                raise error("expected a template parameter name (letters, digits, _)", key=k)
            _check_plain(val, (k,))
            if not dotted:
                problem = param_problem(k, val)
                if problem:
                    raise error(problem, key=k)
        return m
    return check


Params = Annotated[Dict[str, Any], _v(_value_mapping(dotted=False))]
Overrides = Annotated[Dict[str, Any], _v(_value_mapping(dotted=True))]


class _Model(BaseModel):
    """Unknown keys -> did-you-mean; ``null`` -> the defaults; not a mapping -> what was expected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, arbitrary_types_allowed=True)
    what: ClassVar[str] = "a mapping"

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise error(f"expected {cls.what}, got {kind(data)}", kind="not_mapping")
        allowed = [f.alias or name for name, f in cls.model_fields.items()]
        for k in data:
            if not isinstance(k, str):
                raise error(f"keys must be strings, got {kind(k)} {k!r}", key=k)
            if k not in allowed:
                raise error(unknown_key_message(k, allowed), key=k, kind="unknown_key")
        return data

    def given(self) -> Dict[str, Any]:
        """The fields written in the file (by their YAML names), in the model's order."""
        return {(f.alias or n): getattr(self, n) for n, f in type(self).model_fields.items()
                if n in self.model_fields_set}


def _gpus(v: Any) -> int:
    if not is_int(v) or v < 0:
        raise error(f"expected a whole number >= 0, got {kind(v)}")
    return v


def _cpus(v: Any) -> int:
    if not is_int(v) or v < 1:
        raise error(f"expected a whole number >= 1, got {kind(v)}")
    return v


def _mem(v: Any) -> float:
    gb = parse_mem(v)
    if gb is None:
        raise error(f"expected a memory size like 32G or 500M (or GB as a number), got {kind(v)}")
    return round(gb, 3)


def _time(v: Any) -> int:
    mins = parse_time(v)
    if mins is None:
        raise error("expected a time limit like '24:00:00', '1-02:00:00', '90m' or minutes as a whole number, "
                    f"got {kind(v)}")
    return mins


class Resources(_Model):
    gpus: Annotated[int, _v(_gpus)] = 0
    cpus: Annotated[int, _v(_cpus)] = 1
    nodes: Annotated[int, _v(_cpus)] = 1   # gpus is per node: nodes × gpus tasks, one per GPU
    mem: Annotated[float, _v(_mem)] = 8.0
    time: Annotated[int, _v(_time)] = 60

    def as_dict(self) -> Dict[str, Any]:
        """Only what the file sets, as run.json's keys (gpus, cpus, mem_gb, time_min)."""
        names = {"mem": "mem_gb", "time": "time_min"}
        return {names.get(k, k): v for k, v in self.given().items()}


class Dataset(_Model):
    what: ClassVar[str] = "a mapping with root and optionally template"
    root: Annotated[Optional[str], _v(_nonempty_str("a directory path"))] = None
    template: Annotated[Optional[str], _v(_nonempty_str("a template name or a config path"))] = None
    params: Params = Field(default_factory=dict)
    overrides: Overrides = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"root": data} if isinstance(data, str) else data  # name: root


def _sbatch(m: Any) -> Dict[str, Any]:
    if m is None:
        return {}
    if not isinstance(m, dict):
        raise error(f"expected a mapping of sbatch option -> value (e.g. mail-type: END), got {kind(m)}")
    for opt, oval in m.items():
        if not isinstance(opt, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", opt):
            raise error("expected an sbatch long option name without '--'", key=opt)
        if not is_scalar(oval) or oval is None:
            raise error(f"expected a string or number, got {kind(oval)}", key=opt)
    return {str(a).replace("-", "_"): b for a, b in m.items()}


def _setup(v: Any) -> List[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise error("expected a list of shell lines run before the job (e.g. source .venv/bin/activate)")
    return list(v)


class Slurm(_Model):
    partition: Annotated[Optional[str], _v(_word)] = None
    qos: Annotated[Optional[str], _v(_word)] = None
    account: Annotated[Optional[str], _v(_word)] = None
    gres: Annotated[Optional[str], _v(_word)] = None
    constraint: Annotated[Optional[str], _v(_word)] = None
    array_parallelism: Annotated[Optional[int], _v(_opt_int(1, ">= 1 (the %N throttle of the job array)"))] = None
    max_num_timeout: Annotated[int, _v(_opt_int(
        0, ">= 0 (how many times a run that reaches its time limit is requeued to resume from its checkpoint)",
        none_ok=False))] = 3
    signal_delay_s: Annotated[Optional[int], _v(_opt_int(
        1, "of seconds >= 1 (how long before the time limit Slurm sends SIGUSR2 to checkpoint and requeue)"))] = None
    sbatch: Annotated[Dict[str, Any], _v(_sbatch)] = Field(default_factory=dict)
    setup: Annotated[List[str], _v(_setup)] = Field(default_factory=list)


class Local(_Model):
    max_parallel: Annotated[int, _v(_opt_int(1, ">= 1", none_ok=False))] = 1


def _executor_type(v: Any) -> str:
    if v not in EXECUTOR_TYPES:
        hint = difflib.get_close_matches(str(v), EXECUTOR_TYPES, n=1, cutoff=0.5)
        raise error(f"expected one of slurm, local, auto, got {kind(v)}" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    return v


class Executor(_Model):
    type: Annotated[str, _v(_executor_type)] = "auto"
    slurm: Slurm = Field(default_factory=Slurm)
    local: Local = Field(default_factory=Local)

    def as_dict(self) -> Dict[str, Any]:
        return {"type": self.type, "slurm": self.slurm.given(), "local": self.local.given()}


# --------------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------------

class Matrix(BaseModel):
    """Axes (name -> values) and the include/exclude rules, as written (validated by :func:`_matrix`)."""

    axes: Dict[str, List[Any]]
    include: List[Dict[str, Any]] = []
    exclude: List[Dict[str, Any]] = []


def _axis_value_problem(axis: str, val: Any) -> Optional[str]:
    if axis == "seed" and not (is_int(val) and 0 <= val <= SEED_MAX):
        return f"expected whole numbers from 0 to {SEED_MAX}, got {kind(val)}"
    if axis == "lr" and not (is_num(val) and val > 0 and math.isfinite(val)):
        return f"expected positive finite numbers like 0.01, got {kind(val)}"
    if axis == "loss" and not isinstance(val, (str, dict)):
        return f"expected loss names (focal, ssfl, gfl) or loss_cls mappings, got {kind(val)}"
    if axis == "dataset":
        return None if isinstance(val, str) else f"expected dataset names, got {kind(val)}"
    return param_problem(axis, val)


def _canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _same(a: Any, b: Any) -> bool:
    """The rule expansion matches exclude rules by (``ssflctl.plan.spec._same``): equal canonical JSON."""
    return _canonical(a) == _canonical(b)


def _axes(mat: Dict[str, Any]) -> Dict[str, List[Any]]:
    axes: Dict[str, List[Any]] = {}
    for ax, vals in mat.items():
        if ax in ("include", "exclude"):
            continue
        if not isinstance(ax, str) or not DOTTED_RE.fullmatch(ax):
            raise error("expected an axis name (loss, dataset, seed, lr, a template parameter, or a dotted "
                        "config key like model.bbox_head.loss_cls.gamma)", key=ax)
        if not isinstance(vals, list):
            vals = [vals]
        if len(vals) == 0:
            raise error("empty axis; give at least one value or remove the axis", key=ax)
        seen: set = set()
        for i, val in enumerate(vals):
            at = (ax, i) if isinstance(mat[ax], list) else (ax,)
            _check_plain(val, at)
            ident = (type(val).__name__, _canonical(val))
            if ident in seen:
                raise error(f"value {val!r} is listed twice; list each value once", key=at)
            seen.add(ident)
            problem = _axis_value_problem(ax, val)
            if problem:
                raise error(problem, key=at)
        axes[ax] = list(vals)
    if not axes:
        raise error("no axes; give at least one, e.g. loss: [focal, ssfl]")
    return axes


def _rules(mat: Dict[str, Any], rule: str, axes: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    items = mat[rule]
    if isinstance(items, dict):
        items = [items]
        at = lambda i: (rule,)  # noqa: E731
    else:
        at = lambda i: (rule, i)  # noqa: E731
    if not isinstance(items, list):
        raise error("expected a list of {axis: value} mappings, got " + kind(items), key=rule)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise error(f"expected a mapping of axis -> value, got {kind(item)}", key=at(i))
        if not item:
            raise error("empty rule; name at least one axis value", key=at(i))
        for k, val in item.items():
            if not isinstance(k, str):
                raise error(f"keys must be strings, got {kind(k)} {k!r}", key=at(i))
            if rule == "exclude" and k not in axes:
                hint = difflib.get_close_matches(k, list(axes), n=1, cutoff=0.6)
                sugg = f"did you mean '{hint[0]}'?" if hint else f"axes are: {', '.join(axes)}"
                raise error(f"not an axis of the matrix; {sugg}", key=at(i) + (k,))
            if rule == "include" and k not in axes and k not in SPECIAL_AXES and "." not in k:
                hint = difflib.get_close_matches(k, list(axes) + list(SPECIAL_AXES), n=1, cutoff=0.6)
                if hint:
                    raise error(f"not an axis of the matrix; did you mean '{hint[0]}'?", key=at(i) + (k,))
            if isinstance(val, (list, dict)) and not (k == "loss" and isinstance(val, dict)):
                raise error(f"expected one value, got {kind(val)}", key=at(i) + (k,))
            _check_plain(val, at(i) + (k,))
            if rule == "exclude" and not any(_same(val, x) for x in axes[k]):
                shown = ", ".join(repr(x) if isinstance(x, str) else str(x) for x in axes[k][:20])
                raise error(f"{val!r} is not a value of the axis; it has: {shown}", key=at(i) + (k,))
            if rule == "include":
                problem = _axis_value_problem(k, val)
                if problem:
                    raise error(problem, key=at(i) + (k,))
        out.append(dict(item))
    return out


#: the config subtrees a test cell may change: read only by the test loop (and validation), never by
#: training, so a trained checkpoint can be tested under every value (test_matrix:)
TEST_KEY_PREFIXES = ("model.test_cfg", "test_cfg", "test_evaluator", "test_dataloader")


def is_test_key(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in TEST_KEY_PREFIXES)


def _test_matrix(mat: Any) -> Optional[Matrix]:
    """``test_matrix:``: the matrix syntax, restricted to keys that do not affect training."""
    if mat is None:
        return None
    if not isinstance(mat, dict):
        raise error(f"expected a mapping of test-time config key -> list of values, got {kind(mat)}")
    for ax in mat:
        if ax in ("include", "exclude") or not isinstance(ax, str):
            continue
        if not is_test_key(ax):
            raise error("changes training (or is not a test-time config key): move it to matrix:; test_matrix "
                        f"takes only dotted keys under {', '.join(TEST_KEY_PREFIXES)} (e.g. "
                        "model.test_cfg.nms.iou_threshold, model.test_cfg.score_thr)", key=ax)
    axes = _axes(mat)
    rules = {r: _rules(mat, r, axes) if r in mat else [] for r in ("include", "exclude")}
    for rule in rules["include"]:
        for k in rule:
            if not is_test_key(k):
                raise error("changes training: move it to matrix:", key=("include", k))
    count = math.prod(len(v) for v in axes.values()) + sum(
        math.prod(len(v) for k, v in axes.items() if k not in rule) for rule in rules["include"])
    if count > MAX_RUNS:
        raise error(f"{count} test cells per run, more than {MAX_RUNS}; split the study")
    return Matrix(axes=axes, **rules)


def _matrix(mat: Any) -> Matrix:
    if not isinstance(mat, dict):
        raise error(f"expected a mapping of axis -> list of values, got {kind(mat)}")
    axes = _axes(mat)
    rules = {r: _rules(mat, r, axes) if r in mat else [] for r in ("include", "exclude")}
    count = math.prod(len(v) for v in axes.values())
    for rule in rules["include"]:
        count += math.prod(len(v) for k, v in axes.items() if k not in rule)
    if count > MAX_RUNS:
        raise error(f"{count} runs (the product of the axes' lengths, plus include rules), more than the "
                    f"{MAX_RUNS} an experiment file may plan; split the study into several files")
    return Matrix(axes=axes, **rules)


# --------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------

def _name(v: Any) -> str:
    if not isinstance(v, str) or not NAME_RE.fullmatch(v):
        raise error(f"expected a name of letters, digits, '_', '.', '-', got {kind(v)}")
    return v


def _datasets(m: Any) -> Dict[str, Any]:
    if m is None:
        return {}
    if not isinstance(m, dict):
        raise error(f"expected a mapping of dataset name -> {{root, template}}, got {kind(m)}")
    return m


def _dataset_name(k: Any) -> str:
    if not isinstance(k, str) or not NAME_RE.fullmatch(k):
        raise error("expected a dataset name of letters, digits, '_', '.', '-'")
    return k


def _test(v: Any) -> bool:
    if not isinstance(v, bool):
        raise error(f"expected true or false, got {kind(v)}")
    return v


def _description(v: Any) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise error(f"expected a string, got {kind(v)}")
    return v


MISSING = {
    "name": "missing; give the experiment a name like ssfl_vs_fl",
    "matrix": "missing; list the axes, e.g. matrix: {loss: [focal, ssfl], seed: [3407]}",
}


class ExperimentModel(_Model):
    what: ClassVar[str] = "a mapping of experiment keys (name, template, matrix, ...)"
    name: Annotated[str, _v(_name)]
    description: Annotated[str, _v(_description)] = ""
    template: Annotated[Optional[str], _v(_nonempty_str("a template name (see templates/) or a config path"))] = None
    datasets: Annotated[Dict[Annotated[str, _v(_dataset_name)], Dataset], BeforeValidator(_datasets)] = Field(
        default_factory=dict)
    matrix: Annotated[Matrix, _v(_matrix)]
    params: Params = Field(default_factory=dict)
    overrides: Overrides = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    executor: Executor = Field(default_factory=Executor)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    test: Annotated[bool, _v(_test)] = True
    test_matrix: Annotated[Optional[Matrix], _v(_test_matrix)] = None

    @model_validator(mode="after")
    def _cross(self) -> "ExperimentModel":
        axes = self.matrix.axes
        if self.test_matrix is not None:
            if not self.test:
                raise error("test: false leaves nothing to test; remove test_matrix or set test: true",
                            key=("test_matrix",))
            for ax in self.test_matrix.axes:
                if ax in axes:
                    raise error("already an axis of matrix:; list it in one of the two", key=("test_matrix", ax))
        for i, val in enumerate(axes.get("dataset", [])):
            if val not in self.datasets:
                hint = difflib.get_close_matches(str(val), list(self.datasets), n=1, cutoff=0.6)
                sugg = f"did you mean '{hint[0]}'?" if hint else (
                    f"declare it under datasets: ({', '.join(self.datasets) or 'none declared'})")
                raise error(f"unknown dataset {val!r}; {sugg}", key=("matrix", "dataset", i))
        for i, rule in enumerate(self.matrix.include):
            if "dataset" in rule and rule["dataset"] not in self.datasets:
                raise error(f"unknown dataset {rule['dataset']!r}; declare it under datasets:",
                            key=("matrix", "include", i, "dataset"))
        if self.template is None and not self.datasets:
            raise error("missing; name a template (see templates/) or give each dataset a template", key=("template",))
        if self.template is None:
            for name, ds in self.datasets.items():
                if ds.template is None:
                    raise error("missing (and no top-level template); name a template",
                                key=("datasets", name, "template"))
        if len(self.datasets) > 1 and "dataset" not in axes:
            raise error(f"several datasets are declared ({', '.join(self.datasets)}) but no dataset axis; "
                        "add matrix.dataset", key=("matrix", "dataset"))
        return self


# --------------------------------------------------------------------------------------------
# ValidationError -> file:line: key: message
# --------------------------------------------------------------------------------------------

def line_of(raw: Any, loc: Tuple) -> int:
    """The line of the deepest key of ``loc`` found in the line-numbered data (1 at worst)."""
    cur, line = raw, getattr(raw, "line", 0) or 1
    for part in loc:
        if isinstance(cur, LDict) and part in cur.lines:
            line, cur = cur.lines[part], cur[part]
        elif isinstance(cur, LList) and isinstance(part, int) and 0 <= part < len(cur):
            line, cur = cur.lines[part], cur[part]
        else:
            break
    return line


def _loc(err: Dict[str, Any]) -> Tuple:
    loc = tuple(p for p in err["loc"] if p != "[key]")
    key = (err.get("ctx") or {}).get("key")
    if key is not None:
        loc += key if isinstance(key, tuple) else (key,)
    return loc


def show_key(k: Any) -> str:
    """A key as the message shows it: plain when it is one printable word, else quoted (one line)."""
    s = str(k)
    return s if s and s.isprintable() and not any(c.isspace() for c in s) else repr(k)


def dotted(loc: Tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{show_key(p)}" if out else show_key(p))
    return out


def _message(err: Dict[str, Any], loc: Tuple) -> str:
    ctx = err.get("ctx") or {}
    if "message" in ctx:
        return ctx["message"]
    if err["type"] == "missing" and loc and loc[-1] in MISSING:
        return MISSING[str(loc[-1])]
    if err["type"] == "missing":
        return "missing"
    return err["msg"]


def validate(data: Any, path) -> ExperimentModel:
    """Line-numbered YAML data -> ExperimentModel, or a UserError ``file:line: key: message``."""
    if data is None:
        raise UserError(f"{path}:1: the experiment file is empty; it needs at least 'name', 'template' or "
                        "'datasets', and 'matrix'")
    try:
        return ExperimentModel.model_validate(data)
    except ValidationError as exc:
        found = []
        for err in exc.errors(include_url=False):
            loc = _loc(err)
            found.append((line_of(data, loc), loc, _message(err, loc)))
        line, loc, msg = min(found, key=lambda f: f[0])
        key = dotted(loc)
        more = f" (and {len(found) - 1} more problem{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        raise UserError(f"{path}:{line}: {key}: {msg}{more}" if key else f"{path}:{line}: {msg}{more}") from None
