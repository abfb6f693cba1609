"""test_matrix: test cells that share their train cell's run (plan, submit, state, status, report)
with the fake scheduler; the real thing on the local cluster is tests/test_test_matrix_slurm.py."""
import json

import pytest

import submit_light_job as light
from ssflctl import backends
from ssflctl.backends import JobKind
from ssflctl.control import submit as submit_mod
from ssflctl.errors import UserError
from ssflctl.plan import spec
from ssflctl.registry.store import Registry
from ssflctl.workdir.layout import RunDir
from ssflctl.workdir.records import Outcome

pytestmark = pytest.mark.unit

EXP = """\
name: tmx
template: retinanet_tiny
datasets:
  synth: {{root: data}}
matrix:
  loss: [focal, ssfl]
  seed: [1]
params: {{max_epochs: 1}}
resources: {{cpus: 1, mem: 1G, time: "00:10:00"}}
executor: {{type: local}}
{test_matrix}"""

THR = "model.test_cfg.score_thr"


@pytest.fixture
def fake():
    backends.register("local", "ssflctl.backends.fake:FakeBackend")
    yield backends.get("local")
    backends.register("local", "ssflctl.backends.local:LocalBackend")


def _exp(tmp_path, test_matrix="", name="tmx.yaml"):
    (tmp_path / "data").mkdir(exist_ok=True)
    p = tmp_path / name
    p.write_text(EXP.format(test_matrix=test_matrix))
    return p


def _tm(values):
    return f"test_matrix:\n  {THR}: [{', '.join(map(str, values))}]\n"


def test_run_ids_do_not_change_and_test_ids_are_stable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = spec.expand(spec.load(_exp(tmp_path, "", "a.yaml")))
    three = spec.expand(spec.load(_exp(tmp_path, _tm([0.05, 0.3, 0.5]), "b.yaml")))
    four = spec.expand(spec.load(_exp(tmp_path, _tm([0.05, 0.3, 0.5, 0.7]), "c.yaml")))
    assert [r.run_id for r in plain] == [r.run_id for r in three] == [r.run_id for r in four]
    # pinned: the ids of the train cells, and a test cell's id
    assert [r.run_id for r in three] == ["focal-s1-47fcec6e", "ssfl-s1-3b22f8dc"]
    assert all(r.test for r in plain) and not any(r.test for r in three)
    ids3 = [[t.test_id for t in r.tests] for r in three]
    ids4 = [[t.test_id for t in r.tests] for r in four]
    assert [i[:3] for i in ids4] == ids3 and len(set(sum(ids4, []))) == 8
    assert ids3[0][0] == "score_thr0.05-53b4b237"
    assert three[0].tests[1].overrides == {THR: 0.3}


@pytest.mark.parametrize("key,line", [("model.bbox_head.loss_cls.gamma", 12), ("lr", 12),
                                      ("train_dataloader.batch_size", 12)])
def test_a_training_key_is_refused_with_its_line(tmp_path, key, line):  # noqa: D103
    p = _exp(tmp_path, f"test_matrix:\n  {key}: [1, 2]\n")
    with pytest.raises(UserError) as exc:
        spec.load(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}:{line}: test_matrix.{key}: ") and "move it to matrix:" in msg


def test_test_matrix_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r":12: test_matrix.model.test_cfg.score_thr\[2\]: value 0.3 is listed twice"):
        spec.load(_exp(tmp_path, _tm([0.05, 0.3, 0.3])))
    p = _exp(tmp_path, _tm([0.05]))
    p.write_text(p.read_text().replace("seed: [1]", f"seed: [1]\n  {THR}: [0.1]"))
    with pytest.raises(UserError, match=f":13: test_matrix.{THR}: already an axis of matrix"):
        spec.load(p)
    with pytest.raises(UserError, match="expected a number"):
        spec.expand(spec.load(_exp(tmp_path, _tm(["'0.05'"]))))
    nms = "test_matrix:\n  model.test_cfg.nms.iou_threshold: [0.45, 0.5]\n  test_evaluator.classwise: [true]\n"
    runs = spec.expand(spec.load(_exp(tmp_path, nms)))
    assert [t.name for t in runs[0].tests] == ["iou_threshold0.45-classwiseTrue", "iou_threshold0.5-classwiseTrue"]


