"""Read an MMDetection work dir of any vintage into a report run record (one owner for this).

Formats read (checked against the sources named; no mmdet/mmengine import here: this runs on the
login node and over many dirs):

mmdet 3.x / mmengine 0.10 (``Runner``; ``LoggerHook``, ``LogProcessor``, ``LocalVisBackend``):
  ``<wd>/<YYYYMMDD_HHMMSS>/<ts>.log``    the text log, one per Runner start:
      ``Epoch(train)  [105][ 50/500]  lr: ...  loss: ...``, ``Iter(train) [  50/90000] ...``
      ``Epoch(val) [12][625/625]    coco/bbox_mAP: 0.3740  coco/bbox_mAP_50: ...  time: ...``
      ``Epoch(test) [625/625]    coco/bbox_mAP: ...`` (tools/test.py), ``Iter(val) [625/625] ...``
      CocoMetric's ``Evaluating bbox...``, classwise table, ``bbox_mAP_copypaste: 0.374 0.581 ...``
      the runtime env (``seed: 42``, ``GPU number: 8``) and ``Config:\\n<pretty_text>``
      CheckpointHook's ``The best checkpoint with 0.6670 coco/bbox_mAP at 30 epoch is saved to
      best_coco_bbox_mAP_epoch_30.pth.``
  ``<ts>/vis_data/scalars.json``          JSON lines: train ``{"lr", "loss", ..., "epoch", "iter",
      "step"}``, val ``{"coco/bbox_mAP": ..., "step": <epoch>}`` (log_metric_by_epoch)
  ``<ts>/vis_data/<ts>.json``             the same lines (``file_path=`` of add_scalars)
  ``<ts>/<ts>.json``                      the test metrics, one JSON object (after_test_epoch)
  ``<ts>/vis_data/config.py``             the run's config (LocalVisBackend.add_config)
  ``<wd>/epoch_N.pth``, ``iter_N.pth``, ``best_<key with / as _>_epoch_N.pth``

mmdet 2.x / mmcv 1.x (``EpochBasedRunner``, ``TextLoggerHook``, tools/train.py, tools/test.py):
  ``<wd>/<ts>.log``        ``Epoch [12][50/7330]\\tlr: 2.000e-02, eta: ..., loss: 0.51``,
                           ``Epoch(val) [12][7330]\\tbbox_mAP: 0.3740, ..., bbox_mAP_copypaste: ...``,
                           ``Set random seed to 42, ...``, ``Config:\\n<pretty_text>``
  ``<wd>/<ts>.log.json``   JSON lines: first the runner meta ``{"env_info", "config", "seed",
                           "exp_name"}``, then ``{"mode": "train"|"val", "epoch", "iter", "lr",
                           ..., "bbox_mAP": ..., "segm_mAP": ..., "mAP": ..., "AP50": ...}``;
                           a resumed run adds another ``<ts>.log(.json)`` pair
  ``<wd>/eval_<ts>.json``  tools/test.py --work-dir: ``{"config": path, "metric": {...}}``
  ``<wd>/<config>.py``     the dumped config; ``best_bbox_mAP_epoch_N.pth`` (EvalHook save_best)

A record (see report/collect.py) gets, beside the usual fields:
  ``provenance``: where its numbers come from (timestamp, split val|test, epoch, iter,
  checkpoint, pick and why, file); ``config``: seed, lr, optimizer, batch size, max epochs/iters
  of the training run's dumped config (and which file); ``progress``: last trained epoch/iter.
States: done, unfinished (stopped before train_cfg's max), failed (NaN, no results), unknown (no
results), unreadable (the reason says why).
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from ssflctl.errors import UserError
from ssflctl.report.collect import (COCO_METRICS, VOC_METRIC, _num, _read_text, parse_classwise_table,
                                    read_scalars)

PICKS = ("test", "last", "best")
IOU_TYPES = ("bbox", "segm")
UNREADABLE = "unreadable"
UNFINISHED = "unfinished"

# mmdet CocoMetric (3.x, prefixed "coco/") / mmdet 2.x CocoDataset.evaluate key suffixes -> ours
_COCO_SUFFIX = {"mAP": "AP", "mAP_50": "AP50", "mAP_75": "AP75", "mAP_s": "APs", "mAP_m": "APm", "mAP_l": "APl",
                "AR@100": "AR100", "AR_s@100": "ARs", "AR_m@100": "ARm", "AR_l@100": "ARl",
                "AR@1": "AR1", "AR@10": "AR10"}
_COPYPASTE = ("AP", "AP50", "AP75", "APs", "APm", "APl")

_TS = r"\d{8}_\d{6}"
_TS_DIR = re.compile(rf"^{_TS}$")
_LOG2 = re.compile(rf"^({_TS})\.log$")
_JSON2 = re.compile(rf"^({_TS})\.log\.json$")
_EVAL2 = re.compile(rf"^eval_({_TS})\.json$")
_CKPT = re.compile(r"^(?:best_(?P<key>.+)_)?(?P<unit>epoch|iter)_(?P<n>\d+)\.pth$")

# one log record's first line: mmengine "2024/01/01 10:10:10 - mmengine - INFO - ",
# mmcv 1.x "2021-10-20 20:43:53,766 - mmdet - INFO - "; later lines of a message have no prefix
_PREFIX = re.compile(r"^(?:\d{4}/\d{2}/\d{2}|\d{4}-\d{2}-\d{2}) \d{2}:\d{2}:\d{2}(?:,\d+)? - \S+ - [A-Z]+ - ")
_HEAD = re.compile(
    r"(?P<kind>Epoch|Iter)(?:\((?P<mode>train|val|test)\))?\s*(?:\[\s*(?P<a>\d+)\s*\])?\s*"
    r"\[\s*(?P<b>\d+)\s*(?:/\s*(?P<c>\d+)\s*)?\]")
_PAIR = re.compile(r"(?:^|[\s,])(?P<k>[A-Za-z_][\w/@.\-]*):\s+(?P<v>-?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf))(?=[\s,]|$)",
                   re.IGNORECASE)
_COPY_LINE = re.compile(r"(?:^|\s)(?:coco/)?(bbox|segm)_mAP_copypaste:\s+((?:-?[0-9.]+\s*){6})")
_EVALUATING = re.compile(r"Evaluating (bbox|segm|proposal|proposal_fast|keypoints)\.\.\.|"
                         r"Evaluate annotation type \*(bbox|segm|keypoints)\*")
_BEST_LINE = re.compile(r"The best checkpoint with (-?[0-9.]+) (\S+) at (\d+) (epoch|iter) is saved to (\S+?)\.?$")
_LOAD_CKPT = re.compile(r"Load checkpoint from (\S+)")
_SEED3 = re.compile(r"^\s+seed:\s*(-?\d+)\s*$", re.MULTILINE)
_SEED2 = re.compile(r"Set random seed to (-?\d+)")
_GPUS = re.compile(r"^\s+GPU number:\s*(\d+)\s*$", re.MULTILINE)


# --------------------------------------------------------------------------------------------
# pycocotools summaries, scoped by iouType

_SUMMARY_RE = re.compile(
    r"Average (Precision|Recall)\s+\((AP|AR)\)\s+@\[\s*IoU=([0-9.:]+)\s*\|\s*area=\s*(\w+)\s*\|\s*"
    r"maxDets=\s*(\d+)\s*\]\s*=\s*(-?[0-9.]+|nan)")
_AREA = {"all": "", "small": "s", "medium": "m", "large": "l"}


def _summary_key(kind: str, iou: str, area: str, maxdets: str) -> Optional[str]:
    a = _AREA.get(area)
    if a is None:
        return None
    if kind == "AP":  # AP lines use the largest maxDets: 100 in pycocotools, 1000 in mmdet's (100, 300, 1000)
        if iou == "0.50:0.95":
            return "AP" + a
        if a == "" and iou in ("0.50", "0.5"):
            return "AP50"
        if a == "" and iou == "0.75":
            return "AP75"
        return None
    if iou != "0.50:0.95":
        return None
    if a == "":
        return {"1": "AR1", "10": "AR10", "100": "AR100"}.get(maxdets)
    return "AR" + a if maxdets == "100" else None  # mmdet's ARs@1000 is not COCO's ARs@100


def parse_coco_summaries(text: str, iou_type: str = "bbox") -> list:
    """The complete pycocotools ``COCOeval.summarize()`` blocks of one iouType in a text, in order,
    as {metric: fraction|None}.

    A block belongs to the iouType named last before it (pycocotools' ``Evaluate annotation type
    *segm*``, mmdet CocoMetric's ``Evaluating segm...``); unnamed blocks count as bbox. A keypoints
    block (``maxDets= 20``, pycocotools 2.0 ``_summarizeKps``) is never a detection summary."""
    out, cur, cur_type, kps = [], {}, "bbox", False
    blocks = []
    pos_types = [(m.start(), m.group(1) or m.group(2)) for m in _EVALUATING.finditer(text)]
    ti = 0
    block_type = "bbox"
    for m in _SUMMARY_RE.finditer(text):
        while ti < len(pos_types) and pos_types[ti][0] < m.start():
            cur_type = pos_types[ti][1]
            ti += 1
        first = m.group(2) == "AP" and m.group(3) == "0.50:0.95" and m.group(4) == "all"
        if first:  # a new block starts with AP@[.5:.95, all]
            blocks.append((block_type, kps, cur))
            cur, kps, block_type = {}, False, cur_type
        if m.group(5) == "20":
            kps = True
        key = _summary_key(m.group(2), m.group(3), m.group(4), m.group(5))
        if key is not None and key not in cur:
            cur[key] = _num(m.group(6))
    blocks.append((block_type, kps, cur))
    for btype, is_kps, block in blocks:
        btype = "bbox" if btype == "proposal" else btype
        if is_kps or btype == "keypoints" or btype != iou_type or len(block) < 6:
            continue
        out.append(block)
    return out


def _same_numbers(summary: dict, ours: dict) -> bool:
    """A pycocotools summary and CocoMetric's numbers (3 decimals) describe the same evaluation."""
    keys = [k for k in _COPYPASTE if k in ours]
    return bool(keys) and all(
        (summary.get(k) is None and ours[k] is None)
        or (summary.get(k) is not None and ours[k] is not None and abs(summary[k] - ours[k]) <= 0.0006)
        for k in keys)


# --------------------------------------------------------------------------------------------
# metric dicts of either vintage


def metrics_of(d: dict) -> dict:
    """{"bbox": {AP..}, "segm": {AP..}, "voc": mAP@0.5|None, "per_class": {cls: AP}} from one
    evaluation's keys: mmdet 3.3 CocoMetric ``coco/bbox_mAP_50`` / VOCMetric ``pascal_voc/mAP``,
    ``pascal_voc/AP50``; mmdet 2.x ``bbox_mAP_50``, ``segm_mAP``, VOC ``mAP``/``AP50``.
    Keypoint metrics (mmpose's ``coco/AP``, ``coco/AP .5``) and anything else are left out."""
    out = {"bbox": {}, "segm": {}, "voc": None, "per_class": {}}
    voc = {}
    for k, v in d.items():
        if not isinstance(k, str) or k.endswith("_copypaste"):
            continue
        name = k[5:] if k.startswith("coco/") else k
        if name.startswith(("bbox_", "segm_")):
            ours = _COCO_SUFFIX.get(name[5:])
            if ours is not None:
                out[name[:4]][ours] = _num(v)
                continue
        if k.startswith("coco/") and k.endswith("_precision"):
            out["per_class"][k[5:-10]] = _num(v)
            continue
        # VOCMetric: 3.x "pascal_voc/mAP", "pascal_voc/AP50"; 2.x VOCDataset.evaluate "mAP", "AP50"
        vk = k[11:] if k.startswith("pascal_voc/") else k
        if vk == "mAP" or re.fullmatch(r"AP\d\d", vk):
            voc[vk] = v
    if voc:
        others = [k for k in voc if k.startswith("AP") and k != "AP50"]
        # mAP averages every IoU threshold given; with others than 0.5, AP50 is the VOC number
        out["voc"] = _num(voc.get("AP50") if (others or "mAP" not in voc) else voc["mAP"])
    return out


def _has_numbers(m: dict) -> bool:
    return bool(m["bbox"] or m["segm"] or m["voc"] is not None)


def _merge(into: dict, more: dict) -> dict:
    """Values of `more` (scalars.json: full precision) over `into` (text log: 4 decimals)."""
    for t in ("bbox", "segm"):
        into[t].update({k: v for k, v in more[t].items()})
    if more["voc"] is not None:
        into["voc"] = more["voc"]
    into["per_class"].update(more["per_class"])
    return into


# --------------------------------------------------------------------------------------------
# configs: the dumped Python config, read without executing it


class _Unknown:
    pass


_UNKNOWN = _Unknown()


def _literal(node):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _literal(node.operand)
        return -v if isinstance(v, (int, float)) else _UNKNOWN
    if isinstance(node, ast.BinOp):
        a, b = _literal(node.left), _literal(node.right)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            try:
                return {ast.Mult: lambda: a * b, ast.Div: lambda: a / b, ast.Add: lambda: a + b,
                        ast.Sub: lambda: a - b}[type(node.op)]()
            except (KeyError, ZeroDivisionError):
                return _UNKNOWN
        return _UNKNOWN
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "dict":
            return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
        if node.func.id == "range":
            args = [_literal(a) for a in node.args]
            if all(isinstance(a, int) for a in args) and 1 <= len(args) <= 3:
                return list(range(*args))
    return _UNKNOWN


def parse_config(text: str) -> Optional[dict]:
    """Top-level assignments of an mmengine/mmcv config as written by ``Config.dump`` /
    ``Config.pretty_text`` (mmengine 0.10, mmcv 1.x): ``name = dict(...)``; values that are not
    literals (calls other than dict/range) become None. None when the text is not Python."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            v = _literal(node.value)
            out[node.targets[0].id] = None if v is _UNKNOWN else _strip_unknown(v)
    return out


def _strip_unknown(v):
    if isinstance(v, dict):
        return {k: _strip_unknown(x) for k, x in v.items() if x is not _UNKNOWN}
    if isinstance(v, list):
        return [_strip_unknown(x) for x in v if x is not _UNKNOWN]
    return v


def _config_block(text: str) -> Optional[str]:
    """The ``Config:\\n<pretty_text>`` message of a text log (mmengine Runner._log_env, mmdet 2.x
    tools/train.py): its lines up to the next log record."""
    i = text.find(" - Config:\n")
    if i < 0:
        return None
    lines = []
    for line in text[i + 11:].splitlines():
        if _PREFIX.match(line):
            break
        lines.append(line)
    return "\n".join(lines)


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def settings_of(cfg: dict) -> dict:
    """seed, lr, optimizer, batch size (per GPU), max epochs/iters, save_best, log interval of a
    parsed config (mmdet 3.x: randomness, optim_wrapper.optimizer, train_dataloader.batch_size,
    train_cfg, default_hooks; mmdet 2.x: optimizer, data.samples_per_gpu, runner/total_epochs,
    evaluation.save_best, log_config)."""
    opt = _get(cfg, "optim_wrapper", "optimizer") or _get(cfg, "optimizer") or {}
    s = {
        "seed": _get(cfg, "randomness", "seed") if _get(cfg, "randomness", "seed") is not None else cfg.get("seed"),
        "lr": opt.get("lr") if isinstance(opt, dict) else None,
        "optimizer": opt.get("type") if isinstance(opt, dict) else None,
        "batch_size": _get(cfg, "train_dataloader", "batch_size") or _get(cfg, "data", "samples_per_gpu"),
        "max_epochs": _get(cfg, "train_cfg", "max_epochs") or _get(cfg, "runner", "max_epochs") or cfg.get("total_epochs"),
        "max_iters": _get(cfg, "train_cfg", "max_iters") or _get(cfg, "runner", "max_iters"),
        "save_best": _get(cfg, "default_hooks", "checkpoint", "save_best") or _get(cfg, "evaluation", "save_best"),
        "log_interval": _get(cfg, "default_hooks", "logger", "interval") or _get(cfg, "log_config", "interval"),
    }
    gpu_ids = cfg.get("gpu_ids")
    if isinstance(gpu_ids, list) and gpu_ids:
        s["gpus"] = len(gpu_ids)
    if isinstance(s["save_best"], list):
        s["save_best"] = s["save_best"][0] if s["save_best"] else None
    for k in ("lr",):
        s[k] = float(s[k]) if isinstance(s[k], (int, float)) and not isinstance(s[k], bool) else None
    for k in ("seed", "batch_size", "max_epochs", "max_iters", "log_interval"):
        if not isinstance(s[k], int) or isinstance(s[k], bool):
            s[k] = None
    return s


# --------------------------------------------------------------------------------------------
# text logs (mmengine and mmcv 1.x)


def parse_text_log(text: str) -> dict:
    """A text log's training progress and evaluations.

    {"train": {"epoch", "iter", "by_epoch", "nan_iter"}, "evals": [{"split", "epoch", "iter",
    "m": metrics_of(...), "summaries": {iou: [...]}, "classwise": {...}, "line": n}], "seed",
    "gpus", "config": text|None, "best": [(score, key, n, unit, file)], "load_from": path|None}."""
    train = {"epoch": None, "iter": None, "by_epoch": None, "total": None}
    evals, best = [], []
    pending_copy = {}
    lines = text.splitlines()
    scope_start = 0
    for n, line in enumerate(lines):
        if "_mAP_copypaste:" in line:
            m = _COPY_LINE.search(line)
            if m:
                vals = m.group(2).split()
                pending_copy[m.group(1)] = {k: _num(v) for k, v in zip(_COPYPASTE, vals)}
            if "(val)" not in line and "(test)" not in line:
                continue  # mmdet 3.x logs it on a line of its own, before the Epoch(val) line
        if "The best checkpoint with" in line:
            m = _BEST_LINE.search(line)
            if m:
                best.append((float(m.group(1)), m.group(2), int(m.group(3)), m.group(4), m.group(5)))
            continue
        h = _HEAD.search(line)
        if not h or ("Epoch" not in line and "Iter" not in line):
            continue
        mode = h.group("mode") or "train"
        rest = line[h.end():]
        if mode == "train":
            if h.group("mode") is None and h.group("kind") == "Epoch" and h.group("a") is None:
                continue  # not a header
            if h.group("kind") == "Epoch" and h.group("a") is not None:
                ep, it = int(h.group("a")), int(h.group("b"))
                if train["epoch"] is None or ep >= train["epoch"]:
                    train.update(epoch=ep, by_epoch=True)
                train["iter"] = it
            elif h.group("kind") == "Iter":
                train.update(iter=int(h.group("b")), by_epoch=False)
                if h.group("c"):
                    train["total"] = int(h.group("c"))
            continue
        pairs = {m.group("k"): m.group("v") for m in _PAIR.finditer(rest)}
        metric = metrics_of({k: float(v) for k, v in pairs.items()})
        for t, vals in pending_copy.items():  # the copypaste line fills what the header line lacks
            for k, v in vals.items():
                metric[t].setdefault(k, v)
        if not _has_numbers(metric):
            continue
        pending_copy = {}
        chunk = "\n".join(lines[scope_start:n])
        scope_start = n + 1
        a = int(h.group("a")) if h.group("a") is not None else None
        e = {"split": mode, "epoch": None, "iter": None, "m": metric, "line": n, "chunk": chunk}
        if mode == "val" and h.group("kind") == "Epoch":
            e["epoch"] = a
        elif mode == "val":
            e["iter"] = train["iter"]
        evals.append(e)
    seed = _SEED3.search(text) or _SEED2.search(text)
    gpus = _GPUS.search(text)
    lm = _LOAD_CKPT.search(text)
    return {"train": train, "evals": evals, "seed": int(seed.group(1)) if seed else None,
            "gpus": int(gpus.group(1)) if gpus else None, "config": _config_block(text), "best": best,
            "load_from": lm.group(1) if lm else None}


def _nan_iter(recs: Iterable[dict]) -> Optional[int]:
    for r in recs:
        v = r.get("loss")
        if isinstance(v, float) and not math.isfinite(v):
            return r.get("iter", r.get("step"))
    return None


# --------------------------------------------------------------------------------------------
# the work dir


def _scandir(d: str) -> list:
    try:
        with os.scandir(d) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def looks_like_workdir(path) -> bool:
    """A directory with an mmengine ``<timestamp>/`` or mmcv ``<timestamp>.log[.json]``."""
    for e in _scandir(str(path)):
        if (e.is_dir() and _TS_DIR.match(e.name)) or _LOG2.match(e.name) or _JSON2.match(e.name):
            return True
    return False


def expand(paths: Iterable) -> list:
    """--workdirs paths: each work dir as given; a directory that is no work dir itself but holds
    work dirs (``work_dirs/``) stands for those, one level down, sorted. A path that does not
    exist is a UserError; anything else unreadable stays, to be reported as a row."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError(f"{p}: --workdirs path does not exist; give an MMDetection work dir "
                            "(or a directory of work dirs)")
        if p.is_dir() and not looks_like_workdir(p):
            subs = [Path(e.path) for e in _scandir(str(p)) if e.is_dir() and looks_like_workdir(e.path)]
            if subs:
                out += subs
                continue
        out.append(p)
    return out


