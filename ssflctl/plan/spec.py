"""Experiment files: YAML -> validated `Experiment` -> expanded `RunSpec`s with stable ids.

Every error is a `UserError` of the form ``<file>:<line>: <key>: <what was expected>`` with a
near-miss suggestion for misspelt keys. Nothing here imports heavy modules (nor ``plan.render`` or
``ssflctl.node``). The parts: ``plan/yamlio.py`` (line-numbered YAML, YAML 1.2 numbers, limits),
``plan/schema.py`` (the pydantic models and the values every template understands),
``plan/templates.py`` (template lookup, ast only), ``plan/losses.py`` (loss names and keywords);
this module builds the `Experiment` and expands it into `RunSpec`s (ids: a hash of the settings,
unchanged by the schema rewrite; see tests/test_plan_schema.py::test_run_ids_do_not_change).

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
    overrides: {train_cfg.val_interval: 1}  # config keys, dotted or nested: merged as mmengine
                                            #   merges a config into its _base_ (plan/overrides.py)
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

from ssflctl.errors import UserError
from ssflctl.plan import schema, templates
from ssflctl.plan.losses import LOSSES, LOSS_KWARGS, kwarg_problem, loss_problem
from ssflctl.plan.schema import (EXECUTOR_TYPES, MAX_RUNS, NAME_RE, SPECIAL_AXES, parse_mem,  # noqa: F401
                                 parse_time)
from ssflctl.plan.yamlio import LDict, LList, load_yaml, looks_like_number  # noqa: F401

DEFAULT_RESOURCES = {"gpus": 0, "cpus": 1, "mem_gb": 8, "time_min": 60}


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
    # test_matrix: test-time axes whose cells share their train cell's run (no retraining)
    test_axes: Dict[str, List[Any]] = field(default_factory=dict)
    test_include: List[Dict[str, Any]] = field(default_factory=list)
    test_exclude: List[Dict[str, Any]] = field(default_factory=list)
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
class TestSpec:
    """One test cell of a run: its test-time axes (dotted config keys) applied to the trained
    checkpoint's config by the test job. ``test_id`` = ``<readable>-<8 hex of (run id, axes)>``: it
    does not change when other test values are added, and the run id does not change at all."""
    test_id: str
    name: str
    run_id: str
    axes: Dict[str, Any]

    @property
    def overrides(self) -> Dict[str, Any]:
        return dict(self.axes)

    def cell_json(self) -> Dict[str, Any]:
        return {"test_id": self.test_id, "name": self.name, "run_id": self.run_id, "axes": self.axes,
                "overrides": self.overrides}


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
    tests: List[TestSpec] = field(default_factory=list)   # test_matrix cells (then ``test`` is False)

    def run_json(self) -> Dict[str, Any]:
        body = {
            "run_id": self.run_id, "name": self.name, "experiment": self.experiment, "axes": self.axes,
            "template": self.template, "params": self.params, "overrides": self.overrides,
            "resources": self.resources, "retry": self.retry, "test": self.test,
        }
        if self.tests:
            body["test_cells"] = [t.test_id for t in self.tests]
        return body


# --------------------------------------------------------------------------------------------
# load(): read -> parse -> validate (schema.py) -> build the Experiment
# --------------------------------------------------------------------------------------------

def _fail(path: Path, line: int, key: str, msg: str) -> None:
    raise UserError(f"{path}:{line}: {key}: {msg}" if key else f"{path}:{line}: {msg}")


def _record_lines(raw: Any) -> Dict[str, int]:
    """``"matrix.loss" -> line`` for every key of every mapping (and ``matrix.include[i]`` items)."""
    lines: Dict[str, int] = {}
    stack: List[Tuple[str, Any]] = [("", raw)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, LDict):
            for k, ln in node.lines.items():
                key = f"{prefix}{k}"
                lines[key] = ln
                stack.append((key + ".", node[k]))
        elif isinstance(node, LList) and prefix in ("matrix.include.", "matrix.exclude.", "test_matrix.include.",
                                                     "test_matrix.exclude."):
            for i, ln in enumerate(node.lines):
                lines[f"{prefix[:-1]}[{i}]"] = ln
    return lines


def _build(path: Path, m: schema.ExperimentModel, raw: LDict) -> Experiment:
    lines = _record_lines(raw)
    datasets = {
        name: Dataset(name=name, root=ds.root, template=ds.template, params=dict(ds.params),
                      overrides=dict(ds.overrides), resources=ds.resources.as_dict(),
                      line=lines.get(f"datasets.{name}", 1))
        for name, ds in m.datasets.items()
    }
    return Experiment(
        name=m.name, path=path, template=m.template, datasets=datasets, axes=m.matrix.axes,
        include=m.matrix.include, exclude=m.matrix.exclude, params=dict(m.params), overrides=dict(m.overrides),
        resources=m.resources.as_dict(), executor=m.executor.as_dict(), retry=m.retry.to_dict(), test=m.test,
        description=m.description, lines=lines,
        test_axes=m.test_matrix.axes if m.test_matrix is not None else {},
        test_include=m.test_matrix.include if m.test_matrix is not None else [],
        test_exclude=m.test_matrix.exclude if m.test_matrix is not None else [],
    )


def load(path) -> Experiment:
    """Read and validate an experiment file (structure only; templates and data are checked by `expand`).

    Steps: :func:`yamlio.load_yaml` (size/encoding limits, YAML 1.2 numbers, line numbers, alias and
    depth limits) -> :func:`schema.validate` (pydantic models, ``file:line: key: ...`` errors, the
    matrix size limit) -> :func:`_build` (the `Experiment` the rest of ssflctl uses).
    """
    path = Path(path)
    raw = load_yaml(path)
    model = schema.validate(raw, path)
    return _build(path, model, raw)

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
    return _grid(exp.axes, exp.include, exp.exclude, "matrix")


def _grid(axes: Dict[str, List[Any]], include: List[Dict[str, Any]], exclude: List[Dict[str, Any]],
          block: str) -> List[Tuple[Dict[str, Any], str]]:
    names = list(axes)
    out: List[Tuple[Dict[str, Any], str]] = []
    for combo in itertools.product(*(axes[n] for n in names)):
        cell = dict(zip(names, combo))
        if any(all(_same(cell.get(k, _MISSING), v) for k, v in rule.items()) for rule in exclude):
            continue
        out.append((cell, block))
    for i, rule in enumerate(include):
        free = [n for n in names if n not in rule]
        for combo in itertools.product(*(axes[n] for n in free)):
            cell = dict(rule)
            cell.update(zip(free, combo))
            cell = {k: cell[k] for k in names + [k for k in rule if k not in names]}
            out.append((cell, f"{block}.include[{i}]"))
    return out


def _test_cells(exp: Experiment, run_id: str, tpath: str) -> List[TestSpec]:
    """The run's test cells (test_matrix), each value checked against the template's type."""
    if not exp.test_axes:
        return []
    out: List[TestSpec] = []
    seen: Dict[str, str] = {}
    for cell, origin in _grid(exp.test_axes, exp.test_include, exp.test_exclude, "test_matrix"):
        for key, val in cell.items():
            for leaf, v in _leaves(key, val):
                current = templates.template_value(tpath, leaf)
                if current is not templates.UNKNOWN:
                    problem = _type_problem(v, current, f"the template has {current!r}")
                    if problem:
                        _fail(exp.path, _line(exp, f"test_matrix.{key}"), f"test_matrix.{key}", problem)
        name = "-".join(f"{k.split('.')[-1]}{_short(v)}" for k, v in cell.items()) or "test"
        tid = f"{name}-{settings_hash({'run_id': run_id, 'test': cell})}"
        if tid in seen:
            _fail(exp.path, exp.lines.get(origin, exp.lines.get("test_matrix", 1)), origin,
                  f"this test cell {canonical(cell)} repeats an earlier one ({seen[tid]}); remove the duplicate")
        seen[tid] = origin
        out.append(TestSpec(test_id=tid, name=name, run_id=run_id, axes=cell))
    return out


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    return a is not _MISSING and canonical(a) == canonical(b)


def _template_path(name: str, base: Path) -> Tuple[str, Optional[str]]:
    """(path for run.json, error) without importing heavy modules."""
    p = Path(name).expanduser()
    if p.suffix == ".py" and not p.is_absolute() and not p.exists() and (base / p).exists():
        name = str(base / p)
    try:
        return str(Path(templates.resolve_template(name)).resolve()), None
    except UserError as exc:
        return name, str(exc)


def _template(exp: Experiment, tname: str, tkey: str, base: Path) -> Tuple[str, Dict[str, Any]]:
    """(resolved path, declared params) of a template, or a UserError at the line naming it."""
    tpath, err = _template_path(tname, base)
    if err:
        close = difflib.get_close_matches(tname, templates.list_templates(), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        msg = err.split(": ", 1)[-1] if err.startswith(str(tname)) else err
        _fail(exp.path, exp.lines.get(tkey, 1), tkey, f"{msg}{hint}")
    return tpath, dict(templates.template_params(tpath))


def _line(exp: Experiment, key: str) -> int:
    return exp.lines.get(key) or exp.lines.get(key.rsplit(".", 1)[0], 1)


def _check_params(exp: Experiment, ds: Optional[Dataset], cell: Dict[str, Any], params: Dict[str, Any],
                  tpath: str, tparams: Dict[str, Any]) -> None:
    """Every param is declared by the template, and a number where the template's default is one."""
    for k, val in params.items():
        src = _param_source(exp, ds, cell, k)
        if k not in tparams:
            hint = difflib.get_close_matches(k, list(tparams), n=1, cutoff=0.6)
            sugg = f"did you mean '{hint[0]}'?" if hint else f"it takes: {', '.join(sorted(tparams))}"
            _fail(exp.path, _line(exp, src), src,
                  f"not a parameter of template {Path(tpath).stem}; {sugg} (or use a dotted config key)")
        problem = _type_problem(val, tparams[k], f"the template's default is {tparams[k]!r}")
        if problem:
            _fail(exp.path, _line(exp, src), src, problem)


