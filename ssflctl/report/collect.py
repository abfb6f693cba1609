"""Gather run records for the report: the registry, run directories, outside mmdet work dirs.

A *run record* is a plain dict (no pandas here: collect runs over thousands of runs and must be
fast, so it reads small JSON files directly and builds nothing per run but dicts):

```
{"run_id", "experiment", "name", "axes": {...}, "source": "ssflctl"|"workdir",
 "state": "done"|"pending"|"queued"|"running"|"failed"|"cancelled"|"unknown"|"missing",
 "reason": "one line", "run_dir": str|None,
 "attempts": [{"attempt", "lr", "lr_effective", "lr_scale", "state", "reason", "dir", "nan": {...}|None}],
 "final": attempt number the metrics come from, or None,
 "metrics": {"bbox": {AP..ARl[, "VOC mAP@0.5"]: fraction|None}, "per_class": {...}, "evaluator": str}
            or None,
 "unavailable": {metric: "why"} (metrics the evaluator did not produce, e.g. AR1 from CocoMetric)}
```
Outside work dirs (source "workdir", report/mmdet_workdir.py) add "segm" to "metrics" when the
run has mask numbers, "provenance" (timestamp, split, epoch/iter, checkpoint, pick), "config"
(the training run's seed, lr, optimizer, batch size, max epochs) and "progress", and may have the
states "unfinished" (with numbers) and "unreadable" (reason says why).

An attempt's "lr" is its config lr (attempt.json); "lr_effective" the base lr its optimizer trained
at as the job measured it (progress.json/outcome.json ``effective_lr``: after mmengine's
auto_scale_lr) and "lr_scale" mmengine's auto_scale_lr factor, both None when not recorded (or off).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from ssflctl.errors import UserError

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# Pascal VOC's mAP at IoU 0.5 (mmdet's VOCMetric; metrics.json "voc": {"mAP50": ...}); reported
# beside the COCO numbers when runs have it.
VOC_METRIC = "VOC mAP@0.5"

FINISHED_OK = "done"
#: what run.json says defines a run besides its axes (aggregate compares them: issue 15.6)
SETTINGS = ("template", "params", "overrides", "resources")


# --------------------------------------------------------------------------------------------
# small tolerant readers


def _read_json(path, default=None):
    """json.load that tolerates a missing file; a corrupt file is a UserError naming it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, NotADirectoryError):
        return default
    try:
        return json.loads(data)
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); fix or delete the file") from None


_BARE_TOKENS = re.compile(r"(?<![\"\w])(-?)(nan|inf|infinity)(?![\"\w])", re.IGNORECASE)


def _parse_scalar_line(line: str):
    """One line of mmengine's scalars.json. Python's json accepts NaN/Infinity; other spellings
    (nan, inf) written by hand-rolled loggers are normalised first."""
    try:
        return json.loads(line)
    except ValueError:
        fixed = _BARE_TOKENS.sub(
            lambda m: (m.group(1) + ("Infinity" if m.group(2).lower().startswith("inf") else "NaN"))
            if not (m.group(1) and m.group(2).lower() == "nan") else "NaN",
            line,
        )
        try:
            return json.loads(fixed)
        except ValueError:
            return None


def read_scalars(path) -> list:
    """Every dict line of an mmengine scalars.json (or <timestamp>.json); bad lines skipped."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                rec = _parse_scalar_line(line)
                if isinstance(rec, dict):
                    out.append(rec)
    except FileNotFoundError:
        return []
    return out


def _num(v) -> Optional[float]:
    """A metric value as float; COCOeval's -1 and non-numbers become None."""
    if type(v) is float:  # the common case (per-class APs: 80 a run): NaN and -1 fail the comparison
        return v if v >= 0 else None
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if math.isnan(f) or f < 0:
        return None
    return f


# --------------------------------------------------------------------------------------------
# pycocotools summary in text logs

