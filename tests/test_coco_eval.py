"""ssflctl.evaluation.coco: the 12 standard COCO numbers + per-class AP of a detections dump."""
from __future__ import annotations

import contextlib
import io
import json
import random

import numpy as np
import pytest

from ssflctl.evaluation import coco as coco_eval
from ssflctl.convert import synth_coco
from ssflctl.errors import UserError

pytestmark = pytest.mark.unit


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
    m = coco_eval.evaluate(ann, dets_file)
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
    assert m["evaluator"] == "pycocotools"


def test_perfect_detections_score_one(synth, tmp_path):
    _, ann = synth
    gt = json.load(open(ann))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    m = coco_eval.evaluate(ann, dets)
    assert m["bbox"]["AP"] == pytest.approx(1.0) and m["bbox"]["AR100"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in m["per_class"].values())


def test_empty_detections_give_zeros(synth, tmp_path):
    _, ann = synth
    f = tmp_path / "empty.json"
    f.write_text("[]")
    m = coco_eval.evaluate(ann, f)
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