def _ckpts(wd: str, entries) -> dict:
    """{("epoch"|"iter", n): file name} of plain checkpoints and {"best": [(key, unit, n, name)]}."""
    plain, best = {}, []
    for e in entries:
        m = _CKPT.match(e.name)
        if not m:
            continue
        if m.group("key"):
            best.append((m.group("key"), m.group("unit"), int(m.group("n")), e.name))
        else:
            plain[(m.group("unit"), int(m.group("n")))] = e.name
    return {"plain": plain, "best": best}


def _read_json_lines(path: str) -> list:
    return read_scalars(path)


def _timestamp_runs(wd: str, entries) -> list:
    """One dict per Runner start of an mmengine work dir (oldest first)."""
    runs = []
    for e in entries:
        if not (e.is_dir() and _TS_DIR.match(e.name)):
            continue
        ts = e.name
        log = _read_text(os.path.join(e.path, ts + ".log"))
        parsed = parse_text_log(log)
        vis = os.path.join(e.path, "vis_data")
        scal_file = next((f for f in (os.path.join(vis, "scalars.json"), os.path.join(vis, ts + ".json"))
                          if os.path.exists(f)), None)
        scal = read_scalars(scal_file) if scal_file else []
        train_recs = [r for r in scal if "loss" in r or "lr" in r and not any(str(k).startswith(("coco/", "pascal_voc/")) for k in r)]
        scal_evals = [(r, metrics_of(r)) for r in scal]
        scal_evals = [(r, m) for r, m in scal_evals if _has_numbers(m)]
        test_dump = os.path.join(e.path, ts + ".json")
        test_recs = read_scalars(test_dump) if os.path.exists(test_dump) else []
        cfg_file = os.path.join(vis, "config.py")
        cfg_text = _read_text(cfg_file) if os.path.exists(cfg_file) else None
        cfg_src = os.path.join(ts, "vis_data", "config.py") if cfg_text else None
        if not cfg_text and parsed["config"]:
            cfg_text, cfg_src = parsed["config"], os.path.join(ts, ts + ".log") + " (Config:)"
        train = dict(parsed["train"])
        if train["epoch"] is None and train["iter"] is None and train_recs:
            last = train_recs[-1]
            train.update(epoch=last.get("epoch"), iter=last.get("iter"), by_epoch="epoch" in last)
        has_train = train["epoch"] is not None or train["iter"] is not None
        # evaluations: the text log's, with scalars.json's values (full precision) laid over in order
        text_vals = [x for x in parsed["evals"] if x["split"] == "val"]
        evals = [x for x in parsed["evals"] if x["split"] == "test"]
        vals = []
        for i, (r, m) in enumerate(scal_evals):
            if i < len(text_vals):
                x = text_vals[i]
                _merge(x["m"], m)
                x["from"] = "scalars.json + log"
                vals.append(x)
            else:
                step = r.get("step")
                by_epoch = train["by_epoch"] is not False
                # no metric line of its own in the log: a summary anywhere in it may be this one's
                # (used only when its AP numbers match)
                vals.append({"split": "val", "epoch": step if by_epoch else None, "iter": None if by_epoch else step,
                             "m": m, "chunk": log, "from": "scalars.json"})
        vals += text_vals[len(scal_evals):]
        for x in text_vals[len(scal_evals):]:
            x["from"] = "log"
        for x in evals:
            x["from"] = "log"
        if test_recs:
            m = metrics_of(test_recs[-1])
            if _has_numbers(m):
                if evals:
                    _merge(evals[-1]["m"], m)
                    evals[-1]["from"] = f"{ts}.json + log"
                else:
                    evals.append({"split": "test", "epoch": None, "iter": None, "m": m, "chunk": log,
                                  "from": f"{ts}.json"})
        for x in vals + evals:
            x["ts"] = ts
            x["file"] = os.path.join(ts, ts + ".log") if x["from"] == "log" else x["from"]
        runs.append({"ts": ts, "log": log, "parsed": parsed, "train": train, "has_train": has_train,
                     "evals": vals + evals, "cfg_text": cfg_text, "cfg_src": cfg_src,
                     "lr_logged": next((r.get("lr") for r in train_recs if r.get("lr") is not None), None),
                     "nan_iter": _nan_iter(train_recs), "vintage": "mmengine"})
    return runs