def parse_coco_summaries(text: str, iou_type: str = "bbox") -> list:
    """All complete pycocotools summaries of one iouType in a log (see
    mmdet_workdir.parse_coco_summaries, which owns the format)."""
    from ssflctl.report import mmdet_workdir

    return mmdet_workdir.parse_coco_summaries(text, iou_type)


_CLASS_ROW = re.compile(r"^\s*\|\s*([^|]+?)\s*\|\s*(nan|-?[0-9.]+)\s*\|")


def parse_classwise_table(text: str) -> dict:
    """mmdet CocoMetric's classwise table (the last one in the log): {class: AP fraction|None}."""
    last = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if re.match(r"^\s*\|\s*category\s*\|\s*mAP\s*\|", lines[i]):
            table = {}
            i += 1
            while i < len(lines) and (lines[i].lstrip().startswith("|") or lines[i].lstrip().startswith("+")):
                m = _CLASS_ROW.match(lines[i])
                if m and m.group(1) != "category":
                    table[m.group(1)] = _num(m.group(2))
                i += 1
            if table:
                last = table
            continue
        i += 1
    return last


# --------------------------------------------------------------------------------------------
# ssflctl run directories (through ssflctl.workdir; the state is ssflctl.control.state's one rule)


def _attempt_record(a) -> dict:
    """One attempt of a run directory (an ``ssflctl.workdir.layout.AttemptDir``) for the report."""
    from ssflctl.control.reconcile import _attempt_state  # the registry's attempt states, same rule

    nan = a.nan
    state = "done" if a.has_metrics else _attempt_state(a, True)
    reason = ""
    if a.outcome is not None and not a.has_metrics:
        reason = a.outcome.describe()
    elif a.progress is not None and state == "running":
        reason = a.progress.short()
    if nan is not None and a.outcome is None and not a.has_metrics:
        state, reason = "nan", nan.describe()
    eff = a.effective_lr
    return {"attempt": a.n, "lr": a.lr, "lr_effective": eff.effective if eff is not None else None,
            "lr_scale": eff.scale if eff is not None else None, "dir": str(a.path), "why": a.info.reason or "",
            "state": state, "reason": reason, "nan": nan.to_json() if nan is not None else None,
            "has_metrics": a.has_metrics}


def lr_text(a: dict) -> str:
    """An attempt record's lr for a text view: its config lr (``0.01``; ``?`` unknown), or with the
    base lr its optimizer trained at when the job measured another one
    (``0.01→0.00125 (auto_scale_lr)``, :func:`ssflctl.workdir.records.fmt_lr_trained`)."""
    from ssflctl.workdir.records import fmt_lr, fmt_lr_trained

    eff = a.get("lr_effective")
    if eff is None:
        return fmt_lr(a.get("lr"))
    return fmt_lr_trained(a.get("lr"), eff, "auto_scale_lr" if a.get("lr_scale") is not None else "optimizer")


def _metrics_from_file(path: str) -> Optional[dict]:
    m = _read_json(path)
    if not isinstance(m, dict):
        return None
    bbox = m.get("bbox") if isinstance(m.get("bbox"), dict) else {}
    per_class = m.get("per_class") if isinstance(m.get("per_class"), dict) else {}
    out = {
        "bbox": {k: _num(bbox.get(k)) for k in COCO_METRICS if k in bbox},
        "per_class": {str(k): _num(v) for k, v in per_class.items()},
        "evaluator": m.get("evaluator") or "pycocotools",
    }
    voc = m.get("voc")
    if isinstance(voc, dict) and "mAP50" in voc:
        out["bbox"][VOC_METRIC] = _num(voc.get("mAP50"))
    return out


