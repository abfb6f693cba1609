"""COCO bbox evaluation of a detections dump (issue 21 item 1): the fast evaluator against pycocotools.

A synthetic COCO-val2017-sized case: 5000 images x 100 detections (500,000 results, about 36,000
ground-truth boxes over 80 categories; ``--quick``: 500 images). ``ssflctl.evaluation.coco.evaluate`` runs
once per evaluator, each in its own fresh Python process, reading the same two JSON files, so the
figures include JSON loading (as the test step pays it). Per process: wall time of ``evaluate()``
(seconds) and the process's peak resident set (its own ``VmHWM`` at exit, benchmarks.childproc;
reported in MB = 10^6 bytes). Ratios are pycocotools / ours, measured in the same run.
Targets (issue 21): >= 5x faster, <= 1.3 GB.

``make_case`` is also the realistic dump of ``tests/test_coco_eval.py``.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_SPEEDUP = 5.0
TARGET_MB = 1300.0
ROOT = Path(__file__).resolve().parents[1]

# COCO's category ids skip numbers (1..90 for 80 classes); keep that shape.
_COCO_SKIPPED = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def make_case(n_images: int = 5000, dets_per_image: int = 100, n_classes: int = 80, seed: int = 0,
              large: bool = True, extras: bool = True):
    """(ground-truth dict, detections list) shaped like COCO val2017 and an mmdet results dump.

    Ground truth: about 7 objects per image (COCO val2017: 7.3), box sides log-uniform 4..500 px
    (small, medium and large by COCO's area ranges), ``area`` = 45-95 % of the box (a mask area,
    as in COCO), about 1 % crowd regions, 2 % images without objects, image and category ids not
    contiguous. Detections: 85 % of objects found (jittered box), 15 % of those found twice, hits on
    crowd regions, false positives up to ``dets_per_image``, then the top ``dets_per_image`` by
    score (mmdet's ``max_per_img``); 3 % images without any detection; scores rounded to 3 digits
    (ties). ``large=False`` keeps every box under 96 px (no large objects: APl/ARl are COCOeval's
    -1). ``extras`` adds the corner cases: a category with no ground truth but detections (its AP
    is -1), a category with ground truth but no detections (AP 0), and two objects with ``area``
    -1 (in no area range)."""
    rng = random.Random(seed)
    cat_ids = [i for i in range(1, 91) if i not in _COCO_SKIPPED][:n_classes]
    if len(cat_ids) < n_classes:
        cat_ids += list(range(100, 100 + n_classes - len(cat_ids)))
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in cat_ids]
    no_gt_cat = cat_ids[-1] if extras else None
    no_dt_cat = cat_ids[-2] if extras else None
    gt_cats = [c for c in cat_ids if c != no_gt_cat]
    dt_cats = [c for c in cat_ids if c != no_dt_cat]
    max_side = 500.0 if large else 95.0
    images, anns, dets = [], [], []
    img_id = 100
    for i in range(n_images):
        img_id += rng.randint(1, 50)
        w, h = rng.choice(((640, 480), (480, 640), (640, 427), (500, 375), (640, 640)))
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"{img_id:012d}.jpg"})
        n_obj = 0 if rng.random() < 0.02 else min(60, int(rng.expovariate(1 / 7.0)) + 1)
        objs = []
        for _ in range(n_obj):
            bw = min(w - 1.0, 4.0 * (max_side / 4.0) ** rng.random())
            bh = min(h - 1.0, max(2.0, bw * rng.uniform(0.5, 2.0)))
            if not large:
                bh = min(bh, max_side)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            crowd = rng.random() < 0.01
            if crowd:  # a crowd region: a big box over a group
                bw, bh = min(w - 1.0, bw * 3), min(h - 1.0, bh * 3)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = rng.choice(gt_cats)
            area = bw * bh * rng.uniform(0.45, 0.95)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat,
                         "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                         "area": area, "iscrowd": int(crowd), "segmentation": []})
            objs.append((cat, x, y, bw, bh, crowd))
        if rng.random() < 0.03:
            continue  # the detector found nothing here
        img_dets = []
        for cat, x, y, bw, bh, crowd in objs:
            if cat == no_dt_cat or rng.random() > (0.5 if crowd else 0.85):
                continue
            for k in range(2 if rng.random() < 0.15 else 1):
                s = max(bw, bh) * (0.04 + 0.1 * k)
                img_dets.append((cat, x + rng.gauss(0, s), y + rng.gauss(0, s),
                                 bw * rng.uniform(0.85, 1.15), bh * rng.uniform(0.85, 1.15),
                                 rng.betavariate(4, 1.5) * (0.6 if k else 1.0)))
        while len(img_dets) < dets_per_image:
            bw = 4.0 * (max_side / 4.0) ** rng.random()
            bh = max(2.0, bw * rng.uniform(0.5, 2.0))
            img_dets.append((rng.choice(dt_cats), rng.uniform(0, w - min(bw, w - 1)),
                             rng.uniform(0, h - min(bh, h - 1)), bw, bh, rng.betavariate(1, 6)))
        img_dets.sort(key=lambda d: -d[5])
        for cat, x, y, bw, bh, score in img_dets[:dets_per_image]:
            dets.append({"image_id": img_id, "category_id": cat,
                         "bbox": [round(x, 3), round(y, 3), round(bw, 3), round(bh, 3)],
                         "score": round(score, 3)})
    if extras and len(anns) >= 2:
        anns[0]["area"] = -1.0
        anns[len(anns) // 2]["area"] = -1.0
    gt = {"info": {"description": f"synthetic COCO-like set, seed {seed}"}, "images": images,
          "annotations": anns, "categories": cats}
    return gt, dets


_CHILD = r"""
import json, os, resource, sys, time
from ssflctl.evaluation import coco as coco_eval
ann, dets, which = sys.argv[1:4]
t0 = time.perf_counter()
m = coco_eval.evaluate(ann, dets, evaluator=which)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "bbox": m["bbox"], "per_class": m["per_class"], "evaluator": m["evaluator"],
                  "evaluator_version": m.get("evaluator_version")}))
