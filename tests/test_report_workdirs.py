"""`ssflctl report --workdirs` over MMDetection work dirs of any vintage (issue 16): one test per kind
of work dir that was read wrongly, and a mixed set. The work dirs are written in the exact formats
of mmengine 0.10 / mmdet 3.3 and mmdet 2.x / mmcv 1.x by tests/mmdet_workdirs.py."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from mmdet_workdirs import (KPT_SUMMARY, MM2Run, coco, coco_summary, mm2_mask_rcnn,  # noqa: E402
                            mm3_trained)

pytestmark = pytest.mark.unit


def _rows(rep):
    cols = rep.main.flat_columns()
    return {tuple(s)[-1]: {c: cell for c, cell in zip(cols, cells)} for s, cells in rep.main.rows}


def _long(rep, run_id, metric="AP"):
    from ssflctl.report import writers

    return [r for r in writers.json_records(rep) if r["run_id"] == run_id and r["metric"] == metric][0]


# 1. numbers only in the text log -----------------------------------------------------------


def test_text_log_only_reads_val_and_test_and_agrees_with_scalars(tmp_path):
    from ssflctl.report.mmdet_workdir import read

    both = mm3_trained(tmp_path, "both", epochs=3, max_epochs=3, test_ap=0.732, segm=True)
    text = tmp_path / "text_only"
    shutil.copytree(both, text)
    for p in text.rglob("*.json"):  # a TensorBoard-only visualizer, or the .log copied off a cluster
        p.unlink()
    a, b = read(both), read(text)
    assert b["state"] == "done" and b["provenance"]["split"] == "test"
    assert b["metrics"]["bbox"]["AP"] == 0.732 and b["metrics"]["segm"]["AP"] == pytest.approx(0.702)
    assert a["metrics"]["bbox"] == b["metrics"]["bbox"] and a["metrics"]["segm"] == b["metrics"]["segm"]
    assert a["provenance"]["file"] == "20240305_090000.json + log" and b["provenance"]["file"].endswith(".log")
    # validation from the text log alone (--pick last), at its epoch
    for rec in (read(both, pick="last"), read(text, pick="last")):
        assert rec["provenance"]["split"] == "val" and rec["provenance"]["epoch"] == 3
        assert rec["metrics"]["bbox"]["AP"] == pytest.approx(0.33)


def test_text_log_only_voc_and_copypaste(tmp_path):
    from mmdet_workdirs import MM3Run, mm3_config

    from ssflctl.report.mmdet_workdir import parse_text_log, read

    wd = tmp_path / "ssd_voc"
    r = MM3Run(wd, "20240101_000000", config=mm3_config(max_epochs=2), max_epochs=2, scalars=False)
    for e in (1, 2):
        r.train_epoch(e, lr=1e-3)
        r.evaluate("val", {"pascal_voc/mAP": 0.7012 + e / 100, "pascal_voc/AP50": 0.701 + e / 100}, epoch=e)
    r.write()
    rec = read(wd)
    assert rec["state"] == "done" and rec["metrics"]["bbox"]["VOC mAP@0.5"] == pytest.approx(0.7212)
    assert rec["provenance"]["epoch"] == 2 and rec["unavailable"]["AP"] == "n/a (VOCMetric)"
    # the copypaste line alone (a log processor that drops the metric keys) still gives the 6 numbers
    log = ("2024/01/01 10:00:00 - mmengine - INFO - bbox_mAP_copypaste: 0.374 0.581 0.404 0.212 0.410 0.481\n"
           "2024/01/01 10:00:01 - mmengine - INFO - Epoch(test) [625/625]    data_time: 0.0020  time: 0.0400\n")
    (ev,) = parse_text_log(log)["evals"]
    assert ev["split"] == "test" and ev["m"]["bbox"] == {"AP": 0.374, "AP50": 0.581, "AP75": 0.404, "APs": 0.212,
                                                         "APm": 0.41, "APl": 0.481}


# 2. a run stopped early ----------------------------------------------------------------------


def test_unfinished_run_is_marked_never_best_and_strict_fails(tmp_path, capsys):
    from ssflctl.report import main, make_report, render

    cut = mm3_trained(tmp_path, "cut", epochs=105, max_epochs=200, val_every=10, scalars=False,
                      ap_of=lambda e: 0.5 + e / 1000)  # 60.0 at epoch 100: better than `full`
    full = mm3_trained(tmp_path, "full", epochs=12, max_epochs=12, ap_of=lambda e: 0.4 + e / 100)
    rep = make_report(tmp_path / "nows", workdirs=[cut, full])
    rows = _rows(rep)
    rec = {r["name"]: r for r in rep.records}
    assert rec["cut"]["state"] == "unfinished" and rec["cut"]["reason"] == "stopped at epoch 105 of max_epochs 200"
    assert rec["full"]["state"] == "done"
    assert rows["cut"]["AP"].text == "60.0" and not rows["cut"]["AP"].best  # shown, never bold
    assert rows["full"]["AP"].text == "52.0" and not rows["full"]["AP"].best  # nothing finished to compare
    assert rows["cut"]["AP"].foot and any("UNFINISHED: stopped at epoch 105" in f for f in rep.footnotes)
    md = render(rep, "markdown")
    assert "60.0 [" in md and "**60.0" not in md
    assert main(tmp_path / "nows", [], fmt="csv", workdirs=[full], strict=True, metrics="AP") == 0
    assert main(tmp_path / "nows", [], fmt="csv", workdirs=[cut, full], strict=True, metrics="AP") == 1
    assert "cut unfinished (stopped at epoch 105 of max_epochs 200)" in capsys.readouterr().err


# 3. which epoch / checkpoint; --pick ---------------------------------------------------------


def test_pick_last_best_test_and_sources_in_every_format(tmp_path):
    from ssflctl.report import make_report, render

    aps = {10: 0.650, 20: 0.660, 30: 0.667, 36: 0.666}
    wd = mm3_trained(tmp_path, "train_only", epochs=36, max_epochs=36, val_every=1, scalars=True,
                     ap_of=lambda e: aps.get(e, 0.6), save_best="coco/bbox_mAP", best_epoch=30)
    rep = make_report(tmp_path / "nows", workdirs=[wd])
    assert _rows(rep)["train_only"]["AP"].text == "66.6"
    row = _long(rep, "train_only")
    assert (row["result_split"], row["result_epoch"], row["result_timestamp"]) == ("val", 36, "20240301_100000")
    assert row["result_pick"] == "default: no test result, the last validation"
    assert row["result_checkpoint"] == "epoch_36.pth"
    best = make_report(tmp_path / "nows", workdirs=[wd], pick="best")
    assert _rows(best)["train_only"]["AP"].text == "66.7"
    row = _long(best, "train_only")
    assert row["result_epoch"] == 30 and row["result_checkpoint"] == "best_coco_bbox_mAP_epoch_30.pth"
    assert row["result_pick"] == "--pick best: mmdet's best_coco_bbox_mAP_epoch_30.pth"
    foot = best.footnotes[0]
    assert "validation at epoch 30 of 20240301_100000, checkpoint best_coco_bbox_mAP_epoch_30.pth" in foot
    for fmt, needle in (("markdown", "66.7 [1]"), ("latex", r"66.7\textsuperscript{[1]}"),
                        ("html", "66.7<sup>[1]</sup>")):
        text = render(best, fmt)
        assert needle in text and "best\\_coco\\_bbox" in text if fmt != "html" else "best_coco_bbox_mAP_epoch_30" in text
    csv_text = render(best, "csv")
    assert "result_checkpoint" in csv_text.splitlines()[0] and "best_coco_bbox_mAP_epoch_30.pth" in csv_text
    # --pick test without a test result: a row with the reason, not a crash
    rec = make_report(tmp_path / "nows", workdirs=[wd], pick="test").records[0]
    assert rec["state"] == "unknown" and rec["metrics"] is None
    # test results win by default, and name the checkpoint they loaded
    tested = mm3_trained(tmp_path, "tested", epochs=2, max_epochs=2, test_ap=0.731)
    row = _long(make_report(tmp_path / "nows", workdirs=[tested]), "tested")
    assert (row["result_split"], row["result_checkpoint"], row["result_epoch"]) == ("test", "epoch_2.pth", 2)
    assert row["value"] == 0.731 and row["result_pick"] == "default: the test result"


# 4. mmdet 2.x; one unreadable dir does not sink the report --------------------------------


def test_mmdet2_mask_rcnn_resumed_bbox_and_segm(tmp_path):
    from ssflctl.report.mmdet_workdir import read

    wd = mm2_mask_rcnn(tmp_path, resumed_at=7, epochs=12)
    rec = read(wd)
    assert rec["state"] == "done" and rec["progress"]["epoch"] == 12
    m = rec["metrics"]
    assert m["bbox"]["AP"] == pytest.approx(0.32) and m["segm"]["AP"] == pytest.approx(0.30)
    assert m["bbox"]["AR100"] == 0.5 and m["segm"]["AR100"] == 0.45  # each from its own summary
    assert rec["provenance"] == {"timestamp": "20210103_000000", "split": "val", "epoch": 12, "iter": None,
                                 "checkpoint": "epoch_12.pth", "file": "20210103_000000.log.json",
                                 "pick": "default: no test result, the last validation"}
    # the text log alone (no .log.json) gives the same numbers
    txt = mm2_mask_rcnn(tmp_path, "text_only", json_log=False)
    r2 = read(txt)
    assert r2["metrics"]["bbox"] == m["bbox"] and r2["metrics"]["segm"] == m["segm"]
    assert r2["provenance"]["epoch"] == 12 and r2["config"]["seed"] == 0
    # a resumed run cut short: the newest runner start stopped at epoch 9 of 12
    cut = mm2_mask_rcnn(tmp_path, "cut", resumed_at=7, epochs=9)
    assert read(cut)["state"] == "unfinished" and read(cut)["reason"] == "stopped at epoch 9 of max_epochs 12"


def test_mmdet2_voc(tmp_path):
    from ssflctl.report.mmdet_workdir import read

    wd = tmp_path / "retinanet_voc"
    r = MM2Run(wd, "20200101_000000", config=(
        "optimizer = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001)\n"
        "data = dict(samples_per_gpu=2, workers_per_gpu=2)\n"
        "evaluation = dict(interval=1, metric='mAP')\nrunner = dict(type='EpochBasedRunner', max_epochs=4)\n"))
    for e in range(1, 5):
        r.train_epoch(e, lr=0.01)
        r.val(e, {"AP50": 0.7 + e / 100, "mAP": 0.7012 + e / 100})
    r.write()
    rec = read(wd)
    assert rec["state"] == "done" and rec["metrics"]["bbox"] == {"VOC mAP@0.5": pytest.approx(0.7412)}
    assert rec["config"]["lr"] == 0.01 and rec["config"]["max_epochs"] == 4


def test_unreadable_dir_is_a_row_and_the_rest_is_reported(tmp_path, capsys):
    from ssflctl.errors import UserError
    from ssflctl.report import main, make_report

    good = mm2_mask_rcnn(tmp_path)
    bad = tmp_path / "copied_wrong"
    bad.mkdir()
    (bad / "notes.txt").write_text("results are on the cluster\n")
    rep = make_report(tmp_path / "nows", workdirs=[good, bad])
    rows = _rows(rep)
    assert rows["mask_rcnn_r50_fpn_1x_coco"]["AP"].text == "32.0"
    assert rows["copied_wrong"]["AP"].text.startswith("—, unreadable: ")
    gaps = {r[0][0]: [c.text for c in r[1]] for r in rep.gaps.rows}
    assert gaps["copied_wrong"][3] == "unreadable" and "not an MMDetection work dir" in gaps["copied_wrong"][4]
    assert str(bad) in gaps["copied_wrong"][4]
    assert main(tmp_path / "nows", [], fmt="markdown", workdirs=[good, bad]) == 0
    assert "copied\\_wrong" in capsys.readouterr().out
    assert main(tmp_path / "nows", [], fmt="markdown", workdirs=[good], strict=True, metrics="AP") == 0
    assert main(tmp_path / "nows", [], fmt="markdown", workdirs=[good, bad], strict=True, metrics="AP") == 1
    with pytest.raises(UserError, match="does not exist"):
        make_report(tmp_path / "nows", workdirs=[tmp_path / "typo"])


# 5. seed and lr of the training run --------------------------------------------------------


def test_seed_lr_optimizer_batch_from_the_training_config(tmp_path):
    from ssflctl.report import make_report

    wd = mm3_trained(tmp_path, "rtmdet", epochs=2, max_epochs=2, test_ap=0.5, seed=42, test_seed=999,
                     lr=1.875e-04, optimizer="AdamW")
    rep = make_report(tmp_path / "nows", workdirs=[wd])
    rec = rep.records[0]
    assert rec["axes"]["seed"] == 42  # not the test run's 999
    assert rec["attempts"][0]["lr"] == 1.875e-04  # not the warm-up's first logged 2.59e-05
    c = rec["config"]
    assert (c["optimizer"], c["batch_per_gpu"], c["gpus"], c["batch_size"], c["max_epochs"]) == ("AdamW", 16, 8, 128, 2)
    assert c["file"] == "20240301_100000/vis_data/config.py"
    row = _long(rep, "rtmdet")
    assert (row["lr"], row["optimizer"], row["batch_size"], row["max_epochs"]) == (1.875e-04, "AdamW", 128, 2)
    assert "config 20240301_100000/vis_data/config.py: AdamW lr 0.0001875, batch 16×8, max_epochs 2, seed 42" \
        in rep.footnotes[0]
    # without the dumped config file: the Config: block of the training run's log
    (wd / "20240301_100000" / "vis_data" / "config.py").unlink()
    rec = make_report(tmp_path / "nows", workdirs=[wd]).records[0]
    assert rec["config"]["file"] == "20240301_100000/20240301_100000.log (Config:)" and rec["axes"]["seed"] == 42


# 6. summaries scoped by iouType ------------------------------------------------------------


def test_keypoint_and_segm_summaries_never_read_as_bbox():
    from ssflctl.report.mmdet_workdir import parse_coco_summaries

    bbox = coco(0.3, "bbox", "")
    segm = {k.replace("segm", "bbox"): v for k, v in coco(0.25, "segm", "").items()}
    text = ("Evaluate annotation type *bbox*\n" + coco_summary(bbox, 0.5)
            + "Evaluate annotation type *keypoints*\n" + KPT_SUMMARY
            + "Evaluating segm...\n" + coco_summary(segm, 0.4))
    (b,) = parse_coco_summaries(text, "bbox")
    assert b["AP"] == 0.3 and b["AP50"] == 0.5 and b["AR100"] == 0.5
    (s,) = parse_coco_summaries(text, "segm")
    assert s["AP"] == 0.25 and s["AR100"] == 0.4
    assert parse_coco_summaries(text, "keypoints") == []
    # a keypoints block with no marker at all is still not a detection summary
    assert parse_coco_summaries(KPT_SUMMARY, "bbox") == []


# 7. --workdirs takes many paths ------------------------------------------------------------


def test_workdirs_flag_takes_a_glob_and_a_folder_of_workdirs(tmp_path):
    from conftest import run_cli

    root = tmp_path / "work_dirs"
    mm3_trained(root, "a", epochs=1, max_epochs=1)
    mm3_trained(root, "b", epochs=1, max_epochs=1, ap_of=lambda e: 0.5)
    mm2_mask_rcnn(root, "c", epochs=2, resumed_at=2)
    (root / "c" / "mask_rcnn_r50_fpn_1x_coco.py").write_text(
        (root / "c" / "mask_rcnn_r50_fpn_1x_coco.py").read_text().replace("max_epochs=12", "max_epochs=2"))
    ws = tmp_path / "ws"
    paths = [str(p) for p in sorted(root.iterdir())]
    for args in (["--workdirs", *paths], ["--workdirs", paths[0], "--workdirs", paths[1], "--workdirs", paths[2]],
                 ["--workdirs", str(root)]):
        res = run_cli("report", "-w", str(ws), "--format", "json", *args)
        assert res.returncode == 0, res.stderr
        ids = {r["run_id"] for r in json.loads(res.stdout)}
        assert ids == {"a", "b", "c"}, args


# 8. segm metrics ---------------------------------------------------------------------------


def test_iou_type_segm_bbox_both(tmp_path):
    from ssflctl.errors import UserError
    from ssflctl.report import make_report

    mask = mm3_trained(tmp_path, "mask_rcnn", epochs=2, max_epochs=2, test_ap=0.41, segm=True)
    box = mm3_trained(tmp_path, "retinanet", epochs=2, max_epochs=2, test_ap=0.37)
    both = make_report(tmp_path / "nows", workdirs=[mask, box])  # default: what the runs have
    cols = both.main.flat_columns()
    assert cols[:12] == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert cols[12:24] == ["segm " + c for c in cols[:12]] and both.main.title == "Main results (COCO bbox and segm, %)"
    rows = _rows(both)
    assert rows["mask_rcnn"]["AP"].text == "41.0" and rows["mask_rcnn"]["segm AP"].text == "38.0"
    assert rows["retinanet"]["segm AP"].text == "n/a (box only)" and rows["mask_rcnn"]["segm AR1"].text == "n/a (CocoMetric)"
    segm = make_report(tmp_path / "nows", workdirs=[mask, box], iou_type="segm")
    assert segm.main.flat_columns() == ["segm " + c for c in cols[:12]] + ["n"]
    assert _rows(segm)["mask_rcnn"]["segm AP50"].text == "58.0"
    bbox = make_report(tmp_path / "nows", workdirs=[mask, box], iou_type="bbox")
    assert bbox.main.flat_columns() == cols[:12] + ["n"] and bbox.main.title == "Main results (COCO bbox, %)"
    assert make_report(tmp_path / "nows", workdirs=[mask], iou_type="segm", metrics="AP,AP50").main.flat_columns() \
        == ["segm AP", "segm AP50", "n"]
    assert make_report(tmp_path / "nows", workdirs=[mask, box], metrics="AP,AP50").main.flat_columns() \
        == ["AP", "AP50", "segm AP", "segm AP50", "n"]
    with pytest.raises(UserError, match="--iou-type 'mask'"):
        make_report(tmp_path / "nows", workdirs=[mask], iou_type="mask")
    # box-only runs: no segm columns by default (the table as before)
    assert "segm AP" not in make_report(tmp_path / "nows", workdirs=[box]).main.flat_columns()


# the mixed set of the "done when" --------------------------------------------------


def test_mixed_set(tmp_path):
    from ssflctl.report import main, make_report, render

    scal = mm3_trained(tmp_path, "rtmdet_scalars", epochs=3, max_epochs=3, test_ap=0.412)
    text = mm3_trained(tmp_path, "rtmdet_textonly", epochs=3, max_epochs=3, test_ap=0.398, scalars=False)
    for p in text.rglob("*.json"):
        p.unlink()
    mm2 = mm2_mask_rcnn(tmp_path)
    cut = mm3_trained(tmp_path, "yolox_cut", epochs=105, max_epochs=200, val_every=10, scalars=False,
                      ap_of=lambda e: 0.3 + e / 1000)
    bad = tmp_path / "empty_copy"
    bad.mkdir()
    wds = [scal, text, mm2, cut, bad]
    rep = make_report(tmp_path / "nows", workdirs=wds)
    rows = _rows(rep)
    got = {k: (v["AP"].text, v["segm AP"].text) for k, v in rows.items()}
    box_only = "n/a (box only)"
    assert got["rtmdet_scalars"] == ("41.2", box_only) and got["rtmdet_textonly"] == ("39.8", box_only)
    assert got["mask_rcnn_r50_fpn_1x_coco"] == ("32.0", "30.0") and got["yolox_cut"] == ("40.0", box_only)
    assert got["empty_copy"][0].startswith("—, unreadable:")
    state = {r["name"]: r["state"] for r in rep.records}
    assert state == {"rtmdet_scalars": "done", "rtmdet_textonly": "done", "mask_rcnn_r50_fpn_1x_coco": "done",
                     "yolox_cut": "unfinished", "empty_copy": "unreadable"}
    assert rows["rtmdet_scalars"]["AP"].best and not rows["yolox_cut"]["AP"].best
    src = {r["run_id"]: (r["result_split"], r["result_epoch"], r["result_timestamp"])
           for r in json.loads(render(rep, "json")) if r["metric"] == "AP"}
    assert src["rtmdet_scalars"] == ("test", 3, "20240305_090000") and src["rtmdet_textonly"] == src["rtmdet_scalars"]
    assert src["mask_rcnn_r50_fpn_1x_coco"] == ("val", 12, "20210103_000000")
    assert src["yolox_cut"] == ("val", 100, "20240301_100000") and src["empty_copy"] == (None, None, None)
    assert len(rep.footnotes) == 5 and rep.footnotes[4].startswith(f"empty_copy: {bad}: no mmengine")
    md = render(rep, "markdown")
    assert "Where the work dirs' numbers come from" in md and "UNFINISHED: stopped at epoch 105" in md
    assert main(tmp_path / "nows", [], fmt="csv", workdirs=wds) == 0
    assert main(tmp_path / "nows", [], fmt="csv", workdirs=wds[:3], strict=True, metrics="AP") == 0
    assert main(tmp_path / "nows", [], fmt="csv", workdirs=wds, strict=True, metrics="AP") == 1
