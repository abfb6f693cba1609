"""test_matrix on the real local Slurm cluster with the real job (tiny RetinaNet, 1 epoch on 4
synthetic images): a 2-run matrix x 3 score thresholds is 2 trainings + 6 test jobs in two sbatch
calls, each test waiting for its own training; the dumped detections follow the threshold; a 4th
value sends exactly 2 test jobs and no training; the report has every (run, threshold)."""
import json
import os
import textwrap
import time

import pytest

from conftest import REPO
from ssflctl.control import submit as submit_mod
from ssflctl.registry.store import Registry

pytestmark = [pytest.mark.slurm, pytest.mark.training]

THR = "model.test_cfg.score_thr"


def _wait(ws, exp, timeout):
    from ssflctl.commands.status import view

    end = time.time() + timeout
    while True:
        with Registry(ws) as reg:
            items = view(reg, ws, exp)
        states = [i["state"] for i in items] + [t["state"] for i in items for t in i["tests"]]
        if all(s in ("done", "failed", "cancelled", "unknown") for s in states) or time.time() > end:
            return {i["run"]: i for i in items}
        time.sleep(3)


def _cells(ws, rid):
    """{score_thr: (number of dumped detections, metrics.json)} of the run's tested cells."""
    from ssflctl.workdir.layout import RunDir

    run = RunDir.of(ws, rid)
    out = {}
    for tid, body in run.test_cells().items():
        t = run.tested_cell(tid)
        if t is not None:
            dets = json.loads(t.detections_path.read_text())
            out[body["axes"][THR]] = (len(dets), t.metrics, dets)
    return out


def test_two_runs_three_test_cells_then_a_fourth(tmp_path, monkeypatch, slurm_cluster):
    from ssflctl.convert import synth_coco
    from ssflctl.report import aggregate
    from ssflctl.report.collect import collect_workspace

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(tmp_path)
    synth_coco.generate(tmp_path / "data", n_train=4, n_val=2, seed=0)
    p = tmp_path / "tm.yaml"
    text = textwrap.dedent(f"""\
        name: tmslurm
        template: retinanet_tiny
        datasets:
          synth: {{root: {tmp_path / 'data'}}}
        matrix:
          loss: [focal]
          seed: [1, 2]
        params: {{max_epochs: 1, batch_size: 4, log_interval: 1}}
        resources: {{gpus: 0, cpus: 1, mem: 2G, time: "00:15:00"}}
        executor:
          type: slurm
          slurm: {{partition: {slurm_cluster['partition']}, qos: {slurm_cluster['qos']}}}
        test_matrix:
          {THR}: [0.0, 0.3, 0.9]
        """)
    p.write_text(text)
    ws = tmp_path / "ws"
    res = submit_mod.submit(p, ws)
    assert len(res.submitted) == 2 and all(i.test_job_id is None for i in res.submitted)
    assert len(res.tests_submitted) == 6
    sub = ws / "submissions" / res.submission_id
    # two sbatch calls: the train array and the test array (each test task waits for its training)
    assert len(list((sub / "train").glob("*_submission.sh"))) == 1
    assert not (sub / "test").exists()
    assert len(list((sub / "tests").glob("*_submission.sh"))) == 1
    assert len({t.job_id.split("_")[0] for t in res.tests_submitted}) == 1
    train_of = {i.run.run_id: i.job_id for i in res.submitted}
    assert all(t.after == train_of[t.run.run_id] for t in res.tests_submitted)

    items = _wait(ws, "tmslurm", 900)
    for rid, it in items.items():
        assert it["state"] == "done", it
        assert [t["state"] for t in it["tests"]] == ["done"] * 3, it["tests"]
        cells = _cells(ws, rid)
        assert sorted(cells) == [0.0, 0.3, 0.9]
        n = {thr: c[0] for thr, c in cells.items()}
        assert n[0.0] > n[0.3] >= n[0.9]  # a higher score threshold: fewer detections in the dumped file
        for a in cells:  # equal detections: equal metrics; a different set of detections: different numbers
            for b in cells:
                if cells[a][2] == cells[b][2]:
                    assert cells[a][1]["bbox"] == cells[b][1]["bbox"]
                else:
                    assert cells[a][1]["num_detections"] != cells[b][1]["num_detections"]
        assert cells[0.0][1]["num_detections"] == n[0.0] and cells[0.0][1]["test_overrides"] == {THR: 0.0}

    # a 4th value: exactly 2 test jobs (one per run), no training, no dependency (trained)
    p.write_text(text.replace("[0.0, 0.3, 0.9]", "[0.0, 0.3, 0.9, 0.01]"))
    res2 = submit_mod.submit(p, ws)
    assert res2.submitted == [] and len(res2.tests_submitted) == 2
    assert all(t.after is None for t in res2.tests_submitted)
    sub2 = ws / "submissions" / res2.submission_id
    assert not (sub2 / "train").exists() and len(list((sub2 / "tests").glob("*_submission.sh"))) == 1
    items = _wait(ws, "tmslurm", 600)
    for rid, it in items.items():
        assert [t["state"] for t in it["tests"]] == ["done"] * 4, it["tests"]
        assert it["attempt"] == 1
        n = {thr: c[0] for thr, c in _cells(ws, rid).items()}
        assert n[0.0] >= n[0.01] >= n[0.3]

    records = collect_workspace(ws, ["tmslurm"])
    assert len(records) == 8 and {r["state"] for r in records} == {"done"}
    rep = aggregate.build(records, metrics=["AP"])
    assert sorted(ax[THR] for _, ax in rep.configs) == [0.0, 0.01, 0.3, 0.9]  # seeds folded: mean ± std
