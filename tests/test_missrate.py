"""Log-average miss rate MR⁻² (Caltech protocol) against hand-computed cases, subsets, ignore
regions, the plot, and `ssflctl report --missrate` on a small synthetic pedestrian set."""
from __future__ import annotations

import json
import random

import pytest

from conftest import run_cli

pytestmark = pytest.mark.unit

REF = [10 ** (-2 + 0.25 * k) for k in range(9)]  # 0.01, 0.0178, ..., 0.562, 1.0


def _gt(images, anns, classes=("person", "car")):
    return {
        "images": [{"id": i, "file_name": f"im{i}.png", "width": 200, "height": 200, **extra}
                   for i, extra in images],
        "annotations": [{"id": k + 1, "image_id": iid, "category_id": cid, "bbox": list(b),
                         "area": b[2] * b[3], "iscrowd": crowd}
                        for k, (iid, cid, b, crowd) in enumerate(anns)],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(classes)],
    }


def _det(iid, box, score, cid=1):
    return {"image_id": iid, "category_id": cid, "bbox": list(box), "score": score}


def test_reference_points_are_the_caltech_nine():
    from ssflctl.evaluation.missrate import REF_FPPI

    assert len(REF_FPPI) == 9
    assert REF_FPPI[0] == pytest.approx(0.01) and REF_FPPI[-1] == pytest.approx(1.0)
    assert REF_FPPI[4] == pytest.approx(0.1)


def test_hand_computed_two_images():
    """2 images, 4 persons. In score order the detections are
         0.9 TP (G1), 0.8 FP, 0.7 TP (G3), 0.6 FP, 0.5 FP (duplicate on G1), 0.4 TP (G2, IoU 90/110)
    cumulative FP 0,1,1,2,3,3 -> FPPI 0, .5, .5, 1, 1.5, 1.5 ; recall .25,.25,.5,.5,.5,.75.
    Reference FPPI 0.01 .. 0.316 (7 points): last point with FPPI <= ref is the first (FPPI 0):
    MR = .75. ref 0.562: the third point (FPPI .5, recall .5): MR .5. ref 1.0: the fourth (FPPI 1,
    recall .5): MR .5.  MR⁻² = exp((7 ln .75 + 2 ln .5) / 9) = .75^(7/9) * .5^(2/9) = exp(-0.377785) = 0.68538.
    A car detection and a car box must not count."""
    from ssflctl.evaluation.missrate import evaluate

    gt = _gt([(1, {}), (2, {})], [
        (1, 1, (0, 0, 10, 10), 0), (1, 1, (20, 0, 10, 10), 0),
        (2, 1, (0, 0, 10, 10), 0), (2, 1, (50, 50, 10, 10), 0),
        (2, 2, (100, 100, 10, 10), 0),
    ])
    dets = [
        _det(1, (0, 0, 10, 10), 0.9), _det(1, (80, 80, 10, 10), 0.8), _det(2, (0, 0, 10, 10), 0.7),
        _det(2, (80, 80, 10, 10), 0.6), _det(1, (0, 0, 10, 10), 0.5), _det(1, (21, 0, 10, 10), 0.4),
        _det(2, (100, 100, 10, 10), 0.95, cid=2),
    ]
    r = evaluate(gt, dets, "person")["all"]
    assert r.num_gt == 4 and r.num_images == 2 and r.num_dets == 6
    assert r.fppi == pytest.approx([0, .5, .5, 1, 1.5, 1.5])
    assert r.miss == pytest.approx([.75, .75, .5, .5, .5, .25])
    assert r.mr_at_ref == pytest.approx([.75] * 7 + [.5, .5])
    assert r.lamr == pytest.approx(0.68538, abs=1e-5)
    assert r.lamr == pytest.approx(.75 ** (7 / 9) * .5 ** (2 / 9))


