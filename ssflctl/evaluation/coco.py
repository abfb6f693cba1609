"""Standard COCO bbox evaluation of a detections dump (the 12 numbers + per-class AP).

MMDetection's ``CocoMetric`` evaluates with ``maxDets=(100, 300, 1000)`` and never reports AR@1 and
AR@10, while the tables our users publish use the standard COCO parameters
(``maxDets=(1, 10, 100)``). The test step therefore dumps the detections
(``detections.bbox.json``) and this module evaluates the dump with pycocotools' defaults.

Values are COCOeval fractions in [0, 1]; COCOeval's -1 ("no ground truth for this area or class")
becomes ``None``. An empty detection set evaluates to zeros (and ``None`` where there is no ground
truth) instead of failing.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ssflctl.atomic import load_json
from ssflctl.errors import UserError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _num(x: float) -> Optional[float]:
    x = float(x)
    return None if x < 0 else x


def _load_dets(dets: Union[str, Path, List[dict]]) -> List[dict]:
    if isinstance(dets, (str, Path)):
        dets = load_json(dets, "detections file", "; run the test step first")
    if not isinstance(dets, list):
        raise UserError("detections: expected a JSON list of COCO results")
    return dets


def evaluate(ann_file, dets_file, classwise: bool = True, iou_type: str = "bbox") -> Dict[str, Any]:
    """Evaluate ``dets_file`` (COCO results JSON, or a list of result dicts) against ``ann_file``.

    Returns the ``metrics.json`` body: ``{"bbox": {AP..ARl}, "per_class": {name: AP|None},
    "num_images", "num_detections", "evaluator", "ann_file"}``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ann_file = str(ann_file)
    if not Path(ann_file).is_file():
        raise UserError(f"{ann_file}: annotation file not found")
    dets = _load_dets(dets_file)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        if dets:
            dt = gt.loadRes(dets)
        else:
            # COCO.loadRes cannot take an empty list: build an empty result set by hand.
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset.get("images", [])),
                          "categories": list(gt.dataset.get("categories", [])), "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: _num(v) for name, v in zip(STAT_NAMES, ev.stats)}
    per_class: Dict[str, Optional[float]] = {}
    if classwise:
        # precision: [T iou thresholds, R recall, K classes, A areas, M maxDets]; area=all, maxDets=100
        precision = ev.eval["precision"]
        for k, cat_id in enumerate(ev.params.catIds):
            name = gt.cats[cat_id]["name"]
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[name] = float(p.mean()) if p.size else None
    return {
        iou_type: stats,
        "per_class": per_class,
        "num_images": len(ev.params.imgIds),
        "num_detections": len(dets),
        "evaluator": "pycocotools",
        "ann_file": ann_file,
    }
