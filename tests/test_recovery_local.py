"""The NaN recovery of test_recovery_slurm.py on the LOCAL executor: SSFL* at lr 0.01 goes NaN
within a few iterations, the detached job retries it at lr 0.001 (no ssflctl command runs after
`submit` returned; this test only reads the files, the registry and `status`)."""
from __future__ import annotations

import time

import pytest

import test_recovery_slurm as rs
from ssflctl.control import submit as submit_mod

pytestmark = [pytest.mark.training, pytest.mark.slow]


def test_nan_retry_on_the_local_executor(tmp_path, monkeypatch):
    from ssflctl.convert import synth_coco

    monkeypatch.chdir(tmp_path)
    synth_coco.generate(tmp_path / "data", n_train=8, n_val=4, seed=0)
    path = rs._write(tmp_path, {"partition": "unused", "qos": "unused"}, "recnanlocal", loss="ssfl",
                     epochs=rs.NAN_EPOCHS)
    ws = tmp_path / "ws"
    res = submit_mod.submit(path, ws, executor="local")
    assert res.kind == "local"
    (item,) = res.submitted
    r = {"run_id": item.run.run_id, "job_id": item.job_id, "run_dir": ws / "runs" / item.run.run_id,
         "exp": res.experiment.name}
    deadline = time.time() + 600
    while True:
        (st,) = rs._view(ws, r["exp"])
        if st["state"] not in ("queued", "running", "submitting"):
            break
        assert time.time() < deadline, st
        time.sleep(1)
    rs.check_nan_run(ws, r, st)


def test_on_preempt_fail_stops_an_interrupted_attempt(tmp_path, monkeypatch):
    """retry.on_preempt: fail — a requeued job whose attempt already ran ends it 'preempted', no resume."""
    import json

    from ssflctl.node import job
    from ssflctl.plan import render
    from ssflctl.convert import synth_coco

    synth_coco.generate(tmp_path / "data", n_train=2, n_val=1, seed=0)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": "r", "name": "r", "template": "retinanet_tiny", "overrides": {}, "test": True,
        "params": {"loss": "focal", "lr": 0.01, "max_epochs": 1, "data_root": str(tmp_path / "data") + "/"},
        "retry": {"on_preempt": "fail"}}))
    adir = render.render_attempt(run_dir, 1)
    (adir / "progress.json").write_text(json.dumps({"epoch": 1, "iter": 3}))  # it ran, then was requeued
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(job.TrainingFailed):
        job.train_run(run_dir)
    out = json.loads((adir / "outcome.json").read_text())
    assert out["outcome"] == "preempted" and out["reason"] == "interrupted by requeue (SLURM_RESTART_COUNT=1)"
    assert not (run_dir / "attempt-2").exists() and not list(adir.glob("*/*.log"))  # nothing trained
