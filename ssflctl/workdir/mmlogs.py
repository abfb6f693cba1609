"""Read mmengine work dirs: text logs, ``vis_data/scalars.json``, checkpoints; find NaN/Inf.

Light: no torch or mmengine import (this runs on the login node too).

mmengine writes, per ``Runner`` start, ``<work_dir>/<timestamp>/<timestamp>.log`` and
``<work_dir>/<timestamp>/vis_data/scalars.json`` (one JSON object per logging iteration, written
by Python's ``json.dump`` and so with bare ``NaN``/``Infinity``/``-Infinity`` tokens), plus
``epoch_N.pth`` / ``iter_N.pth`` and a ``last_checkpoint`` pointer in the work dir itself.

Only loss values are judged (keys containing ``loss``, the rule mmengine uses to sum losses):
a ``grad_norm: inf`` of a mixed-precision loss scaler is normal and no alarm, and so is the word
"nan" anywhere else (a path ``/data/nanjing``, a class ``banana``, a ``Nano`` backbone).
Logged values are window means, so a non-finite value found in a log means the first NaN lies
after the previous finite logging iteration (``after_iter``) and at or before ``iter``.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

_NONFINITE_WORD = re.compile(r"^[-+]?(nan|inf|infinity)$", re.IGNORECASE)
# a bare non-finite token standing as a JSON value (after ':' or '[' or ','), any case
_BARE_TOKEN = re.compile(r'(?<=[:\[,])\s*([-+]?)(nan|infinity|inf)\s*(?=[,\]}])', re.IGNORECASE)

# mmengine train lines:
#   "Epoch(train)  [3][ 10/100]  base_lr: ...  lr: 1.0000e-02  ...  loss: nan  loss_cls: nan ..."
#   "Iter(train) [  10/1000]  lr: ... loss: inf ..."
_TRAIN_LINE = re.compile(
    r"(?P<kind>Epoch|Iter)\(train\)\s*(?:\[\s*(?P<epoch>\d+)\s*\])?\s*\[\s*(?P<cur>\d+)\s*/\s*(?P<tot>\d+)\s*\]"
    r"(?P<rest>.*)$")
_PAIR = re.compile(r"(?:^|\s)(?P<key>[A-Za-z_][\w./-]*):\s+(?P<val>[-+]?(?:[0-9.]+(?:e[-+]?\d+)?|nan|inf|infinity))(?=\s|$)",
                   re.IGNORECASE)
# the guard's own line: "NanGuard: ... Iter(train) [1234]  loss: nan  loss_cls: nan ..."
_GUARD_LINE = re.compile(r"NanGuard:.*?Iter\(train\) \[(?P<iter>\d+)\](?P<rest>.*)$")
_GUARD_EPOCH = re.compile(r" at epoch (\d+) iter \d+")
_TIMESTAMP_DIR = re.compile(r"^\d{8}_\d{6}$")
_CKPT_NAME = re.compile(r"^(?P<kind>epoch|iter)_(?P<n>\d+)\.pth$")


def is_loss_key(key: str) -> bool:
    return "loss" in key


def _is_nonfinite(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _parse_number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# scalars.json
# ---------------------------------------------------------------------------------------------
def _loads_tolerant(line: str) -> Optional[dict]:
    try:
        obj = json.loads(line)  # Python's json accepts NaN, Infinity, -Infinity
    except ValueError:
        fixed = _BARE_TOKEN.sub(lambda m: ("-" if m.group(1) == "-" else "")
                                + ("NaN" if m.group(2).lower() == "nan" else "Infinity"), line)
        try:
            obj = json.loads(fixed)
        except ValueError:
            return None  # a half-written last line, or garbage: skip it
    return obj if isinstance(obj, dict) else None


def read_scalars(path) -> List[dict]:
    """All records of a ``scalars.json`` (JSON lines); bare NaN/Infinity become float nan/inf.

    Blank, truncated or non-JSON lines are skipped. A missing file gives ``[]``.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except (FileNotFoundError, IsADirectoryError):
        return []
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        obj = _loads_tolerant(line)
        if obj is not None:
            out.append(obj)
    return out


