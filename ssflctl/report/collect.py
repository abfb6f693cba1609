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
Outside work dirs (source "workdir", report/mmdet_workdir.py) add "segm" to "metrics" when the
run has mask numbers, "provenance" (timestamp, split, epoch/iter, checkpoint, pick), "config"
(the training run's seed, lr, optimizer, batch size, max epochs) and "progress", and may have the
states "unfinished" (with numbers) and "unreadable" (reason says why).
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
# ssflctl run directories


def _attempt_dirs(run_dir: str) -> list:
    """[(n, path)] of attempt-<n> dirs, sorted by n."""
    out = []
    try:
        with os.scandir(run_dir) as it:
            for e in it:
                name = e.name
                if name.startswith("attempt-") and name[8:].isdigit() and e.is_dir():
                    out.append((int(name[8:]), e.path))
    except FileNotFoundError:
        return []
    out.sort()
    return out


def _nan_reason(nan: dict) -> str:
    bits = ["NaN"]
    if nan.get("iter") is not None:
        bits.append(f"at iter {nan['iter']}")
    if nan.get("loss_key"):
        bits.append(f"({nan['loss_key']})")
    return " ".join(bits)


def _attempt_record(n: int, adir: str) -> dict:
    meta = _read_json(os.path.join(adir, "attempt.json"), {}) or {}
    has_metrics = os.path.exists(os.path.join(adir, "metrics.json"))
    # a tested attempt is done whatever its outcome file says; skip reading it (fast for 1000s of runs)
    outcome = {"outcome": "done"} if has_metrics else _read_json(os.path.join(adir, "outcome.json"))
    rec = {
        "attempt": n, "lr": _float_or_none(meta.get("lr")), "dir": adir,
        "why": meta.get("reason") or "", "state": None, "reason": "", "nan": None, "has_metrics": has_metrics,
    }
    if isinstance(outcome, dict):
        state = outcome.get("outcome") or "failed"
        rec["state"] = state
        rec["nan"] = outcome.get("nan") if isinstance(outcome.get("nan"), dict) else None
        reason = outcome.get("reason") or ""
        if state == "nan" and not reason:
            reason = _nan_reason(rec["nan"] or {})
        rec["reason"] = reason
        if rec["nan"] and rec["nan"].get("lr") is not None and rec["lr"] is None:
            rec["lr"] = _float_or_none(rec["nan"].get("lr"))
    else:
        nan = _read_json(os.path.join(adir, "nan.json"))
        if isinstance(nan, dict):
            rec["state"], rec["nan"], rec["reason"] = "nan", nan, _nan_reason(nan)
        else:
            progress = _read_json(os.path.join(adir, "progress.json"))
            if isinstance(progress, dict):
                rec["state"] = "running"
                ep, mx = progress.get("epoch"), progress.get("max_epochs")
                it, mi = progress.get("iter"), progress.get("max_iters")
                if ep is not None and mx:
                    rec["reason"] = f"epoch {ep}/{mx}"
                elif it is not None and mi:
                    rec["reason"] = f"iter {it}/{mi}"
            else:
                rec["state"] = "queued"
    if rec["has_metrics"]:
        rec["state"] = "done"
    return rec


def _float_or_none(v):
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


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


def _summarise_state(attempts: list, retry: dict) -> tuple:
    """(state, reason) of a run from its attempts' files."""
    if not attempts:
        return "pending", "not submitted"
    last = attempts[-1]
    st = last["state"]
    if st == "done" and not last["has_metrics"]:
        # trained; the test step has not written metrics.json (still testing, or it failed: the
        # registry, when there is one, knows which)
        return "running", "trained; no metrics.json yet (testing, or the test step failed)"
    if st == "done":
        if len(attempts) > 1:
            return "done", f"attempt {last['attempt']} at lr {_fmt_lr(last['lr'])}"
        return "done", ""
    if st == "nan":
        nans = sum(1 for a in attempts if a["state"] == "nan")
        maxa = (retry or {}).get("max_attempts", 3)
        if (retry or {}).get("on_nan", "lower_lr") != "fail" and last["attempt"] < int(maxa):
            return "running", f"NaN in attempt {last['attempt']}; retry pending"
        return "failed", f"NaN after {nans} attempt{'s' if nans != 1 else ''}"
    if st == "failed":
        return "failed", last["reason"] or "training failed"
    if st == "preempted":
        return "queued", "preempted; resume pending"
    if st in ("running", "queued"):
        return st, last["reason"]
    return st or "unknown", last["reason"]


def _fmt_lr(lr) -> str:
    return "?" if lr is None else f"{lr:g}"


def read_run_dir(run_dir: str, run_json: Optional[dict] = None) -> dict:
    """One run record from `<ws>/runs/<run_id>/` (files only)."""
    run_dir = str(run_dir)
    rj = run_json if run_json is not None else _read_json(os.path.join(run_dir, "run.json"), {}) or {}
    attempts = [_attempt_record(n, p) for n, p in _attempt_dirs(run_dir)]
    state, reason = _summarise_state(attempts, rj.get("retry") or {})
    metrics, final = None, None
    for a in reversed(attempts):
        if a["has_metrics"]:
            metrics = _metrics_from_file(os.path.join(a["dir"], "metrics.json"))
            final = a["attempt"]
            break
    if metrics is not None and state != "done":
        # a later attempt is in flight; keep the numbers but say the run is not finished
        pass
    return {
        "run_id": rj.get("run_id") or os.path.basename(run_dir.rstrip("/")),
        "experiment": rj.get("experiment") or "",
        "name": rj.get("name") or rj.get("run_id") or os.path.basename(run_dir.rstrip("/")),
        "axes": dict(rj.get("axes") or {}),
        "source": "ssflctl",
        "state": state, "reason": reason, "run_dir": run_dir,
        "attempts": attempts, "final": final, "metrics": metrics, "unavailable": {},
        "retry": rj.get("retry") or {},
    }


def _registry_runs(ws: Path, experiments: list) -> Optional[list]:
    """store.Registry(ws).list_runs() when the store module and a registry exist; else None."""
    if not (ws / "registry.sqlite").exists():
        return None
    try:
        from ssflctl import store  # noqa: WPS433 (written by another part of the project)
    except ImportError:
        return None
    reg = store.Registry(ws)
    try:
        if experiments:
            out = []
            for e in experiments:
                out.extend(reg.list_runs(e))
            return out
        return reg.list_runs()
    finally:
        close = getattr(reg, "close", None)
        if callable(close):
            close()


def _merge_registry(rec: dict, reg: dict) -> dict:
    """The registry knows what was asked for and the scheduler's view; the files know results."""
    rec["experiment"] = reg.get("experiment") or rec["experiment"]
    rec["name"] = reg.get("name") or rec["name"]
    if reg.get("axes"):
        rec["axes"] = dict(reg["axes"])
    rstate = reg.get("state")
    if rec["metrics"] is None and rstate and rstate != "done":
        # files have no result: the registry's state (queued/running/cancelled/...) is the news
        if not (rstate in ("pending", "queued") and rec["state"] in ("running", "failed")):
            rec["state"] = rstate
            rec["reason"] = reg.get("reason") or rec["reason"]
    elif rec["metrics"] is None and rstate == "done":
        rec["state"], rec["reason"] = "failed", "registry says done but no metrics.json found"
    by_n = {a["attempt"]: a for a in rec["attempts"]}
    for ra in reg.get("attempts") or []:
        n = ra.get("attempt")
        a = by_n.get(n)
        if a is None:
            a = {"attempt": n, "lr": _float_or_none(ra.get("lr")), "dir": None, "why": "",
                 "state": ra.get("state"), "reason": ra.get("reason") or "", "nan": None,
                 "has_metrics": False}
            rec["attempts"].append(a)
            continue
        if a["lr"] is None:
            a["lr"] = _float_or_none(ra.get("lr"))
        if not a["reason"] and ra.get("reason"):
            a["reason"] = ra["reason"]
        if a["state"] in (None, "queued", "running") and ra.get("state") not in (None, "pending"):
            a["state"] = ra["state"]
    rec["attempts"].sort(key=lambda a: a["attempt"] or 0)
    return rec


def collect_workspace(ws, experiments: Iterable[str] = ()) -> list:
    """Run records of a workspace, filtered by experiment names (all when empty)."""
    ws = Path(ws)
    experiments = list(experiments)
    wanted = set(experiments)
    records = {}
    runs_root = ws / "runs"
    if runs_root.is_dir():
        with os.scandir(runs_root) as it:
            entries = sorted((e.name, e.path) for e in it if e.is_dir())
        for name, path in entries:
            rj = _read_json(os.path.join(path, "run.json"))
            if not isinstance(rj, dict):
                continue
            if wanted and rj.get("experiment") not in wanted:
                continue
            rec = read_run_dir(path, rj)
            records[rec["run_id"]] = rec
    reg_runs = _registry_runs(ws, experiments)
    for reg in reg_runs or []:
        rid = reg.get("run_id")
        if wanted and reg.get("experiment") not in wanted:
            continue
        rec = records.get(rid)
        if rec is None:
            rec = {
                "run_id": rid, "experiment": reg.get("experiment") or "", "name": reg.get("name") or rid,
                "axes": dict(reg.get("axes") or {}), "source": "ssflctl", "state": "pending",
                "reason": "no run directory", "run_dir": None, "attempts": [], "final": None,
                "metrics": None, "unavailable": {}, "retry": {},
            }
            records[rid] = rec
        _merge_registry(rec, reg)
    return [records[k] for k in sorted(records)]


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