def test_crowd_region_absorbs_detections():
    """1 image, persons G1 (0,0,10,10) and G2 (30,0,10,10), a crowd region (100,100,50,50).
    Detections: 0.9 inside the crowd region -> ignored; 0.8 TP G1; 0.7 FP; 0.6 TP G2.
    Curve (FPPI, MR): (0, .5), (1, .5), (1, 0). Refs < 1 (8 points): MR .5; ref 1: MR 0 -> 1e-10.
    MR⁻² = .5^(8/9) * (1e-10)^(1/9) = 0.0418.  If the crowd hit counted as a false positive the
    curve would be (1, 1), (1, .5), (2, .5), (2, 0) and MR⁻² = .5^(1/9) = 0.926."""
    from ssflctl.evaluation.missrate import evaluate

    gt = _gt([(1, {})], [(1, 1, (0, 0, 10, 10), 0), (1, 1, (30, 0, 10, 10), 0), (1, 1, (100, 100, 50, 50), 1)])
    dets = [_det(1, (110, 110, 10, 10), 0.9), _det(1, (0, 0, 10, 10), 0.8), _det(1, (60, 60, 10, 10), 0.7),
            _det(1, (30, 0, 10, 10), 0.6)]
    r = evaluate(gt, dets, "person")["all"]
    assert r.num_gt == 2 and r.num_ignored_gt == 1
    assert r.fppi == pytest.approx([0, 1, 1]) and r.miss == pytest.approx([.5, .5, 0])
    assert r.mr_at_ref == pytest.approx([.5] * 8 + [0])
    assert r.lamr == pytest.approx(.5 ** (8 / 9) * 1e-10 ** (1 / 9))
    assert r.lamr == pytest.approx(0.04181, abs=1e-4)


def test_a_box_beats_an_ignore_region_and_iou_below_half_is_a_miss():
    """A detection on a real person inside a crowd region is a TP; one at IoU 1/3 is a FP."""
    from ssflctl.evaluation.missrate import evaluate

    gt = _gt([(1, {})], [(1, 1, (0, 0, 20, 20), 1), (1, 1, (0, 0, 10, 10), 0), (1, 1, (100, 0, 10, 10), 0)])
    # (105, 0, 10, 10) vs (100, 0, 10, 10): inter 50, union 150 -> IoU 1/3
    dets = [_det(1, (0, 0, 10, 10), 0.9), _det(1, (105, 0, 10, 10), 0.8)]
    r = evaluate(gt, dets, "person")["all"]
    assert r.fppi == pytest.approx([0, 1]) and r.miss == pytest.approx([.5, .5])
    assert r.lamr == pytest.approx(0.5)


def test_edge_cases_none_and_perfect():
    from ssflctl.evaluation.missrate import evaluate

    gt = _gt([(1, {}), (2, {})], [(1, 1, (0, 0, 10, 10), 0), (2, 1, (5, 5, 20, 20), 0)])
    assert evaluate(gt, [], "person")["all"].lamr == pytest.approx(1.0)
    perfect = [_det(1, (0, 0, 10, 10), 0.9), _det(2, (5, 5, 20, 20), 0.8)]
    r = evaluate(gt, perfect, "person")["all"]
    assert r.mr_at_ref == [0.0] * 9 and r.lamr == pytest.approx(0.0, abs=1e-9)
    # only false positives, more than one per image: MR 1 everywhere
    fps = [_det(i, (150, 150, 10, 10), s) for i in (1, 2) for s in (0.9, 0.8)]
    assert evaluate(gt, fps, "person")["all"].lamr == pytest.approx(1.0)
    # a class with no boxes in the set: undefined, not 0 or 1
    assert evaluate(gt, perfect, "car")["all"].lamr is None


def test_subsets_by_field_and_by_list():
    """Day image: its person found at score .9 (perfect: MR⁻² 0). Night image: one person, missed,
    and a FP at .5 -> MR 1. All (2 images): (FPPI 0, MR .5) then (FPPI .5, MR .5) -> MR⁻² .5."""
    from ssflctl.errors import UserError
    from ssflctl.evaluation.missrate import evaluate

    gt = _gt([(1, {"daytime": "day"}), (2, {"daytime": "night"})],
             [(1, 1, (0, 0, 10, 10), 0), (2, 1, (40, 40, 10, 10), 0)])
    dets = [_det(1, (0, 0, 10, 10), 0.9), _det(2, (0, 0, 10, 10), 0.5)]
    res = evaluate(gt, dets, "person", subset_field="daytime", subsets={"listed": ["im2.png"]})
    assert list(res) == ["all", "day", "night", "listed"]
    assert res["all"].lamr == pytest.approx(0.5)
    assert res["day"].lamr == pytest.approx(0.0, abs=1e-9) and res["day"].num_images == 1
    assert res["night"].lamr == pytest.approx(1.0)
    assert res["listed"].lamr == pytest.approx(1.0)
    with pytest.raises(UserError, match="subset-field"):
        evaluate(gt, dets, "person", subset_field="weather")
    with pytest.raises(UserError, match="not in the ground truth"):
        evaluate(gt, dets, "person", subsets={"x": ["nope.png"]})
    with pytest.raises(UserError, match="no such class"):
        evaluate(gt, dets, "cyclist")