# ---------------------------------------------------------------------------------------------
# text log
# ---------------------------------------------------------------------------------------------
def parse_log_line(line: str) -> Optional[dict]:
    """One mmengine train line → ``{"epoch", "iter", "iter_in_epoch", "iters_per_epoch",
    "max_iters", "values": {key: float}}``; None for any other line.

    For epoch-based lines the global iteration is ``(epoch-1) * iters_per_epoch + cur``.
    """
    m = _TRAIN_LINE.search(line)
    if m:
        cur, tot = int(m.group("cur")), int(m.group("tot"))
        rec: Dict[str, Any] = {"values": _pairs(m.group("rest"))}
        if m.group("kind") == "Epoch" and m.group("epoch") is not None:
            ep = int(m.group("epoch"))
            rec.update(epoch=ep, iter=(ep - 1) * tot + cur, iter_in_epoch=cur,
                       iters_per_epoch=tot, max_iters=None)
        else:
            rec.update(epoch=None, iter=cur, iter_in_epoch=None, iters_per_epoch=None, max_iters=tot)
        return rec
    g = _GUARD_LINE.search(line)
    if g:
        ep = _GUARD_EPOCH.search(line)
        return {"values": _pairs(g.group("rest")), "epoch": int(ep.group(1)) if ep else None,
                "iter": int(g.group("iter")),
                "iter_in_epoch": None, "iters_per_epoch": None, "max_iters": None, "guard": True}
    return None


def _pairs(rest: str) -> Dict[str, float]:
    vals = {}
    for p in _PAIR.finditer(rest):
        v = _parse_number(p.group("val"))
        if v is not None:
            vals[p.group("key")] = v
    return vals


def read_text_log(path) -> List[dict]:
    """The parsed train lines of one mmengine text log (see :func:`parse_log_line`)."""
    out = []
    try:
        fh = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    with fh:
        for line in fh:
            rec = parse_log_line(line)
            if rec is not None:
                out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# locating a work dir's files
# ---------------------------------------------------------------------------------------------
def run_dirs(work_dir) -> List[Path]:
    """mmengine's per-start ``<timestamp>`` folders in ``work_dir``, oldest first."""
    wd = Path(work_dir)
    if not wd.is_dir():
        return []
    return sorted(p for p in wd.iterdir() if p.is_dir() and _TIMESTAMP_DIR.match(p.name))


def text_logs(work_dir) -> List[Path]:
    out = []
    for d in run_dirs(work_dir):
        out.extend(sorted(d.glob("*.log")))
    return out


def scalar_files(work_dir) -> List[Path]:
    out = []
    for d in run_dirs(work_dir):
        p = d / "vis_data" / "scalars.json"
        if p.is_file():
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# finding NaN/Inf
# ---------------------------------------------------------------------------------------------
def _first_bad(values: Dict[str, Any]) -> Optional[Tuple[str, float]]:
    bad = [(k, v) for k, v in values.items() if is_loss_key(k) and _is_nonfinite(v)]
    if not bad:
        return None
    parts = [kv for kv in bad if kv[0] != "loss"]
    return (parts or bad)[0]


def _kind(v: float) -> str:
    return "nan" if v != v else ("inf" if v > 0 else "-inf")


def nonfinite_in_scalars(path) -> Optional[dict]:
    """First record of a scalars.json with a non-finite loss value, or None."""
    prev = None
    for rec in read_scalars(path):
        if "loss" not in rec and not any(is_loss_key(k) for k in rec):
            continue  # val/test records
        hit = _first_bad(rec)
        it = rec.get("iter", rec.get("step"))
        if hit:
            key, v = hit
            return {"iter": it, "epoch": rec.get("epoch"), "key": key, "value": _kind(v),
                    "after_iter": prev, "lr": rec.get("lr"), "file": str(path), "source": "scalars"}
        prev = it
    return None


def nonfinite_in_text_log(path) -> Optional[dict]:
    """First mmengine train line (or NanGuard line) of a text log with a non-finite loss."""
    prev = None
    for rec in read_text_log(path):
        hit = _first_bad(rec["values"])
        if hit:
            key, v = hit
            return {"iter": rec["iter"], "epoch": rec["epoch"], "key": key, "value": _kind(v),
                    "after_iter": prev, "lr": rec["values"].get("lr"), "file": str(path),
                    "source": "guard" if rec.get("guard") else "text_log"}
        prev = rec["iter"]
    return None


