"""ssflctl.workdir.mmlogs: reading mmengine work dirs, finding NaN/Inf without false alarms.

The unit tests here use lines in mmengine 0.10.7's exact format; tests/test_guard.py checks the
same functions on logs written by real mmengine runs.
"""
from __future__ import annotations

import json
import math
import zipfile
import pickle
from pathlib import Path

import pytest

from ssflctl.workdir import checkpoints, mmlogs as logs

pytestmark = pytest.mark.unit

TS = "20260101_120000"
HEADER = """2026/01/01 12:00:00 - mmengine - INFO - 
------------------------------------------------------------
System environment:
    sys.platform: linux
    Nano backbone: NanoDet-Plus
------------------------------------------------------------
2026/01/01 12:00:00 - mmengine - INFO - Config:
data_root = '/data/nanjing/cityscapes/'
classes = ('banana', 'nan_bread', 'person')
model = dict(bbox_head=dict(loss_cls=dict(type='FocalLoss', loss_weight=1.0)))
"""


def epoch_line(ep, cur, tot, loss, loss_cls, loss_bbox, lr=0.01):
    return (f"2026/01/01 12:00:01 - mmengine - INFO - Epoch(train)  [{ep}][{cur:>3}/{tot}]  "
            f"base_lr: {lr:.4e} lr: {lr:.4e}  eta: 0:00:12  time: 0.1203  data_time: 0.0042  "
            f"memory: 0  grad_norm: inf  loss: {loss}  loss_cls: {loss_cls}  loss_bbox: {loss_bbox}\n")


def make_work_dir(tmp_path: Path, lines, scalars=None) -> Path:
    wd = tmp_path / "wd"
    d = wd / TS
    (d / "vis_data").mkdir(parents=True)
    (d / f"{TS}.log").write_text(HEADER + "".join(lines))
    if scalars is not None:
        (d / "vis_data" / "scalars.json").write_text(scalars)
    return wd


def test_parse_epoch_line_global_iter():
    rec = logs.parse_log_line(epoch_line(3, 10, 100, "nan", "nan", "0.5"))
    assert rec["epoch"] == 3 and rec["iter_in_epoch"] == 10 and rec["iters_per_epoch"] == 100
    assert rec["iter"] == 210
    assert math.isnan(rec["values"]["loss"]) and rec["values"]["loss_bbox"] == 0.5
    assert rec["values"]["lr"] == pytest.approx(0.01)


def test_parse_iter_line():
    line = ("2026/01/01 12:00:01 - mmengine - INFO - Iter(train) [  40/1000]  lr: 1.0000e-03  "
            "eta: 0:01:00  time: 0.1  data_time: 0.01  memory: 0  loss: inf  loss_cls: -inf\n")
    rec = logs.parse_log_line(line)
    assert rec["iter"] == 40 and rec["max_iters"] == 1000 and rec["epoch"] is None
    assert rec["values"]["loss"] == math.inf and rec["values"]["loss_cls"] == -math.inf


def test_no_false_alarm_on_nan_letters(tmp_path):
    lines = [epoch_line(1, i, 20, "1.2345", "0.9", "0.33") for i in (5, 10, 15, 20)]
    lines.append("2026/01/01 12:00:09 - mmengine - INFO - Saving checkpoint at 1 epochs to "
                 "/data/nanjing/banana/epoch_1.pth  Nano: nan-free  (ignore: nan)\n")
    lines.append("2026/01/01 12:00:09 - mmengine - INFO - Epoch(val) [1][5/5]  coco/bbox_mAP: nan\n")
    scal = "".join(json.dumps({"lr": 0.01, "loss": 1.0 - i / 100, "loss_cls": 0.5, "grad_norm": math.inf,
                               "epoch": 1, "iter": i, "step": i, "path": "/data/nanjing"}) + "\n"
                   for i in (5, 10, 15, 20))
    wd = make_work_dir(tmp_path, lines, scal)
    assert logs.find_nonfinite(wd) is None
    assert logs.nonfinite_in_text_log(wd / TS / f"{TS}.log") is None
    prog = logs.last_progress(wd)
    assert prog["iter"] == 20 and prog["epoch"] == 1 and prog["loss"] == pytest.approx(1.2345)


