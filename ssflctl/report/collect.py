"""Gather run records for the report: the registry, run directories, outside mmdet work dirs.

A *run record* is a plain dict (no pandas here: collect runs over thousands of runs and must be
fast, so it reads small JSON files directly and builds nothing per run but dicts):

```
{"run_id", "experiment", "name", "axes": {...}, "source": "ssflctl"|"workdir",
 "state": "done"|"pending"|"queued"|"running"|"failed"|"cancelled"|"unknown"|"missing",
 "reason": "one line", "run_dir": str|None,
 "attempts": [{"attempt", "lr", "state", "reason", "dir", "nan": {...}|None}],
 "final": attempt number the metrics come from, or None,
 "metrics": {"bbox": {AP..ARl[, "VOC mAP@0.5"]: fraction|None}, "per_class": {...}, "evaluator": str}
            or None,
 "unavailable": {metric: "why"} (metrics the evaluator did not produce, e.g. AR1 from CocoMetric)}
```
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

# mmdet's CocoMetric keys (in scalars.json, prefixed "coco/") -> our names.
COCOMETRIC_KEYS = {
    "bbox_mAP": "AP", "bbox_mAP_50": "AP50", "bbox_mAP_75": "AP75",
    "bbox_mAP_s": "APs", "bbox_mAP_m": "APm", "bbox_mAP_l": "APl",
    # mmdet only logs these when the metric is configured for proposals; kept for completeness
    "bbox_AR@100": "AR100", "bbox_AR_s@100": "ARs", "bbox_AR_m@100": "ARm", "bbox_AR_l@100": "ARl",
}

FINISHED_OK = "done"


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

_SUMMARY_RE = re.compile(
    r"Average (Precision|Recall)\s+\((AP|AR)\)\s+@\[\s*IoU=([0-9.:]+)\s*\|\s*area=\s*(\w+)\s*\|\s*"
    r"maxDets=\s*(\d+)\s*\]\s*=\s*(-?[0-9.]+|nan)"
)
_AREA = {"all": "", "small": "s", "medium": "m", "large": "l"}


def _summary_key(kind: str, iou: str, area: str, maxdets: str) -> Optional[str]:
    a = _AREA.get(area)
    if a is None:
        return None
    if kind == "AP":
        if iou == "0.50:0.95":
            return "AP" + a if maxdets == "100" else None
        if a == "" and iou in ("0.50", "0.5"):
            return "AP50"
        if a == "" and iou == "0.75":
            return "AP75"
        return None
    if iou != "0.50:0.95":
        return None
    if a == "":
        return {"1": "AR1", "10": "AR10", "100": "AR100"}.get(maxdets)
    return "AR" + a if maxdets == "100" else None


def parse_coco_summaries(text: str) -> list:
    """All complete 12-line pycocotools summaries in a log, in order, as {metric: fraction|None}."""
    out, cur = [], {}
    for m in _SUMMARY_RE.finditer(text):
        key = _summary_key(m.group(2), m.group(3), m.group(4), m.group(5))
        if key is None:
            continue
        if key == "AP" and cur:
            if len(cur) >= 6:
                out.append(cur)
            cur = {}
        cur[key] = _num(m.group(6))
    if len(cur) >= 6:
        out.append(cur)
    return out


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
    return {"attempt": a.n, "lr": a.lr, "dir": str(a.path), "why": a.info.reason or "", "state": state,
            "reason": reason, "nan": nan.to_json() if nan is not None else None, "has_metrics": a.has_metrics}


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
    """One run record from ``<ws>/runs/<run_id>/`` and, when given, the registry's row for it.

    The state is :func:`ssflctl.control.state.decide` on the files, with the registry's last
    verdict standing in for the scheduler (the report never queries it): the same rule, and so the
    same answer, as ``ssflctl status``.
    """
    from ssflctl.control.reconcile import remembered_view
    from ssflctl.control.state import decide
    from ssflctl.workdir.layout import RunDir

    run = RunDir(run_dir)
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
            rec["attempts"].append({"attempt": ra.get("attempt"), "lr": _float_or_none(ra.get("lr")), "dir": None,
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
    records = {}
    for run in run_dirs(ws):
        rj = run.raw_run()
        if not isinstance(rj, dict):
            continue
        if wanted and rj.get("experiment") not in wanted:
            continue
        row = reg_rows.get(run.run_id)
        rec = read_run_dir(run.path, rj, row)
        if row is not None:
            _merge_registry_attempts(rec, row)
        records[rec["run_id"]] = rec
    for rid, reg in reg_rows.items():
        if rid in records or (wanted and reg.get("experiment") not in wanted):
            continue
        rec = {"run_id": rid, "experiment": reg.get("experiment") or "", "name": reg.get("name") or rid,
               "axes": dict(reg.get("axes") or {}), "source": "ssflctl", "state": reg.get("state") or "pending",
               "reason": reg.get("reason") or "no run directory", "run_dir": None, "attempts": [], "final": None,
               "metrics": None, "unavailable": {}, "retry": {}}
        if rec["state"] == "done":
            rec["state"], rec["reason"] = "failed", "registry says done but the run directory is gone"
        records[rid] = _merge_registry_attempts(rec, reg)
    return [records[k] for k in sorted(records)]


# --------------------------------------------------------------------------------------------
# plain mmdet/mmengine work dirs


_TS_DIR = re.compile(r"^\d{8}_\d{6}$")
_SEED_RE = re.compile(r"^\s*seed:\s*(-?\d+)\s*$", re.MULTILINE)


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


def _cocometric_from_scalars(tsdir: str):
    """The last `coco/bbox_mAP*` record of a timestamp dir's scalars: (bbox, per_class) or None."""
    last = None
    for f in _vis_files(tsdir):
        for rec in read_scalars(f):
            if "coco/bbox_mAP" in rec:
                last = rec
    if last is None:
        return None
    bbox = {ours: _num(last["coco/" + key]) for key, ours in COCOMETRIC_KEYS.items() if "coco/" + key in last}
    pcs = {k[5:-10]: _num(v) for k, v in last.items() if k.startswith("coco/") and k.endswith("_precision")}
    return bbox, pcs