def _train_done(ws, rid):
    run = RunDir.of(ws, rid)
    a = run.latest()
    a.write_outcome(Outcome.from_json({"outcome": "done", "reason": "finished", "checkpoint": "epoch_1.pth"}))


def _tested(ws, rid, tid, ap=0.3):
    RunDir.of(ws, rid).latest().test(tid).write_metrics({"bbox": {"AP": ap}, "num_detections": 5})


def test_submit_tests_after_their_trainings_then_only_the_new_cells(tmp_path, monkeypatch, fake):
    from ssflctl.commands.status import view
    from ssflctl.report import aggregate
    from ssflctl.report.collect import collect_workspace

    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.3, 0.5]))
    res = submit_mod.submit(path, ws, render=light.light_render)
    # 2 trainings (one train array, no run-level test jobs) + 6 test jobs (one more call)
    assert len(res.submitted) == 2 and all(p.test_job_id is None for p in res.submitted)
    assert len(fake.submitted) == 1 and len(fake.tests_submitted) == 1
    sent = fake.tests_submitted[0]
    assert len(sent["test_ids"]) == 6
    train_of = {p.run.run_id: p.job_id for p in res.submitted}
    for t in res.tests:  # each waits for its own run's train job
        assert t.action == "submit" and sent["after"][t.test.test_id] == train_of[t.run.run_id]
        cell = RunDir.of(ws, t.run.run_id).test_cell(t.test.test_id)
        assert cell["overrides"] == t.test.axes and cell["run_id"] == t.run.run_id
    assert json.loads((ws / "runs" / res.submitted[0].run.run_id / "run.json").read_text())["test"] is False

    # the node: both trainings finish; run A's three cells are tested, run B's are still queued
    ra, rb = (p.run.run_id for p in res.submitted)
    for rid in (ra, rb):
        _train_done(ws, rid)
        fake.set(train_of[rid], JobKind.COMPLETED)
    cells_a = [t for t in res.tests if t.run.run_id == ra]
    for i, t in enumerate(cells_a):
        _tested(ws, ra, t.test.test_id, ap=0.3 - 0.1 * i)
        fake.set(t.job_id, JobKind.COMPLETED)
    with Registry(ws) as reg:
        items = {i["run"]: i for i in view(reg, ws, "tmx")}
    assert items[ra]["state"] == items[rb]["state"] == "done"
    assert [t["state"] for t in items[ra]["tests"]] == ["done"] * 3
    assert [t["state"] for t in items[rb]["tests"]] == ["queued"] * 3

    # a fourth value: exactly two test jobs (one per run), no training, no dependency (trained)
    path.write_text(path.read_text().replace("[0.05, 0.3, 0.5]", "[0.05, 0.3, 0.5, 0.7]"))
    res2 = submit_mod.submit(path, ws, render=light.light_render)
    assert res2.submitted == [] and len(fake.submitted) == 1
    assert len(fake.tests_submitted) == 2
    new = fake.tests_submitted[1]
    assert len(new["test_ids"]) == 2 and set(new["after"].values()) == {None}
    assert sorted(t.why.split(" ")[0] for t in res2.tests if t.action == "skip") == ["done"] * 3 + ["queued"] * 3
    assert sorted(t.run.run_id for t in res2.tests_submitted) == sorted([ra, rb])

    # the report: 4 test settings per training cell, mean over seeds per (train cell, test cell)
    for t in res2.tests_submitted:
        _tested(ws, t.run.run_id, t.test.test_id, ap=0.05)
    for t in res.tests:
        if t.run.run_id == rb:
            _tested(ws, rb, t.test.test_id, ap=0.2)
    records = collect_workspace(ws, ["tmx"])
    assert len(records) == 8 and {r["state"] for r in records} == {"done"}
    thr = sorted({r["axes"][THR] for r in records})
    assert thr == [0.05, 0.3, 0.5, 0.7]
    assert {(r["axes"]["loss"], r["axes"][THR]): r["metrics"]["bbox"]["AP"] for r in records}[("focal", 0.3)] == pytest.approx(0.2)
    rep = aggregate.build(records, metrics=["AP"])
    assert len(rep.configs) == 8  # (loss) x (score_thr): each training cell under its 4 test settings
    assert sorted(ax[THR] for _, ax in rep.configs if ax["loss"] == "focal") == [0.05, 0.3, 0.5, 0.7]
    assert rep.retries == [] and len(rep.long[rep.long["metric"] == "AP"]) == 8