def find_nonfinite(work_dir) -> Optional[dict]:
    """The first non-finite loss recorded in ``work_dir`` by mmengine (or the guard), or None.

    ``{"iter", "epoch", "key", "value": "nan"|"inf"|"-inf", "after_iter", "lr", "file",
    "source": "nan.json"|"scalars"|"text_log"|"guard"}``. The guard's nan.json is exact and wins;
    otherwise the earliest hit over every mmengine start (timestamp folder), scalars.json first
    (exact floats), the text log where scalars.json is missing or silent.
    """
    wd = Path(work_dir)
    rec = None
    try:
        with open(wd / "nan.json", encoding="utf-8") as fh:
            rec = json.load(fh)
    except (FileNotFoundError, ValueError):
        rec = None
    if isinstance(rec, dict) and rec.get("iter") is not None:
        key = rec.get("loss_key")
        return {"iter": rec.get("iter"), "epoch": rec.get("epoch"), "key": key,
                "value": (rec.get("nonfinite") or {}).get(key, "nan"),
                "after_iter": rec.get("last_finite_iter"), "lr": rec.get("lr"),
                "file": str(wd / "nan.json"), "source": "nan.json"}
    hits = []
    for d in run_dirs(wd):
        hit = nonfinite_in_scalars(d / "vis_data" / "scalars.json")
        if hit is None:
            for log in sorted(d.glob("*.log")):
                hit = nonfinite_in_text_log(log)
                if hit:
                    break
        if hit:
            hits.append(hit)
    if not hits:
        return None
    return min(hits, key=lambda h: (h["iter"] if h["iter"] is not None else math.inf))


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
def last_progress(work_dir) -> Optional[dict]:
    """The last train logging point of ``work_dir``: ``{"epoch", "iter", "max_iters",
    "iters_per_epoch", "loss", "lr", "file", "updated_at"}`` (None when nothing was logged yet).

    Read from the newest mmengine start's text log (it has the totals) and scalars.json.
    """
    for d in reversed(run_dirs(work_dir)):
        best = None
        for log in sorted(d.glob("*.log")):
            recs = [r for r in map(parse_log_line, _tail_lines(log)) if r and not r.get("guard")]
            if recs:
                r = recs[-1]
                best = {"epoch": r["epoch"], "iter": r["iter"], "max_iters": r["max_iters"],
                        "iters_per_epoch": r["iters_per_epoch"],
                        "loss": r["values"].get("loss"), "lr": r["values"].get("lr"),
                        "file": str(log), "updated_at": os.path.getmtime(log)}
        sc = d / "vis_data" / "scalars.json"
        recs = [r for r in map(_loads_tolerant, _tail_lines(sc)) if r and "loss" in r]
        if recs:
            r = recs[-1]
            it = r.get("iter", r.get("step"))
            if best is None or (it is not None and best["iter"] is not None and it > best["iter"]):
                best = {"epoch": r.get("epoch"), "iter": it, "max_iters": None,
                        "iters_per_epoch": None, "loss": r.get("loss"), "lr": r.get("lr"),
                        "file": str(sc), "updated_at": os.path.getmtime(sc)}
        if best is not None:
            return best
    return None


def _tail_lines(path, nbytes: int = 256 * 1024) -> List[str]:
    """The complete lines in the last ``nbytes`` of a file (a status check reads no more)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - nbytes))
            data = fh.read()
    except (FileNotFoundError, IsADirectoryError):
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > nbytes and lines:
        lines = lines[1:]  # the first one is cut
    return [ln.strip() for ln in lines if ln.strip()]


def iters_per_epoch(work_dir) -> Optional[int]:
    """Iterations per epoch as printed in the train lines (``[ 10/100]``), or None."""
    for log in reversed(text_logs(work_dir)):
        for r in read_text_log(log):
            if r.get("iters_per_epoch"):
                return r["iters_per_epoch"]
    return None


# ---------------------------------------------------------------------------------------------
# checkpoints: ssflctl.workdir.checkpoints owns them
# ---------------------------------------------------------------------------------------------
from ssflctl.workdir.checkpoints import list_checkpoints, read_checkpoint_meta  # noqa: E402,F401


def log_tail(work_dir, lines: int = 20) -> str:
    """The last lines of the newest text log (for outcome.json of a failed attempt)."""
    logs = text_logs(work_dir)
    if not logs:
        return ""
    return "\n".join(_tail_lines(logs[-1], 64 * 1024)[-lines:])


def iter_records(work_dir) -> Iterator[dict]:
    """Every train record of every mmengine start of ``work_dir`` (scalars.json)."""
    for p in scalar_files(work_dir):
        for rec in read_scalars(p):
            if "loss" in rec:
                yield rec