def test_height_range_caltech_filter():
    """1 image; persons A (h 60) and B (h 30). Detections: .95 FP of height 20, .9 on A, .8 FP of
    height 45, .7 on B (height 42, IoU with B 30/42 = .71).
    No filter: (FPPI, MR) = (1, 1), (1, .5), (2, .5), (2, 0): refs < 1 take the sentinel (MR 1),
    ref 1 takes (1, .5): MR⁻² = .5^(1/9) = 0.9259.
    Height >= 50: B becomes an ignore region; the height-20 FP is dropped (< 50/1.25 = 40); the
    .7 detection overlaps B's region by 30/42 >= .5 and is ignored: curve (0, 0), (1, 0): MR⁻² 0."""
    import math

    from ssflctl.evaluation.missrate import evaluate

    gt = _gt([(1, {})], [(1, 1, (0, 0, 25, 60), 0), (1, 1, (100, 20, 12, 30), 0)])
    dets = [_det(1, (150, 0, 8, 20), 0.95), _det(1, (0, 0, 25, 60), 0.9), _det(1, (60, 100, 18, 45), 0.8),
            _det(1, (100, 14, 12, 42), 0.7)]
    r = evaluate(gt, dets, "person")["all"]
    assert r.fppi == pytest.approx([1, 1, 2, 2]) and r.miss == pytest.approx([1, .5, .5, 0])
    assert r.lamr == pytest.approx(.5 ** (1 / 9)) and r.lamr == pytest.approx(0.9259, abs=1e-4)
    r = evaluate(gt, dets, "person", height_range=(50, math.inf))["all"]
    assert r.num_gt == 1 and r.num_ignored_gt == 1 and r.num_dets == 3
    assert r.fppi == pytest.approx([0, 1]) and r.miss == pytest.approx([0, 0])
    assert r.lamr == pytest.approx(0.0, abs=1e-9)


def test_string_image_ids():
    """mmdet's VOC->COCO ground truth (CocoMetric without ann_file) uses VOC image names as ids."""
    from ssflctl.evaluation.missrate import evaluate

    gt = _gt([(1, {"daytime": "day"}), (2, {"daytime": "night"})],
             [(1, 1, (0, 0, 10, 10), 0), (2, 1, (40, 40, 10, 10), 0)])
    for im in gt["images"]:
        im["id"] = f"2007_{im['id']:06d}"
    for a in gt["annotations"]:
        a["image_id"] = f"2007_{a['image_id']:06d}"
    dets = [_det("2007_000001", (0, 0, 10, 10), 0.9), _det("2007_000002", (0, 0, 10, 10), 0.5)]
    res = evaluate(gt, dets, "person", subset_field="daytime", subsets={"listed": ["2007_000002"]})
    assert res["all"].lamr == pytest.approx(0.5) and res["night"].lamr == pytest.approx(1.0)
    assert res["listed"].lamr == pytest.approx(1.0)


def test_plot_writes_a_png(tmp_path):
    from PIL import Image

    from ssflctl.evaluation.missrate import evaluate, plot

    gt = _gt([(1, {}), (2, {})], [(1, 1, (0, 0, 10, 10), 0), (2, 1, (5, 5, 20, 20), 0)])
    res = evaluate(gt, [_det(1, (0, 0, 10, 10), 0.9), _det(2, (90, 90, 9, 9), 0.5)], "person")
    out = plot(res, tmp_path / "mr.png", title="person")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


# ------------------------------------------------------------------------ report end to end


def make_pedestrian_set(root, n=12, seed=0):
    """Synthetic pedestrian ground truth: `daytime` day/night per image, 'person' (+ a crowd
    region per image) and 'cyclist'. Detections: day finds every person (+ one low FP per image);
    night finds every other person and has two FPs per image."""
    rng = random.Random(seed)
    images, anns, dets = [], [], []
    for i in range(1, n + 1):
        day = "day" if i % 2 else "night"
        images.append({"id": i, "file_name": f"ped_{i:03d}.png", "width": 128, "height": 96, "daytime": day})
        for k in range(3):
            box = [4 + 40 * k, rng.randint(4, 30), 16, 40]
            anns.append({"image_id": i, "category_id": 1, "bbox": box, "iscrowd": 0})
            if day == "day" or k % 2 == 0:
                dets.append({"image_id": i, "category_id": 1, "bbox": [box[0] + 1, box[1], 16, 40],
                             "score": round(rng.uniform(0.5, 0.99), 3)})
        anns.append({"image_id": i, "category_id": 1, "bbox": [100, 70, 28, 26], "iscrowd": 1})
        dets.append({"image_id": i, "category_id": 1, "bbox": [104, 72, 16, 20], "score": 0.97})  # in crowd
        for _ in range(1 if day == "day" else 2):
            dets.append({"image_id": i, "category_id": 1, "bbox": [rng.randint(0, 60), 80, 10, 12],
                         "score": round(rng.uniform(0.05, 0.6), 3)})
    for k, a in enumerate(anns):
        a["id"] = k + 1
        a["area"] = a["bbox"][2] * a["bbox"][3]
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cyclist"}]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "test.json").write_text(json.dumps(gt))
    return gt, dets