def _vocmetric_from_scalars(tsdir: str) -> Optional[float]:
    """mAP@0.5 of the last mmdet VOCMetric record (`pascal_voc/mAP`, or `pascal_voc/AP50` when
    mAP averages other IoU thresholds too) of a timestamp dir's scalars, or None."""
    last = None
    for f in _vis_files(tsdir):
        for rec in read_scalars(f):
            if "pascal_voc/mAP" in rec or "pascal_voc/AP50" in rec:
                last = rec
    if last is None:
        return None
    others = [k for k in last if k.startswith("pascal_voc/AP") and k != "pascal_voc/AP50"]
    return _num(last.get("pascal_voc/AP50") if others or "pascal_voc/mAP" not in last else last["pascal_voc/mAP"])


def _same_numbers(summary: dict, bbox: dict) -> bool:
    """A pycocotools summary and CocoMetric's numbers (3 decimals) describe the same evaluation."""
    keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in bbox]
    return bool(keys) and all(
        (summary.get(k) is None and bbox[k] is None)
        or (summary.get(k) is not None and bbox[k] is not None and abs(summary[k] - bbox[k]) <= 0.0006)
        for k in keys)


def read_workdir(path) -> dict:
    """A run record from a plain MMDetection work dir that ssflctl did not launch.

    The newest `<timestamp>/` with results wins. mmdet's CocoMetric writes the 6 AP numbers to
    vis_data/scalars.json (`coco/bbox_mAP`, ...), and its per-class table to the text log, but prints
    the 12-line pycocotools summary to stdout only. So the AR numbers come from a summary found in
    that timestamp's log or in a text file the user kept in the work dir (`*.log`, `*.out`, `*.txt`,
    e.g. `python tools/test.py ... | tee work_dir/test.log`) and only when its AP numbers match
    CocoMetric's; otherwise the AR cells say "n/a (CocoMetric)".
    """
    wd = str(path)
    if not os.path.isdir(wd):
        raise UserError(f"{wd}: --workdirs path is not a directory; give an mmdet work_dir")
    tsdirs = _timestamp_dirs(wd)
    if not tsdirs:
        raise UserError(
            f"{wd}: no <timestamp>/ log directory (YYYYMMDD_HHMMSS) found; is this an mmengine work_dir?")
    name = os.path.basename(os.path.abspath(wd))
    extra_texts = None
    bbox, per_class, evaluator, unavailable = None, {}, None, {}
    seed = None
    for ts in reversed(tsdirs):
        text = _read_text(os.path.join(ts, os.path.basename(ts) + ".log"))
        if seed is None:
            m = _SEED_RE.search(text)
            if m:
                seed = int(m.group(1))
        if bbox is not None:
            continue
        sums = parse_coco_summaries(text)
        cm = _cocometric_from_scalars(ts)
        voc = _vocmetric_from_scalars(ts)
        if cm is None and not sums and voc is not None:  # mmdet's VOCMetric only (Pascal VOC configs)
            bbox, evaluator = {VOC_METRIC: voc}, "VOCMetric"
            unavailable.update({k: "n/a (VOCMetric)" for k in COCO_METRICS})
            continue
        if cm is None and not sums:
            continue
        if cm is not None and not (sums and _same_numbers(sums[-1], cm[0])):
            if extra_texts is None:
                extra_texts = []
                for e in sorted(os.scandir(wd), key=lambda e: e.name):
                    if e.is_file() and e.name.endswith((".log", ".out", ".txt")):
                        extra_texts.append(_read_text(e.path))
            sums = [s for t in extra_texts for s in parse_coco_summaries(t) if _same_numbers(s, cm[0])]
        if sums:
            bbox = {k: sums[-1].get(k) for k in COCO_METRICS if k in sums[-1]}
            evaluator = "pycocotools summary (log)"
        else:
            bbox, evaluator = dict(cm[0]), "CocoMetric"
            for k in COCO_METRICS:
                if k not in bbox:
                    unavailable[k] = "n/a (CocoMetric)"
        per_class = parse_classwise_table(text) or (cm[1] if cm else {})
        if voc is not None:
            bbox[VOC_METRIC] = voc
    losses = workdir_has_loss(tsdirs)
    if bbox is not None:
        state, reason = "done", ""
        if losses.get("nan") is not None:
            reason = f"training loss NaN from iter {losses['nan']}; results come from a diverged model"
    elif losses.get("nan"):
        state, reason = "failed", f"NaN at iter {losses['nan']} (no test results)"
    else:
        state, reason = "unknown", "no test results in its logs (still training, or never tested)"
    axes = {"workdir": name}
    if seed is not None:
        axes["seed"] = seed
    return {
        "run_id": name, "experiment": "workdirs", "name": name, "axes": axes, "source": "workdir",
        "state": state, "reason": reason, "run_dir": wd,
        "attempts": [{"attempt": 1, "lr": losses.get("lr"), "dir": wd, "why": "", "state": state,
                      "reason": reason, "nan": None, "has_metrics": bbox is not None}],
        "final": 1 if bbox is not None else None,
        "metrics": None if bbox is None else {"bbox": bbox, "per_class": per_class, "evaluator": evaluator},
        "unavailable": unavailable, "retry": {},
    }


def workdir_has_loss(tsdirs) -> dict:
    """First lr and first non-finite loss iteration of a work dir's training scalars."""
    out = {}
    for ts in tsdirs:
        for f in _vis_files(ts):
            for rec in read_scalars(f):
                if "loss" in rec:
                    if "lr" not in out and rec.get("lr") is not None:
                        out["lr"] = _float_or_none(rec["lr"])
                    v = rec["loss"]
                    if "nan" not in out and isinstance(v, float) and not math.isfinite(v):
                        out["nan"] = rec.get("iter", rec.get("step"))
    return out


def collect(ws, experiments: Iterable[str] = (), workdirs: Iterable = ()) -> list:
    """Every run record the report covers."""
    records = collect_workspace(ws, experiments)
    seen = {r["run_id"] for r in records}
    for wd in workdirs:
        rec = read_workdir(wd)
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