def _type_problem(val: Any, current: Any, what: str) -> Optional[str]:
    """A string where the config holds a number (``'5e-4'`` quoted): mmengine would compare a str."""
    if isinstance(val, str) and schema.is_num(current):
        hint = f"; write it unquoted ({val.strip()})" if looks_like_number(val) else ""
        return f"expected a number ({what}), got {schema.kind(val)}{hint}"
    return None


def _loss_type(params: Dict[str, Any], tpath: str) -> Optional[str]:
    loss = params.get("loss")
    if isinstance(loss, str):
        return LOSSES.get(loss.strip().lower(), {}).get("type")
    if isinstance(loss, dict):
        return str(loss.get("type", "")).split(".")[-1] or None
    t = templates.template_value(tpath, "model.bbox_head.loss_cls.type")
    return t.split(".")[-1] if isinstance(t, str) else None


def _leaves(key: str, val: Any):
    """Dotted leaves of an override (a nested mapping names its keys as dotted ones would)."""
    stack = [(key, val)]
    while stack:
        k, v = stack.pop()
        if isinstance(v, dict) and v and "type" not in v and all(isinstance(x, str) for x in v):
            stack.extend((f"{k}.{x}", y) for x, y in v.items())
        else:
            yield k, v


def _check_overrides(exp: Experiment, ds: Optional[Dataset], cell: Dict[str, Any], overrides: Dict[str, Any],
                     params: Dict[str, Any], tpath: str) -> None:
    """Types against the template's own literal values; loss keywords against the loss class."""
    loss_type = _loss_type(params, tpath)
    for key, val in overrides.items():
        src = f"matrix.{key}" if key in cell else (
            f"datasets.{ds.name}.overrides.{key}" if ds is not None and key in ds.overrides else f"overrides.{key}")
        for leaf, v in _leaves(key, val):
            parent, _, kw = leaf.rpartition(".")
            at = src + leaf[len(key):]  # the nested key's own line (exp.lines has every nested key)
            line = int(exp.where(at).rsplit(":", 1)[1])
            if kw == "_delete_":  # mmengine's replace-instead-of-merge mark (plan/overrides.py)
                continue
            if isinstance(v, dict):
                v = {k: x for k, x in v.items() if k != "_delete_"}
            if parent.split(".")[-1] == "loss_cls":
                if kw == "type":
                    continue
                allowed = LOSS_KWARGS.get(loss_type or "")
                if allowed is not None and kw not in allowed:
                    _fail(exp.path, line, at, kwarg_problem(kw, allowed, loss_type))
            elif leaf.split(".")[-1] == "loss_cls" and isinstance(v, dict):
                problem = loss_problem(v)
                if problem:
                    _fail(exp.path, line, at, problem)
            current = templates.template_value(tpath, leaf)
            if current is not templates.UNKNOWN:
                problem = _type_problem(v, current, f"the template has {current!r}")
                if problem:
                    _fail(exp.path, line, at, problem)


