"""ssflctl.node.job: a tiny RetinaNet trains, tests and retries on the CPU through the job functions."""
from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import pytest

from ssflctl.evaluation import coco as coco_eval
from ssflctl.node import job
from ssflctl.convert import synth_coco
from ssflctl.errors import UserError

pytestmark = pytest.mark.training

# Measured on 2 shared cores: see the report / benchmarks; AP50 well above 0.5.
TINY = {"max_epochs": 8, "batch_size": 8, "lr": 0.01, "seed": 0, "log_interval": 2}
N_TRAIN, N_VAL = 48, 24


def _write_run(run_dir: Path, params: dict, retry: dict | None = None, run_id="tiny") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": run_id, "name": run_id, "template": "retinanet_tiny", "params": params,
        "overrides": {}, "retry": retry or {}, "test": True}))
    return run_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth_coco.generate(root, n_train=N_TRAIN, n_val=N_VAL, seed=0)  # 96x96, 24-48 px objects
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    run_dir = _write_run(tmp_path_factory.mktemp("ws") / "runs" / "tiny-focal",
                         {**TINY, "loss": "focal", "data_root": str(data) + "/"})
    t0 = time.time()
    result = job.train_and_test(run_dir)
    return {"run_dir": run_dir, "result": result, "seconds": time.time() - t0}


def test_focal_learns(trained):
    m = trained["result"]["metrics"]
    print(f"\ntiny focal: AP50={m['bbox']['AP50']:.3f} AP={m['bbox']['AP']:.3f} in {trained['seconds']:.0f}s")
    assert trained["result"]["outcome"]["outcome"] == "done"
    assert m["bbox"]["AP50"] >= 0.5
    assert set(m["per_class"]) == set(synth_coco.CLASSES)
    assert all(v is not None and v > 0 for v in m["per_class"].values())


