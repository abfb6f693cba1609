"""`ssflctl show`: GT | predictions pictures of a tested attempt; pixels change on the boxes (and
their labels) and nowhere else; below-threshold detections are not drawn; the CLI end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.unit

W, H = 200, 150
GT_BOXES = [  # image 1: a person and a car; image 2: a person
    {"image_id": 1, "category_id": 1, "bbox": [20, 40, 40, 50]},
    {"image_id": 1, "category_id": 2, "bbox": [120, 60, 30, 30]},
    {"image_id": 2, "category_id": 1, "bbox": [60, 30, 50, 60]},
]
DETS = [
    {"image_id": 1, "category_id": 1, "bbox": [22, 42, 38, 46], "score": 0.91},
    {"image_id": 1, "category_id": 2, "bbox": [130, 10, 20, 20], "score": 0.10},  # below 0.3: not drawn
    {"image_id": 2, "category_id": 1, "bbox": [62, 28, 48, 60], "score": 0.55},
    {"image_id": 3, "category_id": 1, "bbox": [62, 28, 48, 60], "score": 0.55},  # image not shown (n=2)
]


def make_attempt(root):
    """A tested attempt dir (config.py, detections.bbox.json) over three grey noise images."""
    from PIL import Image

    data = root / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.RandomState(0)
    images = []
    for i in (1, 2, 3):
        arr = np.clip(128 + rng.randint(-20, 21, (H, W, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)
        Image.fromarray(arr).save(data / "images" / f"img{i}.png")
        images.append({"id": i, "file_name": f"img{i}.png", "width": W, "height": H})
    anns = [{**a, "id": k + 1, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0} for k, a in enumerate(GT_BOXES)]
    (data / "test.json").write_text(json.dumps({
        "images": images, "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]}))
    rdir = root / "ws" / "runs" / "tiny-synth-s1-0123abcd"
    adir = rdir / "attempt-1"
    adir.mkdir(parents=True)
    (rdir / "run.json").write_text(json.dumps({"run_id": rdir.name, "name": "tiny-synth-s1", "experiment": "x"}))
    (adir / "attempt.json").write_text(json.dumps({"run_id": rdir.name, "attempt": 1}))
    (adir / "config.py").write_text(
        "test_dataloader = dict(batch_size=1, dataset=dict(type='CocoDataset', "
        f"data_root={str(data) + '/'!r}, ann_file='test.json', data_prefix=dict(img='images/')))\n"
        f"test_evaluator = dict(type='CocoMetric', ann_file={str(data / 'test.json')!r}, metric='bbox')\n")
    (adir / "detections.bbox.json").write_text(json.dumps(DETS))
    return adir, data


def _panels(out_path):
    from PIL import Image

    from ssflctl.report.show import GAP, HEADER

    out = np.asarray(Image.open(out_path).convert("RGB")).astype(int)
    assert out.shape == (H + HEADER, 2 * W + GAP, 3)
    return out[HEADER:, :W], out[HEADER:, W + GAP:]


def _allowed(boxes):
    """Where drawing may change pixels: each box, and its label strip (above or inside the top)."""
    m = np.zeros((H, W), bool)
    for b in boxes:
        x, y, w, h = (int(v) for v in b["bbox"])
        m[y:y + h, x:x + w] = True
        m[max(0, y - 16):y + 16, max(0, x - 2):min(W, x + 110)] = True
    return m


def _perimeter(b):
    x, y, w, h = (int(v) for v in b["bbox"])
    pts = [(x, yy) for yy in range(y + 14, y + h)] + [(x + w - 1, yy) for yy in range(y + 14, y + h)]
    pts += [(xx, y + h - 1) for xx in range(x, x + w)]
    return pts  # left/right sides below the label and the bottom side


def test_pictures_differ_from_the_input_exactly_on_boxes(tmp_path):
    from PIL import Image

    from ssflctl.report.show import PALETTE, show

    adir, data = make_attempt(tmp_path)
    paths = show(adir, n=2, score_thr=0.3)
    assert [p.name for p in paths] == ["img1.png", "img2.png"]
    assert all(p.parent == adir / "show" for p in paths)
    for p, iid in zip(paths, (1, 2)):
        src = np.asarray(Image.open(data / "images" / f"img{iid}.png").convert("RGB")).astype(int)
        left, right = _panels(p)
        for panel, boxes in ((left, [b for b in GT_BOXES if b["image_id"] == iid]),
                             (right, [d for d in DETS if d["image_id"] == iid and d["score"] >= 0.3])):
            changed = (panel != src).any(axis=2)
            assert changed.any()
            assert not (changed & ~_allowed(boxes)).any(), "pixels changed away from the boxes"
            for b in boxes:
                colour = PALETTE[b["category_id"] - 1]
                for x, y in _perimeter(b):
                    assert tuple(panel[y, x]) == colour, (p.name, b, (x, y))
    # the low-score car detection of image 1 is not drawn: its box edge is the input's pixels
    src = np.asarray(Image.open(data / "images" / "img1.png").convert("RGB")).astype(int)
    _, right = _panels(paths[0])
    assert (right[10:30, 130] == src[10:30, 130]).all() and (right[29, 130:150] == src[29, 130:150]).all()
    # a lower threshold draws it
    low = show(adir, n=1, score_thr=0.05, out_dir=tmp_path / "low")
    _, right = _panels(low[0])
    assert tuple(right[29, 140]) == PALETTE[1]


def test_show_refuses_to_overwrite_and_bad_inputs(tmp_path):
    from ssflctl.errors import UserError
    from ssflctl.report.show import find_attempt, show

    adir, _ = make_attempt(tmp_path)
    show(adir, n=1)
    with pytest.raises(UserError, match="--force"):
        show(adir, n=1)
    assert len(show(adir, n=1, force=True)) == 1
    ws = tmp_path / "ws"
    assert find_attempt("tiny-synth", ws) == adir and find_attempt("tiny-synth-s1", ws) == adir
    assert find_attempt(str(adir.parent)) == adir
    with pytest.raises(UserError, match="no run matching"):
        find_attempt("nope", ws)
    with pytest.raises(UserError, match="no attempt 3"):
        find_attempt("tiny", ws, attempt=3)
    (adir.parent / "attempt-2").mkdir()
    (adir.parent / "attempt-2" / "attempt.json").write_text("{}")
    assert find_attempt("tiny", ws) == adir  # the latest *tested* attempt
    with pytest.raises(UserError, match="not tested"):
        find_attempt("tiny", ws, attempt=2)


def test_cli_show(tmp_path):
    adir, _ = make_attempt(tmp_path)
    out = tmp_path / "pics"
    proc = run_cli("show", "tiny-synth", "--workspace", tmp_path / "ws", "--n", "3", "--score-thr", "0.5",
                   "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["img1.png", "img2.png", "img3.png"]
    proc = run_cli("show", "tiny-synth", "--workspace", tmp_path / "ws", "--out-dir", out)
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr


def test_voc_attempt_with_mmdet_coco_copy_of_the_ground_truth(tmp_path):
    """A VOC test set: images under VOC2007/JPEGImages, ground truth as mmdet's CocoMetric writes it
    without ann_file (string ids = VOC image names, empty file names)."""
    from PIL import Image

    from ssflctl.report.show import PALETTE, show

    data = tmp_path / "VOCdevkit"
    (data / "VOC2007" / "JPEGImages").mkdir(parents=True)
    Image.new("RGB", (W, H), (128, 128, 128)).save(data / "VOC2007" / "JPEGImages" / "000005.jpg", quality=95)
    adir = tmp_path / "attempt-1"
    adir.mkdir()
    (adir / "test_gt.json").write_text(json.dumps({
        "images": [{"id": "000005", "width": W, "height": H, "file_name": ""}],
        "annotations": [{"id": 1, "image_id": "000005", "bbox": [20, 40, 40, 50], "iscrowd": 0, "category_id": 0,
                         "area": 2000}],
        "categories": [{"id": 0, "name": "aeroplane"}, {"id": 1, "name": "bicycle"}]}))
    (adir / "metrics.json").write_text(json.dumps({"ann_file": str(adir / "test_gt.json")}))
    (adir / "config.py").write_text(
        "test_dataloader = dict(dataset=dict(type='VOCDataset', "
        f"data_root={str(data) + '/'!r}, ann_file='VOC2007/ImageSets/Main/test.txt', "
        "data_prefix=dict(sub_data_root='VOC2007/')))\n")
    (adir / "detections.bbox.json").write_text(json.dumps(
        [{"image_id": "000005", "category_id": 0, "bbox": [22, 42, 38, 46], "score": 0.8}]))
    [p] = show(adir, n=4)
    assert p.name == "000005.png"
    left, right = _panels(p)
    assert tuple(left[80, 20]) == PALETTE[0] and tuple(right[80, 22]) == PALETTE[0]
