"""Standard COCO bbox evaluation of a detections dump (the 12 numbers + per-class AP).

MMDetection's ``CocoMetric`` evaluates with ``maxDets=(100, 300, 1000)`` and never reports AR@1 and
AR@10, while the tables our users publish use the standard COCO parameters
(``maxDets=(1, 10, 100)``). The test step therefore dumps the detections
(``detections.bbox.json``) and this module evaluates the dump with COCOeval's defaults.

Evaluators: ``faster-coco-eval`` (a maintained drop-in for pycocotools whose per-image matching and
accumulation are C++; 1.8.0 tested) where installed, else ``pycocotools`` (the reference, 2.0.7+).
Both give the same 12 numbers and per-class AP (``tests/test_coco_eval.py``: equal within 1e-12 on
cocoapi's published fake-results case and on a realistic synthetic dump; they differ by float
summation order only). On 5000 synthetic images x 100 detections (``benchmarks/bench_cocoeval.py``,
2 shared cores, faster-coco-eval 1.8.0 / pycocotools 2.0.11): 14.1 s against 88.0 s (6.2x, load
average 4.2; 4.8x in a later run at load average 8.3), peak RSS 1261 MB against 2554 MB (10^6 bytes). ``SSFLCTL_COCO_EVALUATOR=pycocotools`` (or the
``evaluator`` argument) forces one; ``metrics.json`` records which ran (``evaluator``,
``evaluator_version``).

Values are COCOeval fractions in [0, 1]; COCOeval's -1 ("no ground truth for this area or class")
becomes ``None``. An empty detection set evaluates to zeros (and ``None`` where there is no ground
truth) instead of failing.
"""
from __future__ import annotations

import contextlib
import json
import io
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ssflctl.atomic import load_json
from ssflctl.errors import UserError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

FAST = "faster-coco-eval"
REFERENCE = "pycocotools"
EVALUATORS = (FAST, REFERENCE)
ENV_VAR = "SSFLCTL_COCO_EVALUATOR"  # "auto" (default), "faster-coco-eval" or "pycocotools"


def _num(x: float) -> Optional[float]:
    x = float(x)
    return None if x < 0 else x


def _load_dets(dets: Union[str, Path, List[dict]]) -> List[dict]:
    if isinstance(dets, (str, Path)):
        dets = load_json(dets, "detections file", "; run the test step first")
    if not isinstance(dets, list):
        raise UserError("detections: expected a JSON list of COCO results")
    return dets


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # not installed as a distribution (vendored, odd path)
        return None


def fast_evaluator() -> Optional[str]:
    """``"faster-coco-eval"`` when it imports, else None."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return None
    return FAST


def _choose(evaluator: Optional[str]) -> str:
    want = (evaluator or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if want == "auto":
        return fast_evaluator() or REFERENCE
    if want in ("faster_coco_eval", "faster-coco-eval", "fast"):
        if fast_evaluator() is None:
            raise UserError(f"COCO evaluator {FAST!r} is not installed; pip install faster-coco-eval "
                            f"(or unset {ENV_VAR})")
        return FAST
    if want == REFERENCE:
        return REFERENCE
    raise UserError(f"COCO evaluator {evaluator or os.environ.get(ENV_VAR)!r}: choose auto, {FAST} or {REFERENCE}"
                    f" (argument or {ENV_VAR})")


def _int_image_ids(ann_file: str) -> bool:
    """True when every image id of the annotation file is an int (COCO's own files; VOC copies are not)."""
    with open(ann_file, "rb") as fh:
        data = json.load(fh)
    return all(isinstance(img.get("id"), int) for img in data.get("images") or [])


def _api(name: str):
    """(COCO class, COCOeval class) of one evaluator."""
    if name == FAST:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def evaluate(ann_file, dets_file, classwise: bool = True, iou_type: str = "bbox",
             evaluator: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate ``dets_file`` (COCO results JSON, or a list of result dicts) against ``ann_file``.

    ``evaluator``: "auto" (default; ``$SSFLCTL_COCO_EVALUATOR`` when set), "faster-coco-eval" or
    "pycocotools". Returns the ``metrics.json`` body: ``{"bbox": {AP..ARl}, "per_class": {name:
    AP|None}, "num_images", "num_detections", "evaluator", "evaluator_version", "ann_file"}``.
    """
    name = _choose(evaluator)
    ann_file = str(ann_file)
    if not Path(ann_file).is_file():
        raise UserError(f"{ann_file}: annotation file not found")
    if name == FAST and evaluator is None and not _int_image_ids(ann_file):
        # faster-coco-eval 1.8.0 casts every image id to int (COCO.createIndex); mmdet's COCO copy of
        # Pascal VOC's ground truth has string ids ('2007_000027'): the reference evaluator takes them
        name = REFERENCE
    COCO, COCOeval = _api(name)
    dets = _load_dets(dets_file)
    n_dets = len(dets)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        if dets:
            if name == FAST and iou_type == "bbox":
                # faster-coco-eval's loadRes (1.8.0) gives every bbox result without a segmentation a
                # 4-corner polygon, which bbox IoU never reads: an empty one saves ~100 MB of the ~1.3 GB
                # peak at 500k results (tests/test_coco_eval.py checks the numbers stay equal)
                for d in dets:
                    if "segmentation" not in d:
                        d["segmentation"] = []
            dt = gt.loadRes(dets)
        else:
            # pycocotools' COCO.loadRes cannot take an empty list: build an empty result set by hand.
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset.get("images", [])),
                          "categories": list(gt.dataset.get("categories", [])), "annotations": []}
            dt.createIndex()
        del dets  # loadRes keeps (and annotates) the same dicts; drop our reference
        # faster-coco-eval logs its summary through `logging` (INFO) instead of print: keep it quiet too
        quiet = {"print_function": lambda *a, **k: None} if name == FAST else {}
        ev = COCOeval(gt, dt, iou_type, **quiet)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {n: _num(v) for n, v in zip(STAT_NAMES, ev.stats)}
    per_class: Dict[str, Optional[float]] = {}
    if classwise:
        # precision: [T iou thresholds, R recall, K classes, A areas, M maxDets]; area=all, maxDets=100
        precision = ev.eval["precision"]
        for k, cat_id in enumerate(ev.params.catIds):
            cname = gt.cats[int(cat_id)]["name"]
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[cname] = float(p.mean()) if p.size else None
    return {
        iou_type: stats,
        "per_class": per_class,
        "num_images": len(ev.params.imgIds),
        "num_detections": n_dets,
        "evaluator": name,
        "evaluator_version": _version(name),
        "ann_file": ann_file,
    }