def _mmcv_runs(wd: str, entries) -> list:
    """One dict per mmcv 1.x runner start (``<ts>.log.json`` and/or ``<ts>.log`` in the work dir)."""
    stamps = sorted({m.group(1) for e in entries for m in [_LOG2.match(e.name) or _JSON2.match(e.name)] if m})
    runs = []
    for ts in stamps:
        jpath = os.path.join(wd, ts + ".log.json")
        recs = read_scalars(jpath) if os.path.exists(jpath) else []
        log = _read_text(os.path.join(wd, ts + ".log"))
        parsed = parse_text_log(log)
        meta = recs[0] if recs and "mode" not in recs[0] else {}
        train = dict(parsed["train"])
        tr = [r for r in recs if r.get("mode") == "train"]
        if tr:
            last = tr[-1]
            by_epoch = train["by_epoch"] if train["by_epoch"] is not None else True
            train.update(epoch=last.get("epoch"), iter=last.get("iter"), by_epoch=by_epoch)
        has_train = train["epoch"] is not None or train["iter"] is not None
        evals = []
        jvals = [r for r in recs if r.get("mode") == "val"]
        if jvals:
            for r in jvals:
                m = metrics_of(r)
                if _has_numbers(m):
                    by_epoch = train["by_epoch"] is not False
                    evals.append({"split": "val", "epoch": r.get("epoch") if by_epoch else None,
                                  "iter": None if by_epoch else r.get("iter"), "m": m, "chunk": "",
                                  "from": ts + ".log.json", "file": ts + ".log.json"})
            # the text log's classwise tables and summaries, matched in order
            text_vals = [x for x in parsed["evals"] if x["split"] == "val"]
            for x, y in zip(evals, text_vals):
                x["chunk"] = y["chunk"]
        else:
            for x in parsed["evals"]:
                x["from"] = x["file"] = ts + ".log"
                if x["split"] == "val" and x["epoch"] is None and train["by_epoch"]:
                    x["epoch"] = train["epoch"]
                evals.append(x)
        for x in evals:
            x["ts"] = ts
        cfg_text = meta.get("config") if isinstance(meta.get("config"), str) else parsed["config"]
        seed = meta.get("seed") if isinstance(meta.get("seed"), int) else parsed["seed"]
        parsed["seed"] = seed
        runs.append({"ts": ts, "log": log, "parsed": parsed, "train": train, "has_train": has_train,
                     "evals": evals, "cfg_text": cfg_text,
                     "cfg_src": (ts + ".log.json (meta config)" if meta.get("config") else ts + ".log (Config:)")
                     if cfg_text else None,
                     "lr_logged": next((r.get("lr") for r in tr if isinstance(r.get("lr"), (int, float))), None),
                     "nan_iter": _nan_iter(tr), "vintage": "mmcv"})
    for e in entries:  # tools/test.py --work-dir: eval_<ts>.json
        m = _EVAL2.match(e.name)
        if not m:
            continue
        try:
            with open(e.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        met = metrics_of(data.get("metric") or {}) if isinstance(data, dict) else None
        if met and _has_numbers(met):
            runs.append({"ts": m.group(1), "log": "", "parsed": parse_text_log(""), "train": {}, "has_train": False,
                         "evals": [{"split": "test", "epoch": None, "iter": None, "m": met, "chunk": "",
                                    "from": e.name, "file": e.name, "ts": m.group(1)}],
                         "cfg_text": None, "cfg_src": None, "lr_logged": None, "nan_iter": None, "vintage": "mmcv"})
    runs.sort(key=lambda r: r["ts"])
    return runs


def _pos(x: dict) -> str:
    if x.get("epoch") is not None:
        return f"epoch {x['epoch']}"
    if x.get("iter") is not None:
        return f"iter {x['iter']}"
    return ""


def _checkpoint_of(x: dict, ck: dict, run: Optional[dict]) -> Optional[str]:
    if x["split"] == "test":
        lf = (run or {}).get("parsed", {}).get("load_from")
        return os.path.basename(lf) if lf else None
    if x.get("epoch") is not None:
        unit, n = "epoch", x["epoch"]
    elif x.get("iter") is not None:
        unit, n = "iter", x["iter"]
    else:
        return None
    for key, u, bn, name in ck["best"]:
        if u == unit and bn == n:
            return name
    return ck["plain"].get((unit, n))


def _headline(m: dict, key: Optional[str]) -> Optional[float]:
    """The value of mmdet's save_best key (``coco/bbox_mAP``, ``pascal_voc/mAP``, 2.x ``bbox_mAP``,
    ``mAP``), or of the first of bbox AP, segm AP, VOC mAP."""
    if key and key != "auto":
        name = key.split("/", 1)[1] if "/" in key else key
        if name.startswith(("bbox_", "segm_")) and _COCO_SUFFIX.get(name[5:]):
            return m[name[:4]].get(_COCO_SUFFIX[name[5:]])
        if name in ("mAP", "AP50"):
            return m["voc"]
    for v in (m["bbox"].get("AP"), m["segm"].get("AP"), m["voc"]):
        if v is not None:
            return v
    return None


def _pick(evals: list, pick: Optional[str], ck: dict, save_best) -> tuple:
    """(evaluation, why) by --pick; default: the newest test result, else the last validation."""
    tests = [x for x in evals if x["split"] == "test"]
    vals = [x for x in evals if x["split"] == "val"]
    if pick is None:
        if tests:
            return tests[-1], "default: the test result"
        return (vals[-1], "default: no test result, the last validation") if vals else (None, "")
    if pick == "test":
        return (tests[-1], "--pick test") if tests else (None, "no test result in its logs (--pick test)")
    if pick == "last":
        return (vals[-1], "--pick last: the last validation") if vals else (None, "no validation in its logs (--pick last)")
    if not vals:
        return None, "no validation in its logs (--pick best)"
    # best: mmdet's best checkpoint (CheckpointHook/EvalHook save_best), else the best headline value
    key = save_best if isinstance(save_best, str) else None
    want = key.replace("/", "_") if key else None
    for bkey, unit, n, name in sorted(ck["best"], key=lambda b: (b[0] != want, -b[2])):
        for x in reversed(vals):
            if (unit == "epoch" and x.get("epoch") == n) or (unit == "iter" and x.get("iter") == n):
                return x, f"--pick best: mmdet's {name}"
    scored = [(v, i) for i, x in enumerate(vals) for v in [_headline(x["m"], key)] if v is not None]
    if not scored:
        return vals[-1], "--pick best: no score to compare, the last validation"
    _, i = max(scored)
    what = key if key and key != "auto" else "the first metric"
    return vals[i], f"--pick best: highest {what} over the validations"


def _ar_from_summaries(x: dict, wd_texts, iou: str = "bbox") -> tuple:
    """AR numbers (and a full pycocotools summary) for the chosen evaluation's bbox (or segm): a
    summary of that iouType in the log lines just before it, else in a text file kept in the work
    dir, whose AP numbers match."""
    ours = x["m"][iou]
    if not ours:
        return None, None
    sums = parse_coco_summaries(x.get("chunk") or "", iou)
    if sums and _same_numbers(sums[-1], ours):
        return sums[-1], "pycocotools summary (log)"
    for t in wd_texts():
        for s in reversed(parse_coco_summaries(t, iou)):
            if _same_numbers(s, ours):
                return s, "pycocotools summary (log)"
    return None, None


_NO_RESULTS = "no test or validation results in its logs (still training, or never evaluated)"


def read(path, pick: Optional[str] = None) -> dict:
    """A run record from an MMDetection work dir of any vintage (see the module docstring).

    Never raises for what is in the directory: a dir that cannot be read is a record with state
    "unreadable" and the reason (a path that does not exist is the caller's UserError)."""
    wd = str(path)
    name = os.path.basename(os.path.abspath(wd))
    if pick is not None and pick not in PICKS:
        raise UserError(f"--pick {pick!r}: choose one of {', '.join(PICKS)}")
    found = _find_runs(wd, name)
    if isinstance(found, dict):  # the unreadable record
        return found
    entries, runs = found
    ck = _ckpts(wd, entries)
    training = [r for r in runs if r["has_train"]]
    train_run = training[-1] if training else None
    cfg, cfg_src = _find_config(_newest_first(runs, train_run), entries)
    settings = _settings(cfg, _newest_first(runs, train_run))
    progress = _progress(training, settings)
    unfinished = _unfinished(progress, settings)
    nan_iter = next((r["nan_iter"] for r in training if r["nan_iter"] is not None), None)
    chosen, why = _pick(_evaluations(runs), pick, ck, settings["save_best"])
    metrics, unavailable, prov = None, {}, None
    if chosen is not None:
        metrics, unavailable = _chosen_metrics(chosen, entries)
        prov = _provenance(chosen, ck, why)
    state, reason = _state(chosen is not None, unfinished, nan_iter, why)
    axes = {"workdir": name}
    if settings["seed"] is not None:
        axes["seed"] = settings["seed"]
    return {
        "run_id": name, "experiment": "workdirs", "name": name, "axes": axes, "source": "workdir",
        "state": state, "reason": reason, "run_dir": wd,
        "attempts": [{"attempt": 1, "lr": _lr(settings, training), "dir": wd, "why": "", "state": state,
                      "reason": reason, "nan": {"iter": nan_iter} if nan_iter is not None else None,
                      "has_metrics": metrics is not None}],
        "final": 1 if metrics is not None else None, "metrics": metrics, "unavailable": unavailable,
        "retry": {}, "provenance": prov, "config": _config_summary(settings, cfg_src, train_run),
        "progress": progress,
    }


def _find_runs(wd: str, name: str):
    """(entries, runs): the work dir's entries and its Runner starts of either vintage, oldest
    first; or the unreadable record when it is no work dir or cannot be read."""
    if not os.path.isdir(wd):
        if not os.path.exists(wd):
            raise UserError(f"{wd}: --workdirs path does not exist; give an MMDetection work dir")
        return _unreadable(wd, name, "not a directory (give the work dir, not a file in it)")
    try:
        entries = _scandir(wd)
        runs = _timestamp_runs(wd, entries) + _mmcv_runs(wd, entries)
    except (OSError, UnicodeError) as exc:
        return _unreadable(wd, name, f"cannot be read ({exc.__class__.__name__}: {exc})")
    if not runs:
        return _unreadable(wd, name, "no mmengine <timestamp>/ folder and no mmcv <timestamp>.log(.json): "
                                     "not an MMDetection work dir")
    return entries, runs


def _newest_first(runs: list, train_run: Optional[dict]) -> list:
    """The runs to take a setting from, in order: the training run, then every run newest first."""
    return ([train_run] if train_run else []) + list(reversed(runs))


def _find_config(candidates: list, entries) -> tuple:
    """(config, its file): the first candidate run's own dump or logged config that parses, else
    the config file mmdet put in the work dir itself; (None, None) when there is none."""
    for r in candidates:
        if r["cfg_text"]:
            cfg = parse_config(r["cfg_text"])
            if cfg is not None:
                return cfg, r["cfg_src"]
    for e in entries:
        if e.is_file() and e.name.endswith(".py"):
            cfg = parse_config(_read_text(e.path))
            if cfg is not None:
                return cfg, e.name
    return None, None


def _settings(cfg: Optional[dict], candidates: list) -> dict:
    """settings_of the config; a seed the config does not set comes from the first candidate run's
    log that names one."""
    settings = settings_of(cfg or {})
    if settings["seed"] is None:
        settings["seed"] = next((r["parsed"]["seed"] for r in candidates if r["parsed"]["seed"] is not None), None)
    return settings


def _progress(training: list, settings: dict) -> dict:
    """The last trained epoch/iter over all training runs (a resumed run continues in a new
    timestamp) beside the config's max_epochs/max_iters."""
    last_epoch = max((r["train"]["epoch"] for r in training if r["train"].get("epoch") is not None), default=None)
    last_iter = max((r["train"]["iter"] for r in training if r["train"].get("iter") is not None
                     and r["train"].get("by_epoch") is False), default=None)
    return {"epoch": last_epoch, "iter": last_iter, "max_epochs": settings["max_epochs"],
            "max_iters": settings["max_iters"]}


def _unfinished(progress: dict, settings: dict) -> Optional[str]:
    """Why training stopped before the config's train_cfg end, or None when it did not."""
    last_epoch, last_iter = progress["epoch"], progress["iter"]
    if last_epoch is not None and settings["max_epochs"] and last_epoch < settings["max_epochs"]:
        return f"stopped at epoch {last_epoch} of max_epochs {settings['max_epochs']}"
    if last_iter is not None and settings["max_iters"]:
        slack = settings["log_interval"] or 50
        if last_iter + slack <= settings["max_iters"]:
            return f"stopped at iter {last_iter} of max_iters {settings['max_iters']}"
    return None


def _evaluations(runs: list) -> list:
    """Every evaluation of the runs, oldest first, each tagged with its run (``_run``); one per
    position: a resumed run's repeat of a validation epoch replaces the earlier one."""
    seen, out = {}, []
    for r in runs:
        for x in r["evals"]:
            x["_run"] = r
            key = (x["split"], x.get("epoch"), x.get("iter")) if x["split"] == "val" else (id(x),)
            if key in seen:
                out[seen[key]] = x
            else:
                seen[key] = len(out)
                out.append(x)
    return out


def _lazy_wd_texts(entries):
    """A function giving the work dir's other text files (job outputs ``.out``, ``.txt``, a
    ``.log`` that is no mmcv log), read on the first call only."""
    texts = None

    def wd_texts():
        nonlocal texts
        if texts is None:
            texts = [_read_text(e.path) for e in entries
                     if e.is_file() and e.name.endswith((".out", ".txt")) or
                     (e.is_file() and e.name.endswith(".log") and not _LOG2.match(e.name))]
        return texts
    return wd_texts


def _with_summary(chosen: dict, wd_texts, iou: str) -> tuple:
    """(numbers, why a missing one is missing, evaluator): the chosen evaluation's numbers of one
    iouType, or all of a pycocotools summary of the same evaluation when the logs keep one."""
    summ, ev = _ar_from_summaries(chosen, wd_texts, iou)
    if summ is None:
        return dict(chosen["m"][iou]), "n/a (CocoMetric)", None
    return {k: summ.get(k) for k in COCO_METRICS if k in summ}, "n/a (not in its summary)", ev


def _chosen_metrics(chosen: dict, entries) -> tuple:
    """(metrics, unavailable) of the chosen evaluation: bbox (with VOC mAP), segm, per-class AP and
    the evaluator; unavailable says why each metric it lacks is n/a."""
    m = chosen["m"]
    evaluator = "VOCMetric" if not m["bbox"] and not m["segm"] else (
        "CocoMetric" if chosen["_run"]["vintage"] == "mmengine" else "mmdet 2.x CocoDataset.evaluate")
    wd_texts = _lazy_wd_texts(entries)
    bbox, segm, unavailable = dict(m["bbox"]), dict(m["segm"]), {}
    if bbox:
        bbox, why_na, ev = _with_summary(chosen, wd_texts, "bbox")
        evaluator = ev or evaluator
        unavailable.update({k: why_na for k in COCO_METRICS if k not in bbox})
    elif m["voc"] is not None and not segm:
        unavailable.update({k: "n/a (VOCMetric)" for k in COCO_METRICS})
    if segm:
        segm, why_na, _ev = _with_summary(chosen, wd_texts, "segm")
        unavailable.update({"segm " + k: why_na for k in COCO_METRICS if k not in segm})
    if m["voc"] is not None:
        bbox[VOC_METRIC] = m["voc"]
    per_class = _scoped_classwise(chosen.get("chunk") or "")
    if not per_class and not segm:
        per_class = dict(m["per_class"])  # CocoMetric's coco/<class>_precision (bbox when no segm)
    metrics = {"bbox": bbox, "per_class": per_class, "evaluator": evaluator}
    if segm:
        metrics["segm"] = segm
    return metrics, unavailable


def _provenance(chosen: dict, ck: dict, why: str) -> dict:
    """Where the chosen numbers come from; a test names the epoch/iter of the checkpoint it loaded."""
    prov = {"timestamp": chosen.get("ts"), "split": chosen["split"], "epoch": chosen.get("epoch"),
            "iter": chosen.get("iter"), "checkpoint": _checkpoint_of(chosen, ck, chosen["_run"]), "pick": why,
            "file": chosen.get("file")}
    if chosen["split"] == "test" and prov["checkpoint"]:
        cm = _CKPT.match(prov["checkpoint"])
        if cm:
            prov[cm.group("unit")] = int(cm.group("n"))
    return prov


def _state(has_results: bool, unfinished: Optional[str], nan_iter: Optional[int], why: str) -> tuple:
    """(state, reason): results of an unfinished training are unfinished, NaN without results is
    failed, no results at all unknown (why --pick found none)."""
    if has_results:
        if unfinished:
            return UNFINISHED, unfinished
        if nan_iter is not None:
            return "done", f"training loss NaN from iter {nan_iter}; results come from a diverged model"
        return "done", ""
    if nan_iter is not None:
        return "failed", f"NaN at iter {nan_iter} (no results)"
    if unfinished:
        return UNFINISHED, unfinished + "; no results in its logs"
    return "unknown", why or _NO_RESULTS  # without --pick, why is empty


def _lr(settings: dict, training: list) -> Optional[float]:
    """The config's lr, else the last one a training run logged."""
    if settings["lr"] is not None:
        return settings["lr"]
    return next((r["lr_logged"] for r in reversed(training) if r["lr_logged"] is not None), None)


def _config_summary(settings: dict, cfg_src: Optional[str], train_run: Optional[dict]) -> dict:
    """The record's ``config``: the training run's settings; batch_size is the total over its GPUs."""
    gpus = (train_run or {}).get("parsed", {}).get("gpus") or settings.get("gpus")
    batch = settings["batch_size"]
    return {"file": cfg_src, "seed": settings["seed"], "lr": settings["lr"], "optimizer": settings["optimizer"],
            "batch_size": batch * gpus if batch and gpus else batch, "batch_per_gpu": batch, "gpus": gpus,
            "max_epochs": settings["max_epochs"], "max_iters": settings["max_iters"],
            "save_best": settings["save_best"], "training_run": train_run["ts"] if train_run else None}


def _scoped_classwise(chunk: str) -> dict:
    """The bbox classwise table in the log lines before an evaluation (CocoMetric logs one per
    metric after ``Evaluating <metric>...``; a segm table is not bbox AP)."""
    if "| category" not in chunk:
        return {}
    marks = [(m.start(), m.group(1) or m.group(2)) for m in _EVALUATING.finditer(chunk)]
    if not marks:
        return parse_classwise_table(chunk)
    out = {}
    for i, (start, kind) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else len(chunk)
        if kind in ("bbox", "proposal"):
            out = parse_classwise_table(chunk[start:end]) or out
    return out


def _unreadable(wd: str, name: str, why: str) -> dict:
    return {
        "run_id": name, "experiment": "workdirs", "name": name, "axes": {"workdir": name}, "source": "workdir",
        "state": UNREADABLE, "reason": f"{wd}: {why}", "run_dir": wd, "attempts": [], "final": None,
        "metrics": None, "unavailable": {}, "retry": {}, "provenance": None, "config": None, "progress": None,
    }


def describe(rec: dict) -> str:
    """One line: where a work dir's numbers come from and what its training run was (footnotes)."""
    p, c = rec.get("provenance"), rec.get("config") or {}
    bits = []
    if p:
        where = [p["split"] if p["split"] == "test" else "validation"]
        if _pos(p):
            where.append("at " + _pos(p))
        if p.get("timestamp"):
            where.append(f"of {p['timestamp']}")
        s = " ".join(where)
        if p.get("checkpoint"):
            s += f", checkpoint {p['checkpoint']}"
        if p.get("file"):
            s += f" ({p['file']})"
        bits.append(s + f"; {p['pick']}")
    elif rec.get("state") == UNREADABLE:
        return f"{rec['name']}: {rec['reason']}"
    cfg = []
    if c.get("optimizer") or c.get("lr") is not None:
        cfg.append(" ".join(x for x in (c.get("optimizer"), f"lr {c['lr']:g}" if c.get("lr") is not None else "") if x))
    if c.get("batch_size"):
        cfg.append(f"batch {c['batch_per_gpu']}×{c['gpus']}" if c.get("gpus") and c.get("batch_per_gpu")
                   else f"batch {c['batch_size']}/GPU")
    if c.get("max_epochs"):
        cfg.append(f"max_epochs {c['max_epochs']}")
    elif c.get("max_iters"):
        cfg.append(f"max_iters {c['max_iters']}")
    if c.get("seed") is not None:
        cfg.append(f"seed {c['seed']}")
    if cfg:
        bits.append("config " + (c.get("file") or "?") + ": " + ", ".join(cfg))
    if rec.get("state") == UNFINISHED:
        bits.append("UNFINISHED: " + rec["reason"])
    return f"{rec['name']}: " + "; ".join(bits) if bits else f"{rec['name']}: {rec.get('reason') or 'no results'}"