def read_run_dir(run_dir, run_json: Optional[dict] = None, registry_row: Optional[dict] = None) -> dict:
    """One run record from ``<ws>/runs/<run_id>/`` (a path or a ``RunDir``) and, when given, the
    registry's row for it.

    The state is :func:`ssflctl.control.state.decide` on the files, with the registry's last
    verdict standing in for the scheduler (the report never queries it): the same rule, and so the
    same answer, as ``ssflctl status``.
    """
    from ssflctl.control.reconcile import remembered_view
    from ssflctl.control.state import decide
    from ssflctl.workdir.layout import RunDir

    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)  # a RunDir: its files already read
    rj = run_json if run_json is not None else (run.raw_run() or {})
    attempts = [_attempt_record(a) for a in run.attempts()]
    verdict = decide(run, remembered_view(registry_row))
    metrics, final = None, None
    tested = run.tested()
    if tested is not None:
        metrics = _metrics_from_file(str(tested.metrics_path))
        final = tested.n
    rid = rj.get("run_id") or run.run_id
    return {
        "run_id": rid,
        "experiment": rj.get("experiment") or "",
        "name": rj.get("name") or rid,
        "axes": dict(rj.get("axes") or {}),
        "source": "ssflctl",
        "state": verdict.state.value, "reason": verdict.reason, "run_dir": str(run.path),
        "attempts": attempts, "final": final, "metrics": metrics, "unavailable": {},
        "retry": rj.get("retry") or {},
        "settings": {k: rj[k] for k in SETTINGS if k in rj},
    }


def _registry_runs(ws: Path, experiments: list) -> Optional[list]:
    """The registry's runs (read-only; None when there is no registry)."""
    if not (ws / "registry.sqlite").exists():
        return None
    from ssflctl.registry.store import Registry

    reg = Registry(ws, read_only=True)
    try:
        if experiments:
            out = []
            for e in experiments:
                out.extend(reg.list_runs(e))
            return out
        return reg.list_runs()
    finally:
        reg.close()


def _merge_registry_attempts(rec: dict, reg: dict) -> dict:
    """Attempts the registry knows and the files lack (e.g. one whose directory was deleted)."""
    rec["experiment"] = reg.get("experiment") or rec["experiment"]
    rec["name"] = reg.get("name") or rec["name"]
    if reg.get("axes"):
        rec["axes"] = dict(reg["axes"])
    by_n = {a["attempt"]: a for a in rec["attempts"]}
    for ra in reg.get("attempts") or []:
        a = by_n.get(ra.get("attempt"))
        if a is None:
            rec["attempts"].append({"attempt": ra.get("attempt"), "lr": _float_or_none(ra.get("lr")),
                                    "lr_effective": None, "lr_scale": None, "dir": None,
                                    "why": "", "state": ra.get("state"), "reason": ra.get("reason") or "",
                                    "nan": None, "has_metrics": False})
            continue
        if a["lr"] is None:
            a["lr"] = _float_or_none(ra.get("lr"))
        if not a["reason"] and ra.get("reason"):
            a["reason"] = ra["reason"]
    rec["attempts"].sort(key=lambda a: a["attempt"] or 0)
    return rec


def _float_or_none(v):
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def collect_workspace(ws, experiments: Iterable[str] = ()) -> list:
    """Run records of a workspace, filtered by experiment names (all when empty)."""
    from ssflctl.workdir.layout import run_dirs

    ws = Path(ws)
    experiments = list(experiments)
    wanted = set(experiments)
    reg_rows = {r["run_id"]: r for r in (_registry_runs(ws, experiments) or [])}
    reg_tests = _registry_tests(ws)
    records = {}
    present = set()
    for run in run_dirs(ws):
        rj = run.raw_run()
        if not isinstance(rj, dict):
            continue
        if wanted and rj.get("experiment") not in wanted:
            continue
        row = reg_rows.get(run.run_id)
        rec = read_run_dir(run, rj, row)
        if row is not None:
            _merge_registry_attempts(rec, row)
        cells = test_cell_records(ws, run, rec, reg_tests)
        if cells:  # test_matrix: one record per (run, test cell); the run's attempts are shared
            records.update({(rec["run_id"], c["test_id"]): c for c in cells})
            present.add(rec["run_id"])
            if not rec["metrics"]:
                continue
        records[rec["run_id"]] = rec
    for rid, reg in reg_rows.items():
        if rid in records or rid in present or (wanted and reg.get("experiment") not in wanted):
            continue
        rec = {"run_id": rid, "experiment": reg.get("experiment") or "", "name": reg.get("name") or rid,
               "axes": dict(reg.get("axes") or {}), "source": "ssflctl", "state": reg.get("state") or "pending",
               "reason": reg.get("reason") or "no run directory", "run_dir": None, "attempts": [], "final": None,
               "metrics": None, "unavailable": {}, "retry": {}}
        if rec["state"] == "done":
            rec["state"], rec["reason"] = "failed", "registry says done but the run directory is gone"
        records[rid] = _merge_registry_attempts(rec, reg)
    _mark_versions(ws, records.values())
    return [records[k] for k in sorted(records, key=lambda k: k if isinstance(k, tuple) else (k, ""))]