def expand(exp: Experiment, check_paths: bool = True, dry_run: bool = False) -> List[RunSpec]:
    """Expand the matrix into runs with stable ids; validate templates, params and dataset paths.

    A missing dataset directory is an error unless ``dry_run`` (then a warning in ``exp.warnings``).
    """
    base = exp.path.resolve().parent
    cells = _cells(exp)
    if not cells:
        _fail(exp.path, exp.lines.get("matrix", 1), "matrix", "the include/exclude rules leave no runs; "
                                                             "loosen an exclude rule")
    varying = _varying(exp)
    template_cache: Dict[str, Tuple[str, Dict[str, Any]]] = {}
    runs: List[RunSpec] = []
    seen: Dict[str, str] = {}
    for cell, origin in cells:
        where = exp.lines.get(origin, exp.lines.get("matrix", 1))
        ds = _dataset_of(exp, cell, where, origin)
        tname, tkey = exp.template, "template"
        if ds is not None and ds.template:
            tname, tkey = ds.template, f"datasets.{ds.name}.template"
        if tname not in template_cache:
            template_cache[tname] = _template(exp, tname, tkey, base)
        tpath, tparams = template_cache[tname]
        params, overrides, resources, axes_out = _merge(exp, ds, cell)
        _check_params(exp, ds, cell, params, tpath, tparams)
        _check_overrides(exp, ds, cell, overrides, params, tpath)
        root_written = ds.root if ds is not None else None
        hashed_params = dict(params)
        if root_written is not None:
            hashed_params["data_root"] = root_written
        settings = {"experiment": exp.name, "template": tname, "axes": axes_out, "params": hashed_params,
                    "overrides": overrides, "test": exp.test}
        name = _readable(cell, varying)
        rid = f"{name}-{settings_hash(settings)}"
        if rid in seen:
            _fail(exp.path, where, origin, f"this cell {canonical(axes_out)} resolves to the same settings as an "
                                           f"earlier one ({seen[rid]}); remove the duplicate (check include rules "
                                           "and repeated values)")
        seen[rid] = origin
        if root_written is not None:
            params["data_root"] = _data_root(exp, ds, check_paths, dry_run)
        tests = _test_cells(exp, rid, tpath)
        runs.append(RunSpec(
            run_id=rid, name=name, experiment=exp.name, axes=axes_out, template=tpath, template_name=tname,
            params=params, overrides=overrides, resources=resources, retry=dict(exp.retry),
            # with test cells the run's own test step is theirs (the settings hash keeps exp.test: the
            # run id does not change when test axes are added)
            test=exp.test and not tests, dataset_root=params.get("data_root"), line=where, tests=tests,
        ))
    return runs