def test_metrics_equal_direct_pycocotools_on_the_dump(trained):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    adir = trained["run_dir"] / "attempt-1"
    saved = json.loads((adir / "metrics.json").read_text())
    dets = json.loads((adir / "detections.bbox.json").read_text())
    assert saved["num_detections"] == len(dets) > 0
    ann = saved["ann_file"]
    assert ann.endswith("annotations/val.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann)
        ev = COCOeval(gt, gt.loadRes(str(adir / "detections.bbox.json")), "bbox")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    for name, v in zip(coco_eval.STAT_NAMES, ev.stats):
        assert saved["bbox"][name] == (None if v < 0 else pytest.approx(float(v), abs=1e-9)), name
    assert saved["num_images"] == N_VAL and saved["checkpoint"].startswith("epoch_")


def test_attempt_files(trained):
    run_dir = trained["run_dir"]
    adir = run_dir / "attempt-1"
    for name in ("config.py", "attempt.json", "provenance.json", "progress.json", "outcome.json",
                 "metrics.json", "detections.bbox.json", "last_checkpoint"):
        assert (adir / name).is_file(), name
    prog = json.loads((adir / "progress.json").read_text())
    iters = TINY["max_epochs"] * (N_TRAIN // TINY["batch_size"])
    assert prog["iter"] == prog["max_iters"] == iters
    assert prog["epoch"] == prog["max_epochs"] == TINY["max_epochs"]
    assert prog["loss"] > 0 and prog["lr"] == pytest.approx(0.001) and prog["updated_at"]
    out = json.loads((adir / "outcome.json").read_text())
    assert out["outcome"] == "done" and out["nan"] is None and out["checkpoint"] == f"epoch_{TINY['max_epochs']}.pth"
    assert "Epoch(train)" in out["log_tail"]
    assert list(adir.glob("*/vis_data/scalars.json"))  # mmengine's own logs where mmdet users look


def test_train_run_is_idempotent(trained):
    run_dir = trained["run_dir"]
    adir = run_dir / "attempt-1"
    logs_before = sorted(p.name for p in adir.iterdir() if p.is_dir())
    ck = adir / f"epoch_{TINY['max_epochs']}.pth"
    mtime = ck.stat().st_mtime
    t0 = time.time()
    again = job.train_run(run_dir)
    assert time.time() - t0 < 10
    assert again["outcome"] == "done" and again["attempt"] == 1
    assert ck.stat().st_mtime == mtime
    assert sorted(p.name for p in adir.iterdir() if p.is_dir()) == logs_before
    assert job.test_run(run_dir) == json.loads((adir / "metrics.json").read_text())


def test_ssfl_nan_retries_with_lower_lr_inside_the_job(tmp_path, data):
    """SSFL* at lr 0.01 diverges within a few iterations; the job retries at lr 0.001."""
    params = {**TINY, "loss": "ssfl", "data_root": str(data) + "/", "max_epochs": 1, "log_interval": 1}
    run_dir = _write_run(tmp_path / "runs" / "tiny-ssfl", params,
                         retry={"on_nan": "lower_lr", "factor": 0.1, "max_attempts": 2})
    try:
        outcome = job.train_run(run_dir)
    except job.TrainingFailed as err:
        outcome = err.outcome
    first = json.loads((run_dir / "attempt-1" / "outcome.json").read_text())
    assert first["outcome"] == "nan", first["reason"]
    print(f"\nSSFL lr 0.01: NaN at iter {first['nan']['iter']} ({first['nan']['loss_key']})")
    assert first["nan"]["iter"] <= 10 and (run_dir / "attempt-1" / "nan.json").is_file()
    a2 = json.loads((run_dir / "attempt-2" / "attempt.json").read_text())
    assert a2["lr"] == pytest.approx(0.001) and "NaN" in a2["reason"]
    assert outcome is not None and (run_dir / "attempt-2" / "outcome.json").is_file()


def test_no_attempt_left_raises(tmp_path, data):
    params = {**TINY, "loss": "ssfl", "data_root": str(data) + "/", "max_epochs": 1}
    run_dir = _write_run(tmp_path / "runs" / "tiny-ssfl-1", params, retry={"max_attempts": 1})
    with pytest.raises(job.TrainingFailed, match="no attempt left"):
        job.train_run(run_dir)
    assert json.loads((run_dir / "attempt-1" / "outcome.json").read_text())["outcome"] == "nan"
    assert not (run_dir / "attempt-2").exists()
    with pytest.raises(job.TestFailed):
        job.test_run(run_dir)


def test_missing_run_json_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="run.json"):
        job.train_run(tmp_path)


def test_an_exception_is_recorded_where_it_was_raised(tmp_path, data):
    """A typo in the model config: mmengine logs its config dump, then the model build raises. The
    outcome's reason is the exception in one line, its traceback (mmdet's/mmengine's innermost
    frames) is in outcome.json and ends the attempt's text log, and the job's own error carries it."""
    from ssflctl.plan import render

    params = {**TINY, "loss": "focal", "data_root": str(data) + "/", "max_epochs": 1}
    run_dir = _write_run(tmp_path / "runs" / "tiny-typo", params, retry={"max_attempts": 1})
    render.render_attempt(run_dir, 1, reason="first attempt")
    cfg = run_dir / "attempt-1" / "config.py"
    cfg.write_text(cfg.read_text() + "\nmodel['bbox_head']['anchor_generatr'] = dict(type='AnchorGenerator')\n")
    with pytest.raises(job.TrainingFailed) as info:
        job.train_run(run_dir)
    out = json.loads((run_dir / "attempt-1" / "outcome.json").read_text())
    assert out["outcome"] == "failed"
    assert out["reason"].startswith("TypeError: ") and "anchor_generatr" in out["reason"] and "\n" not in out["reason"]
    tb = out["traceback"]
    assert tb.startswith("Traceback (most recent call last):") and len(tb.splitlines()) <= job.TRACEBACK_LINES + 1
    assert "unexpected keyword argument 'anchor_generatr'" in tb.splitlines()[-1]
    assert "work_dir" not in tb
    log = sorted((run_dir / "attempt-1").glob("*/*.log"))[-1].read_text()
    assert "work_dir = " in log and log.rstrip().endswith(tb.rstrip())  # after the config dump
    assert tb.rstrip() in str(info.value) and "anchor_generatr" in out["log_tail"]