def _registry_tests(ws: Path) -> dict:
    """The registry's test cells (test_matrix) by test id (read-only; empty without them)."""
    if not (ws / "registry.sqlite").exists():
        return {}
    from ssflctl.registry.store import Registry

    reg = Registry(ws, read_only=True)
    try:
        return {r["test_id"]: r for r in reg.test_rows()}
    except Exception:  # noqa: BLE001 - a registry from before test cells
        return {}
    finally:
        reg.close()


def test_cell_records(ws, run, rec: dict, reg_tests: dict) -> list:
    """One record per test cell of the run (test_matrix): the run's axes plus the cell's, the
    cell's metrics from the run's finished attempt, and its state by
    :func:`ssflctl.control.state.decide_test` (the registry's last verdict for the scheduler)."""
    from ssflctl.control.state import Verdict
    from ssflctl.control.testcells import cell_verdict
    from ssflctl.workdir.records import RunState

    cells = run.test_cells()
    if not cells:  # most runs: no test_matrix
        return []
    wanted = (run.raw_run() or {}).get("test_cells")
    if wanted is not None:  # the cells of the experiment as last submitted (in its order)
        cells = {t: cells[t] for t in wanted if t in cells}
    out = []
    rv = Verdict(RunState(rec["state"]) if rec["state"] in RunState._value2member_map_ else RunState.UNKNOWN,
                 rec["reason"])
    for tid, body in cells.items():
        verdict = cell_verdict(ws, run.run_id, tid, rv, reg_tests.get(tid))
        tested = run.tested_cell(tid)
        c = dict(rec, axes={**rec["axes"], **(body.get("axes") or {})}, test_id=tid,
                 test_name=body.get("name") or tid, name=f"{rec['name']} [{body.get('name') or tid}]",
                 state=verdict.state.value, reason=verdict.reason,
                 metrics=_metrics_from_file(str(tested.metrics_path)) if tested is not None else None)
        c["final"] = run.finished().n if tested is not None else None
        out.append(c)
    return out


def _mark_versions(ws: Path, records) -> None:
    """``version``: "current" when the run is one of its experiment file's runs as last submitted,
    "older" when it is not (an earlier version of the file made it), None when never recorded."""
    from ssflctl.workdir import versions

    known = {}
    for rec in records:
        exp = rec.get("experiment") or ""
        if exp not in known:
            v = versions.current(ws, exp) if exp else None
            known[exp] = set(v["run_ids"]) if v else None
        ids = known[exp]
        rec["version"] = None if ids is None else ("current" if rec["run_id"] in ids else "older")


# --------------------------------------------------------------------------------------------
# plain mmdet/mmengine work dirs


_TS_DIR = re.compile(r"^\d{8}_\d{6}$")


def _timestamp_dirs(wd: str) -> list:
    out = []
    try:
        with os.scandir(wd) as it:
            for e in it:
                if e.is_dir() and _TS_DIR.match(e.name):
                    out.append(e.path)
    except FileNotFoundError:
        return []
    return sorted(out)


def _vis_files(tsdir: str) -> list:
    vis = os.path.join(tsdir, "vis_data")
    p = os.path.join(vis, "scalars.json")
    if os.path.exists(p):
        return [p]
    ts = os.path.basename(tsdir)
    for alt in (os.path.join(vis, ts + ".json"), os.path.join(tsdir, ts + ".json")):
        if os.path.exists(alt):
            return [alt]
    return []


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except (FileNotFoundError, IsADirectoryError):
        return ""