"""


def _measure(ann: Path, dets: Path, which: str) -> dict:
    """Evaluate in a fresh process: its result, evaluate() seconds, and the process's peak RSS in MB
    (its own VmHWM, see benchmarks.childproc)."""
    from benchmarks import childproc

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        r = childproc.run("-c", _CHILD, [str(ann), str(dets), which], env=env, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        if r["rc"] != 0:
            raise RuntimeError(f"{which}: evaluation failed:\n{err.read()[-2000:]}")
        res = json.loads(out.read().strip().splitlines()[-1])
    res["peak_mb"] = r["peak_mb"]
    res["cpu_s"] = r["cpu_s"]  # the whole process: interpreter, imports, evaluation
    return res


def run(quick: bool = False) -> list:
    from ssflctl.evaluation import coco as coco_eval

    n_images = 500 if quick else 5000
    fast = coco_eval.fast_evaluator()
    with tempfile.TemporaryDirectory(prefix="bench-cocoeval-") as tmp:
        gt, dets = make_case(n_images, 100, seed=0, extras=False)
        ann, dfile = Path(tmp) / "gt.json", Path(tmp) / "dets.json"
        ann.write_text(json.dumps(gt))
        dfile.write_text(json.dumps(dets))
        n_gt, n_dt = len(gt["annotations"]), len(dets)
        del gt, dets
        ref = _measure(ann, dfile, "pycocotools")
        ours = _measure(ann, dfile, fast) if fast else None
    load = os.getloadavg()[0]
    size = f"{n_images} images x 100 dets ({n_dt} results, {n_gt} objects)"
    if ours is None:
        return [{"name": f"COCO eval, {size}", "value": ref["seconds"], "reference": ref["seconds"], "ratio": 1.0,
                 "unit": "s", "note": "faster-coco-eval is not installed: pycocotools only"}]
    same = all((ours["bbox"][k] is None) == (ref["bbox"][k] is None)
               and (ref["bbox"][k] is None or abs(ours["bbox"][k] - ref["bbox"][k]) <= 1e-12)
               for k in coco_eval.STAT_NAMES)
    worst = max(abs((ours["per_class"][c] or 0) - (ref["per_class"][c] or 0)) for c in ref["per_class"])
    note_eq = f"12 numbers {'equal' if same else 'DIFFER'}, per-class AP max |diff| {worst:.1e}"
    return [
        {"name": f"COCO eval time, {size}", "value": ours["seconds"], "reference": ref["seconds"],
         "ratio": ref["seconds"] / ours["seconds"], "unit": "s",
         "note": f"{ours['evaluator']} {ours['evaluator_version']} vs pycocotools {ref['evaluator_version']}; "
                 f"{note_eq}; process CPU {ours['cpu_s']:.1f} s vs {ref['cpu_s']:.1f} s; "
                 f"target >= {TARGET_SPEEDUP:g}x; load average {load:.1f} on {os.cpu_count()} cores"},
        {"name": f"COCO eval peak RSS, {size}", "value": ours["peak_mb"], "reference": ref["peak_mb"],
         "ratio": ref["peak_mb"] / ours["peak_mb"], "unit": "MB",
         "note": f"each evaluator in its own process (its own VmHWM, benchmarks.childproc); target <= {TARGET_MB:g} MB"},
    ]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    for row in run(quick):
        print(f"{row['name']}: {row['value']:.3f} {row['unit']} (reference {row['reference']:.3f}, "
              f"ratio {row['ratio']:.2f}) — {row['note']}")
