"""ssflctl.evaluation.coco: the 12 standard COCO numbers + per-class AP of a detections dump, from
faster-coco-eval and from pycocotools (the reference), equal on the same dumps."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from ssflctl.evaluation import coco as coco_eval
from ssflctl.convert import synth_coco
from ssflctl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_cocoeval import make_case  # noqa: E402  (the benchmark's realistic dump)

pytestmark = pytest.mark.unit
FAST_INSTALLED = coco_eval.fast_evaluator() is not None
needs_fast = pytest.mark.skipif(not FAST_INSTALLED, reason="faster-coco-eval is not installed")
BOTH = ["pycocotools", pytest.param("faster-coco-eval", marks=needs_fast)]
CASE_DIR = Path(__file__).parent / "data" / "cocoapi_fake"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    out = synth_coco.generate(root, n_train=0, n_val=12, size=(96, 96), seed=3)
    return root, out["val"]["ann_file"]


def _noisy_dets(ann_file, seed=0):
    rng = random.Random(seed)
    gt = json.load(open(ann_file))
    dets = []
    for a in gt["annotations"]:
        if rng.random() < 0.2:  # missed
            continue
        x, y, w, h = a["bbox"]
        j = lambda v: v + rng.uniform(-0.15, 0.15) * max(w, h)  # noqa: E731
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [j(x), j(y), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)],
                     "score": rng.uniform(0.3, 1.0)})
    for img in gt["images"]:  # false positives
        dets.append({"image_id": img["id"], "category_id": rng.choice(gt["categories"])["id"],
                     "bbox": [rng.uniform(0, 40), rng.uniform(0, 40), 20, 20], "score": rng.uniform(0, 0.6)})
    return dets


def _direct(ann_file, dets_file):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        dt = gt.loadRes(str(dets_file))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    return gt, ev


def test_equals_direct_pycocotools(synth, tmp_path):
    _, ann = synth
    dets_file = tmp_path / "dets.json"
    dets_file.write_text(json.dumps(_noisy_dets(ann)))
    m = coco_eval.evaluate(ann, dets_file, evaluator="pycocotools")
    gt, ev = _direct(ann, dets_file)
    assert list(m["bbox"]) == list(coco_eval.STAT_NAMES)
    for name, v in zip(coco_eval.STAT_NAMES, ev.stats):
        assert m["bbox"][name] == (None if v < 0 else pytest.approx(float(v), abs=1e-12)), name
    assert 0 < m["bbox"]["AP50"] < 1 and m["bbox"]["AR1"] is not None and m["bbox"]["AR10"] is not None
    prec = ev.eval["precision"]
    for k, cid in enumerate(ev.params.catIds):
        p = prec[:, :, k, 0, -1]
        assert m["per_class"][gt.cats[cid]["name"]] == pytest.approx(float(p[p > -1].mean()))
    assert set(m["per_class"]) == set(synth_coco.CLASSES)
    assert m["num_images"] == 12 and m["num_detections"] == len(json.loads(dets_file.read_text()))
    assert m["evaluator"] == "pycocotools" and m["evaluator_version"]


def _assert_same(a: dict, b: dict, tol: float = 1e-12) -> float:
    """The 12 numbers and per-class AP of two metrics.json bodies agree (None where the other is None,
    else within tol); returns the largest difference seen."""
    worst = 0.0
    assert list(a["bbox"]) == list(b["bbox"]) == list(coco_eval.STAT_NAMES)
    assert list(a["per_class"]) == list(b["per_class"])
    for part in ("bbox", "per_class"):
        for k, va in a[part].items():
            vb = b[part][k]
            assert (va is None) == (vb is None), (part, k, va, vb)
            if va is not None:
                assert abs(va - vb) <= tol, (part, k, va, vb)
                worst = max(worst, abs(va - vb))
    assert a["num_images"] == b["num_images"] and a["num_detections"] == b["num_detections"]
    return worst


def test_default_evaluator_and_override(synth, tmp_path, monkeypatch):
    _, ann = synth
    dets = _noisy_dets(ann)
    monkeypatch.delenv(coco_eval.ENV_VAR, raising=False)
    m = coco_eval.evaluate(ann, [dict(d) for d in dets])
    assert m["evaluator"] == ("faster-coco-eval" if FAST_INSTALLED else "pycocotools") and m["evaluator_version"]
    monkeypatch.setenv(coco_eval.ENV_VAR, "pycocotools")
    assert coco_eval.evaluate(ann, [dict(d) for d in dets])["evaluator"] == "pycocotools"
    monkeypatch.setenv(coco_eval.ENV_VAR, "detectron2")
    with pytest.raises(UserError, match="choose auto, faster-coco-eval or pycocotools"):
        coco_eval.evaluate(ann, dets)
    monkeypatch.delenv(coco_eval.ENV_VAR)
    monkeypatch.setattr(coco_eval, "fast_evaluator", lambda: None)  # not installed: the reference runs
    assert coco_eval.evaluate(ann, [dict(d) for d in dets])["evaluator"] == "pycocotools"
    with pytest.raises(UserError, match="pip install faster-coco-eval"):
        coco_eval.evaluate(ann, dets, evaluator="faster-coco-eval")


def _case_stats(gt: dict, dets: list) -> dict:
    """What the synthetic case holds (so the equality below covers it)."""
    areas = [a["area"] for a in gt["annotations"] if not a["iscrowd"]]
    with_gt = {a["image_id"] for a in gt["annotations"]}
    with_dt = {d["image_id"] for d in dets}
    scores = [d["score"] for d in dets]
    return {"crowd": sum(a["iscrowd"] for a in gt["annotations"]),
            "small": sum(0 <= x < 32 ** 2 for x in areas), "medium": sum(32 ** 2 <= x < 96 ** 2 for x in areas),
            "large": sum(x >= 96 ** 2 for x in areas), "area_-1": sum(x == -1 for x in areas),
            "images_without_gt": sum(i["id"] not in with_gt for i in gt["images"]),
            "images_without_dets": sum(i["id"] not in with_dt for i in gt["images"]),
            "score_ties": len(scores) - len(set(scores))}


@needs_fast
@pytest.mark.parametrize("large", [True, False])
def test_fast_equals_reference_on_a_realistic_dump(tmp_path, large):
    gt, dets = make_case(n_images=300, dets_per_image=100, n_classes=12, seed=5, large=large)
    held = _case_stats(gt, dets)
    assert held["crowd"] >= 5 and held["small"] > 100 and held["medium"] > 100 and held["area_-1"] == 2
    assert (held["large"] > 100) == large and held["images_without_gt"] >= 2 and held["images_without_dets"] >= 2
    assert held["score_ties"] > 1000
    ann, dfile = tmp_path / "gt.json", tmp_path / "dets.json"
    ann.write_text(json.dumps(gt))
    dfile.write_text(json.dumps(dets))
    ref = coco_eval.evaluate(ann, dfile, evaluator="pycocotools")
    fast = coco_eval.evaluate(ann, dfile, evaluator="faster-coco-eval")
    assert fast["evaluator"] == "faster-coco-eval" and ref["evaluator"] == "pycocotools"
    _assert_same(ref, fast)
    assert 0.2 < ref["bbox"]["AP"] < 0.7 and ref["bbox"]["AR1"] < ref["bbox"]["AR10"]
    assert (ref["bbox"]["APl"] is None) == (not large) and (ref["bbox"]["ARl"] is None) == (not large)
    # make_case: the last category has no ground truth (COCOeval's -1: None), the one before is never detected
    no_gt, no_dt = [c["name"] for c in gt["categories"]][-1:-3:-1]
    assert ref["per_class"][no_gt] is None and ref["per_class"][no_dt] == 0.0
    assert sum(v is not None and v > 0 for v in ref["per_class"].values()) == 10


def test_cocoapi_fake_results_case(tmp_path):
    """cocoapi's demo: fake bbox results on 100 val2014 images; both evaluators give its published
    numbers (3 decimals) and the same numbers as each other."""
    ann, dets = tmp_path / "gt.json", tmp_path / "dets.json"
    ann.write_bytes(gzip.decompress((CASE_DIR / "instances_val2014_100.bbox.json.gz").read_bytes()))
    dets.write_bytes(gzip.decompress((CASE_DIR / "instances_val2014_fakebbox100_results.json.gz").read_bytes()))
    published = [0.505, 0.697, 0.573, 0.586, 0.519, 0.501, 0.387, 0.594, 0.595, 0.640, 0.566, 0.564]
    ref = coco_eval.evaluate(ann, dets, evaluator="pycocotools")
    assert ref["num_images"] == 100 and ref["num_detections"] == 734
    assert [round(ref["bbox"][k], 3) for k in coco_eval.STAT_NAMES] == published
    if FAST_INSTALLED:
        fast = coco_eval.evaluate(ann, dets, evaluator="faster-coco-eval")
        _assert_same(ref, fast)
        assert [round(fast["bbox"][k], 3) for k in coco_eval.STAT_NAMES] == published


@pytest.mark.parametrize("evaluator", BOTH)
def test_perfect_detections_score_one(synth, tmp_path, evaluator):
    _, ann = synth
    gt = json.load(open(ann))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    m = coco_eval.evaluate(ann, dets, evaluator=evaluator)
    assert m["evaluator"] == evaluator
    assert m["bbox"]["AP"] == pytest.approx(1.0) and m["bbox"]["AR100"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in m["per_class"].values())


@pytest.mark.parametrize("evaluator", BOTH)
def test_empty_detections_give_zeros(synth, tmp_path, evaluator):
    _, ann = synth
    f = tmp_path / "empty.json"
    f.write_text("[]")
    m = coco_eval.evaluate(ann, f, evaluator=evaluator)
    assert m["evaluator"] == evaluator
    # synthetic objects are 24-56 px: no large objects (> 96^2) -> COCOeval's -1 -> None
    assert m["bbox"]["APl"] is None and m["bbox"]["ARl"] is None
    for k in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100", "APm", "ARm"):
        assert m["bbox"][k] == 0.0, k
    assert all(v == 0.0 for v in m["per_class"].values())
    assert m["num_detections"] == 0


def test_bad_inputs_are_user_errors(synth, tmp_path):
    _, ann = synth
    with pytest.raises(UserError, match="not found"):
        coco_eval.evaluate(ann, tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json:1"):
        coco_eval.evaluate(ann, bad)
    with pytest.raises(UserError, match="annotation file not found"):
        coco_eval.evaluate(tmp_path / "nope.json", [])


def test_synth_dataset_is_deterministic(tmp_path):
    a = synth_coco.generate(tmp_path / "a", n_train=3, n_val=0, seed=7)
    b = synth_coco.generate(tmp_path / "b", n_train=3, n_val=0, seed=7)
    ja, jb = json.load(open(a["train"]["ann_file"])), json.load(open(b["train"]["ann_file"]))
    assert ja["annotations"] == jb["annotations"] and len(ja["annotations"]) >= 3
    from PIL import Image
    im = np.asarray(Image.open(tmp_path / "a" / "images" / "train" / "train_00000.png"))
    assert im.shape == (96, 96, 3)
    for a_ in ja["annotations"]:
        x, y, w, h = a_["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96.01 and y + h <= 96.01 and w >= 23