def test_text_log_nan_found_with_window(tmp_path):
    lines = [epoch_line(2, 10, 20, "1.1", "0.7", "0.4"), epoch_line(2, 20, 20, "nan", "nan", "0.4"),
             epoch_line(3, 10, 20, "nan", "nan", "nan")]
    wd = make_work_dir(tmp_path, lines)
    hit = logs.find_nonfinite(wd)
    assert hit["source"] == "text_log" and hit["key"] == "loss_cls" and hit["value"] == "nan"
    assert hit["epoch"] == 2 and hit["iter"] == 40 and hit["after_iter"] == 30


def test_scalars_bare_tokens_and_truncated_line(tmp_path):
    text = ('{"lr": 0.01, "loss": 1.5, "loss_cls": 1.0, "epoch": 1, "iter": 10, "step": 10}\n'
            '{"lr": 0.01, "loss": NaN, "loss_cls": NaN, "loss_bbox": 0.2, "epoch": 1, "iter": 20, "step": 20}\n'
            '{"lr": 0.01, "loss": Infinity, "loss_cls": -Infinity, "epoch": 1, "iter": 30}\n'
            '{"lr": 0.01, "loss": nan, "iter": 40}\n'
            '{"lr": 0.01, "loss": 1.')
    with pytest.raises(ValueError):  # a strict parser rejects the file
        json.loads(text.splitlines()[1], parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    p = tmp_path / "scalars.json"
    p.write_text(text)
    recs = logs.read_scalars(p)
    assert [r["iter"] for r in recs] == [10, 20, 30, 40]
    assert math.isnan(recs[1]["loss"]) and recs[2]["loss_cls"] == -math.inf and math.isnan(recs[3]["loss"])
    hit = logs.nonfinite_in_scalars(p)
    assert hit["iter"] == 20 and hit["key"] == "loss_cls" and hit["after_iter"] == 10
    assert logs.read_scalars(tmp_path / "missing.json") == []


def test_guard_record_wins(tmp_path):
    wd = make_work_dir(tmp_path, [epoch_line(1, 10, 20, "nan", "nan", "0.1")])
    (wd / "nan.json").write_text(json.dumps({"iter": 7, "epoch": 1, "loss_key": "loss_bbox",
                                             "nonfinite": {"loss_bbox": "inf"}, "lr": 0.02,
                                             "last_finite_iter": 6}))
    hit = logs.find_nonfinite(wd)
    assert (hit["iter"], hit["key"], hit["value"], hit["source"]) == (7, "loss_bbox", "inf", "nan.json")


def _fake_checkpoint(path: Path, meta: dict):
    """A zip-format checkpoint like torch.save writes (data.pkl + storages) without torch."""
    payload = {"meta": meta, "state_dict": {"w": ("tensor", 1)}, "optimizer": {"state": {}}}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        zf.writestr("archive/data/0", b"\0" * 16)


def test_list_checkpoints_by_meta_and_pointer(tmp_path):
    wd = make_work_dir(tmp_path, [epoch_line(1, 20, 20, "1.0", "0.5", "0.5")])
    _fake_checkpoint(wd / "epoch_1.pth", {"epoch": 1, "iter": 20, "cfg": "x"})
    _fake_checkpoint(wd / "epoch_2.pth", {"epoch": 2, "iter": 40})
    (wd / "epoch_3.pth").write_bytes(b"not a zip")  # unreadable: falls back to name × log
    (wd / "last_checkpoint").write_text(str(wd / "epoch_3.pth"))
    cks = checkpoints.list_checkpoints(wd)
    assert [(c["name"], c["iter"], c["source"]) for c in cks] == [
        ("epoch_1.pth", 20, "meta"), ("epoch_2.pth", 40, "meta"), ("epoch_3.pth", 60, "name")]
    assert checkpoints.read_checkpoint_meta(wd / "epoch_2.pth")["iter"] == 40
    # the one finder trusts mmengine's pointer when it names a file (written after the save)
    from ssflctl.workdir.checkpoints import latest_checkpoint

    assert latest_checkpoint(wd) == str(wd / "epoch_3.pth")
    (wd / "last_checkpoint").write_text("")  # emptied by a kill mid-rewrite: the newest complete one
    assert latest_checkpoint(wd) == str(wd / "epoch_2.pth")