def read_workdir(path, pick=None) -> dict:
    """A run record from an MMDetection work dir that ssflctl did not launch, of any vintage
    (mmdet 3.x/mmengine or mmdet 2.x/mmcv 1.x): see report/mmdet_workdir.py, which owns the formats.
    `pick`: test|last|best (None: the test result if any, else the last validation)."""
    from ssflctl.report import mmdet_workdir

    return mmdet_workdir.read(path, pick=pick)


def collect(ws, experiments: Iterable[str] = (), workdirs: Iterable = (), pick=None) -> list:
    """Every run record the report covers (work dirs: see mmdet_workdir.expand and .read)."""
    records = collect_workspace(ws, experiments)
    seen = {r["run_id"] for r in records}
    if workdirs:
        from ssflctl.report import mmdet_workdir

        workdirs = mmdet_workdir.expand(workdirs)
    for wd in workdirs:
        rec = read_workdir(wd, pick=pick)
        base, k = rec["run_id"], 2
        while rec["run_id"] in seen:
            rec["run_id"] = f"{base}-{k}"
            rec["axes"]["workdir"] = rec["run_id"]
            k += 1
        seen.add(rec["run_id"])
        records.append(rec)
    return records


# --------------------------------------------------------------------------------------------
# loss curves (only read when plots are drawn)


_TRAIN_EPOCH = re.compile(r"Epoch\(train\)\s*\[(\d+)\]\[\s*(\d+)/(\d+)\]")
_TRAIN_ITER = re.compile(r"Iter\(train\)\s*\[\s*(\d+)/(\d+)\]")
_LOSS = re.compile(r"\sloss:\s*(-?(?:[0-9.]+(?:e[-+]?\d+)?|nan|inf))", re.IGNORECASE)


def parse_train_log(text: str) -> list:
    """[(iter, loss)] from mmengine's text log lines `Epoch(train) [e][i/n] ... loss: x` (global
    iteration (e-1)*n+i) or `Iter(train) [i/n] ... loss: x`; nan/inf kept as float."""
    pts = []
    for line in text.splitlines():
        if "(train)" not in line:
            continue
        lm = _LOSS.search(line)
        if not lm:
            continue
        m = _TRAIN_EPOCH.search(line)
        if m:
            it = (int(m.group(1)) - 1) * int(m.group(3)) + int(m.group(2))
        else:
            m = _TRAIN_ITER.search(line)
            if not m:
                continue
            it = int(m.group(1))
        pts.append((it, float(lm.group(1))))
    return pts


def loss_curves(rec: dict) -> list:
    """[(attempt, lr, [(iter, loss)], nan_iter|None)] for each attempt of a run.

    Each `<timestamp>/` of an attempt contributes the train lines of its own text log; only where a
    log has none, its vis_data/scalars.json. (The text log belongs to one Runner; mmengine's
    visualizer is a process-wide singleton, so runners started later in the same process -- a retry
    inside the job, the test step -- append their scalars to the first runner's scalars.json.)"""
    out = []
    for a in rec.get("attempts") or []:
        d = a.get("dir")
        if not d:
            continue
        pts = []
        for ts in _timestamp_dirs(d):
            got = parse_train_log(_read_text(os.path.join(ts, os.path.basename(ts) + ".log")))
            if not got:
                for f in _vis_files(ts):
                    for r in read_scalars(f):
                        if "loss" in r:
                            x = r.get("iter", r.get("step"))
                            v = r["loss"]
                            if x is None or not isinstance(v, (int, float)):
                                continue
                            got.append((int(x), float(v)))
            pts += got
        pts.sort(key=lambda p: p[0])
        nan_iter = (a.get("nan") or {}).get("iter")
        out.append((a["attempt"], a.get("lr"), pts, nan_iter))
    return out