def test_a_failed_training_fails_its_test_cells_and_a_retrain_resends_them(tmp_path, monkeypatch, fake):
    from ssflctl.commands.status import view

    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.5]))
    res = submit_mod.submit(path, ws, render=light.light_render)
    ra = res.submitted[0].run.run_id
    RunDir.of(ws, ra).latest().write_outcome(Outcome.from_json({"outcome": "failed", "reason": "boom"}))
    fake.set(res.submitted[0].job_id, JobKind.FAILED)
    with Registry(ws) as reg:
        items = {i["run"]: i for i in view(reg, ws, "tmx")}
    assert items[ra]["state"] == "failed"
    assert {t["state"] for t in items[ra]["tests"]} == {"failed"}
    assert all(t["note"].startswith("training failed") for t in items[ra]["tests"])
    res2 = submit_mod.submit(path, ws, render=light.light_render)
    assert [p.run.run_id for p in res2.submitted] == [ra]
    assert len(res2.tests_submitted) == 2
    assert set(fake.tests_submitted[1]["after"].values()) == {res2.submitted[0].job_id}


def test_dry_run_lists_the_test_cells(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = submit_mod.submit(_exp(tmp_path, _tm([0.05, 0.5])), tmp_path / "ws", dry_run=True)
    assert len(res.plan) == 2 and len(res.tests) == 4 and {t.action for t in res.tests} == {"submit"}


def _light_test_attempt(adir, checkpoint=None, force=False, overrides=None, into=None):
    """Stands in for mmdet's test loop: as many detections as 10 x (1 - score_thr)."""
    n = int(round(10 * (1 - (overrides or {}).get(THR, 0.0))))
    into.path.mkdir(parents=True, exist_ok=True)
    into.detections_path.write_text(json.dumps([{"image_id": 1, "score": 0.9}] * n))
    body = {"bbox": {"AP": n / 100}, "num_detections": n, "test_overrides": overrides}
    into.write_metrics(body)
    return body


def light_test_cell(cell):
    """The local backend's test-cell task with the light tester (the real wait and paths)."""
    from ssflctl.node import job

    job.test_attempt = _light_test_attempt
    return job.test_cell_run(cell, poll_s=0.2)


def test_local_backend_test_cells_wait_for_their_training(tmp_path, monkeypatch):
    import os
    import time

    from conftest import REPO

    from ssflctl.commands.status import view

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "0.5")
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    fns = dict(light.FNS, test_cell="test_test_matrix:light_test_cell")
    path = _exp(tmp_path, _tm([0.0, 0.5]))
    res = submit_mod.submit(path, ws, render=light.light_render, fns=fns)
    assert len(res.submitted) == 2 and len(res.tests_submitted) == 4
    assert all(t.after.startswith("local-") for t in res.tests_submitted)
    end = time.time() + 120
    while True:
        with Registry(ws) as reg:
            items = view(reg, ws, "tmx")
        states = {t["state"] for i in items for t in i["tests"]}
        if states <= {"done", "failed"} or time.time() > end:
            break
        time.sleep(0.5)
    assert states == {"done"}, [i["tests"] for i in items]
    for i in items:
        run = RunDir.of(ws, i["run"])
        n = {b["axes"][THR]: len(json.loads(run.tested_cell(t).detections_path.read_text()))
             for t, b in run.test_cells().items()}
        # done, so each test waited for its training (started earlier, it finds no finished attempt: failed)
        assert n == {0.0: 10, 0.5: 5}