def _varying(exp: Experiment) -> List[str]:
    varying = [k for k, vals in exp.axes.items() if len(vals) > 1]
    for rule in exp.include:
        for k, val in rule.items():
            if k in exp.axes and not any(_same(val, x) for x in exp.axes[k]) and k not in varying:
                varying.append(k)
            elif k not in exp.axes and k not in varying:
                varying.append(k)
    return varying


def _dataset_of(exp: Experiment, cell: Dict[str, Any], where: int, origin: str) -> Optional[Dataset]:
    if "dataset" in cell:
        ds = exp.datasets.get(cell["dataset"]) if isinstance(cell["dataset"], str) else None
        if ds is None:
            _fail(exp.path, where, f"{origin}.dataset", f"unknown dataset {cell['dataset']!r}; declare it under datasets:")
        return ds
    if len(exp.datasets) == 1:
        return next(iter(exp.datasets.values()))
    return None


def _merge(exp: Experiment, ds: Optional[Dataset], cell: Dict[str, Any]):
    """(params, overrides, resources, axes) of one cell: experiment < dataset < the cell's axes."""
    params: Dict[str, Any] = dict(exp.params)
    overrides: Dict[str, Any] = dict(exp.overrides)
    resources: Dict[str, Any] = dict(DEFAULT_RESOURCES)
    resources.update(exp.resources)
    if ds is not None:
        params.update(ds.params)
        overrides.update(ds.overrides)
        resources.update(ds.resources)
    axes_out: Dict[str, Any] = {}
    for k, val in cell.items():
        axes_out[k] = val
        if k == "dataset":
            continue
        if "." in k:
            overrides[k] = val
        else:
            params[k] = val
    return params, overrides, resources, axes_out


def _data_root(exp: Experiment, ds: Dataset, check_paths: bool, dry_run: bool) -> str:
    root_abs = Path(ds.root).expanduser()
    if not root_abs.is_absolute():
        root_abs = Path.cwd() / root_abs
    if check_paths and not root_abs.is_dir():
        msg = (f"{exp.path}:{exp.lines.get(f'datasets.{ds.name}.root', ds.line)}: datasets.{ds.name}.root: "
               f"directory {ds.root} does not exist (resolved to {root_abs}); "
               "download/convert the data or fix the path")
        if not dry_run:
            raise UserError(msg)
        if msg not in exp.warnings:
            exp.warnings.append(msg)
    return str(root_abs.resolve()) + "/"


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