def make_fake_run(ws, run_id, ann_file, dets, experiment="peds"):
    """A tested run in a workspace, as the test step leaves it (no registry needed)."""
    from ssflctl.evaluation import coco as coco_eval

    rdir = ws / "runs" / run_id
    adir = rdir / "attempt-1"
    adir.mkdir(parents=True)
    (rdir / "run.json").write_text(json.dumps({
        "run_id": run_id, "name": run_id.rsplit("-", 1)[0], "experiment": experiment,
        "axes": {"loss": "focal", "seed": 1}, "params": {}, "overrides": {}, "template": "x", "test": True}))
    (adir / "attempt.json").write_text(json.dumps({"run_id": run_id, "attempt": 1, "lr": 0.01, "config": "config.py"}))
    (adir / "outcome.json").write_text(json.dumps({"outcome": "done", "reason": "", "checkpoint": "epoch_1.pth"}))
    (adir / "detections.bbox.json").write_text(json.dumps(dets))
    metrics = coco_eval.evaluate(str(ann_file), str(adir / "detections.bbox.json"))
    (adir / "metrics.json").write_text(json.dumps(metrics))
    return adir


def test_report_prints_missrate_all_day_night(tmp_path):
    from ssflctl.evaluation.missrate import evaluate

    gt, dets = make_pedestrian_set(tmp_path / "data")
    ann = tmp_path / "data" / "test.json"
    ws = tmp_path / "ws"
    make_fake_run(ws, "ssd-kaist-s1-0000abcd", ann, dets)
    expected = evaluate(ann, dets, "person", subset_field="daytime")
    assert expected["day"].lamr < expected["all"].lamr < expected["night"].lamr
    out = tmp_path / "rep" / "index.md"
    proc = run_cli("report", "--workspace", ws, "--missrate", "person", "--subset-field", "daytime",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "MR⁻² all (%)" in text and "MR⁻² day (%)" in text and "MR⁻² night (%)" in text
    row = [ln for ln in text.splitlines() if ln.startswith("| ssd-kaist-s1 ")]
    assert len(row) == 1, text
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert [float(c) for c in cells[1:]] == pytest.approx(
        [100 * expected[k].lamr for k in ("all", "day", "night")], abs=0.006)
    assert out.exists()  # the AP report itself
    assert (out.parent / "missrate-ssd-kaist-s1-0000abcd.png").stat().st_size > 1000
    proc = run_cli("report", "--workspace", ws, "--missrate", "person", "--out", out, "--force")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("report", "--workspace", ws, "--subset-field", "daytime")
    assert proc.returncode == 2 and "--missrate" in proc.stderr
    # without --out: both reports on stdout
    proc = run_cli("report", "--workspace", ws, "--missrate", "person")
    assert proc.returncode == 0, proc.stderr
    assert "MR⁻² all (%)" in proc.stdout and "night" not in proc.stdout
    # the Caltech height filter: every person is 40 px high, so --min-height 50 leaves none
    proc = run_cli("report", "--workspace", ws, "--missrate", "person", "--min-height", "50")
    assert proc.returncode == 0, proc.stderr
    assert "boxes >= 50 px high" in proc.stdout and "| ssd-kaist-s1 | — |" in proc.stdout
    # a named list of images (file names, a comment, a blank line)
    (tmp_path / "hard.txt").write_text("ped_002.png  # night\nped_004.png\n\n")
    proc = run_cli("report", "--workspace", ws, "--missrate", "person",
                   "--subset-list", f"hard={tmp_path / 'hard.txt'}")
    assert proc.returncode == 0, proc.stderr
    row = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ssd-kaist-s1 ")][0]
    hard = evaluate(ann, dets, "person", subsets={"hard": ["ped_002.png", "ped_004.png"]})["hard"]
    assert "MR⁻² hard (%)" in proc.stdout
    assert float(row.strip("|").split("|")[2]) == pytest.approx(100 * hard.lamr, abs=0.006)
    proc = run_cli("report", "--workspace", ws, "--missrate", "person", "--subset-list", "hard")
    assert proc.returncode == 2 and "NAME=FILE" in proc.stderr
    # an unknown class is one line, exit 2
    proc = run_cli("report", "--workspace", ws, "--missrate", "dog")
    assert proc.returncode == 2 and "no such class" in proc.stderr and "Traceback" not in proc.stderr
