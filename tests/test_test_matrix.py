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
from registry_damage import fold_wal  # noqa: E402  (tests/)

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


# --------------------------------------------------------------------------------------------------
# cancel, logs and a killed submit's adoption, for test cells (the fake scheduler)

DEAD_PID = 2 ** 22 + 12345  # above Linux's pid_max: no process has it


def _kill_claims(ws, test_ids):
    """What a submit killed while holding these cells' claims leaves behind: a claim of a dead pid."""
    import socket

    with Registry(ws) as reg:
        for tid in test_ids:
            reg.update_test(tid, claim_pid=DEAD_PID, claim_host=socket.gethostname())


def _killed_after_sending_tests(path, ws, monkeypatch):
    """A submit killed after the backend took its test jobs, before the registry recorded them."""
    def die(*a, **k):
        raise SystemExit("killed")

    with monkeypatch.context() as m, pytest.raises(SystemExit):
        m.setattr(submit_mod.testcells, "record", die)
        submit_mod.submit(path, ws, render=light.light_render)
    with Registry(ws) as reg:
        rows = {r["test_id"]: r for r in reg.test_rows("tmx")}
    assert {r["state"] for r in rows.values()} == {"submitting"} and not any(r["job_id"] for r in rows.values())
    _kill_claims(ws, rows)
    return rows


def test_a_submit_killed_after_sending_the_test_cells_has_them_adopted(tmp_path, monkeypatch, fake):
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.5]))
    rows = _killed_after_sending_tests(path, ws, monkeypatch)
    sent = fake.tests_submitted[0]["ids"]
    assert sorted(sent) == sorted(rows) and len(sent) == 4
    res = submit_mod.submit(path, ws, render=light.light_render)
    # nothing sent twice: the four test jobs are the cells' jobs, each still after its run's train job
    assert res.submitted == [] and res.tests_submitted == [] and len(fake.tests_submitted) == 1
    assert {t.why.split(" ")[0] for t in res.tests} == {"queued"}
    with Registry(ws) as reg:
        got = {r["test_id"]: r for r in reg.test_rows("tmx")}
        train = {r["run_id"]: r["job_id"] for r in reg.run_rows("tmx")}
        assert {t: r["job_id"] for t, r in got.items()} == sent
        assert all(r["after_job_id"] == train[r["run_id"]] and r["claim_pid"] is None for r in got.values())
        assert all(any(e["kind"] == "recovered" and t in (e["message"] or "") for e in reg.events(r["run_id"]))
                   for t, r in got.items())
        sid = got[next(iter(got))]["submission_id"]
        assert reg.submission(sid)["info"]["test_jobs"] == sent  # cancel reaches them later
    # ... and they run as any other: the trainings end, the cells are tested
    for rid, jid in train.items():
        _train_done(ws, rid)
        fake.set(jid, JobKind.COMPLETED)
    for tid, r in got.items():
        _tested(ws, r["run_id"], tid)
        fake.set(sent[tid], JobKind.COMPLETED)
    from ssflctl.commands.status import view

    with Registry(ws) as reg:
        assert {t["state"] for i in view(reg, ws, "tmx") for t in i["tests"]} == {"done"}


def test_a_killed_submits_test_job_that_cannot_run_is_cancelled_and_sent_again(tmp_path, monkeypatch, fake):
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.5]))
    _killed_after_sending_tests(path, ws, monkeypatch)
    sent = fake.tests_submitted[0]["ids"]
    bad, *good = sorted(sent)
    fake.unrunnable[sent[bad]] = f"test job {sent[bad]} has no submission file"
    res = submit_mod.submit(path, ws, render=light.light_render)
    assert [t.test.test_id for t in res.tests_submitted] == [bad] and fake.cancelled == [sent[bad]]
    assert fake.tests_submitted[1]["after"][bad] is not None  # still after its run's train job
    with Registry(ws) as reg:
        rows = {r["test_id"]: r for r in reg.test_rows("tmx")}
        assert rows[bad]["job_id"] == fake.tests_submitted[1]["ids"][bad] != sent[bad]
        assert {t: rows[t]["job_id"] for t in good} == {t: sent[t] for t in good}
        assert any(e["kind"] == "not adopted" and "no submission file" in (e["message"] or "")
                   for e in reg.events(rows[bad]["run_id"]))


def test_cancel_reaches_every_job_the_test_cells_ever_had(tmp_path, monkeypatch, fake, capsys):
    from ssflctl.commands import cancel as cancel_cmd
    from ssflctl.commands.status import view

    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.5]))
    res = submit_mod.submit(path, ws, render=light.light_render)
    first = {t.test.test_id: t.job_id for t in res.tests}
    ra, rb = (p.run.run_id for p in res.submitted)
    for p in res.submitted:  # both trained
        _train_done(ws, p.run.run_id)
        fake.set(p.job_id, JobKind.COMPLETED)
    (ta, ta2), (tb, tb2) = ([t.test.test_id for t in res.tests if t.run.run_id == r] for r in (ra, rb))
    _tested(ws, ra, ta2)
    fake.set(first[ta2], JobKind.COMPLETED)
    fake.set(first[ta], JobKind.FAILED, exit_code="1:0")  # a failed test job: sent again ...
    again = submit_mod.submit(path, ws, render=light.light_render)
    assert [t.test.test_id for t in again.tests_submitted] == [ta]
    second = again.tests_submitted[0].job_id
    fake.set(first[ta], JobKind.QUEUED)  # ... and then the old job turns up again, still queued
    assert capsys.readouterr()
    done = cancel_cmd.main(ws, "tmx")
    out = capsys.readouterr().out.splitlines()
    # the runs are done (nothing to cancel); three cells were queued; four of their jobs may run
    assert done == [] and out[0] == "cancelled 0 runs"
    alive = sorted([first[ta], second, first[tb], first[tb2]])
    cells, jobs = out[1].removeprefix("cancelled 3 test cells: ").removesuffix(")").split(" (jobs ")
    assert sorted(cells.split(", ")) == sorted([ta, tb, tb2]) and sorted(jobs.split()) == alive
    assert sorted(fake.cancelled) == alive and fake.alive() == []
    with Registry(ws) as reg:
        assert {t["test_id"]: t["job_id"] for t in reg.test_rows("tmx") if t["state"] == "cancelled"} == \
            {ta: second, tb: first[tb], tb2: first[tb2]}
        assert {r[1] for r in reg.test_job_ids_ever(ra)} == {first[ta], first[ta2], second}
        items = {i["run"]: i for i in view(reg, ws, "tmx")}
    assert [t["state"] for t in items[ra]["tests"]] == ["cancelled", "done"]
    assert {i["state"] for i in items.values()} == {"done"}
    # a cancelled cell is sent again by the next submit, after nothing (its run is trained)
    res3 = submit_mod.submit(path, ws, render=light.light_render)
    assert sorted(t.test.test_id for t in res3.tests_submitted) == sorted([ta, tb, tb2]) and res3.submitted == []


@pytest.mark.parametrize("then", ["cancel again", "status"])
def test_cancel_says_when_the_scheduler_refuses_and_a_second_cancel_finishes(tmp_path, monkeypatch, fake, capsys,
                                                                              then):
    """A refused scancel is an error naming the jobs; the runs and cells stay recorded cancelled with
    the reason and a claim, and the next cancel (or the next status, once the cancel's process is
    gone) cancels the jobs and releases the claims."""
    import socket

    from ssflctl.commands import cancel as cancel_cmd
    from ssflctl.commands.status import view

    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.5]))
    res = submit_mod.submit(path, ws, render=light.light_render)
    train = sorted(p.job_id for p in res.submitted)
    tests = sorted(t.job_id for t in res.tests)
    capsys.readouterr()
    fake.refuse_cancel = "slurm_kill_job: Socket timed out on send/recv operation"
    with pytest.raises(UserError) as exc:
        cancel_cmd.main(ws, "tmx")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("cancel: the scheduler did not cancel jobs ")
    assert all(j in msg for j in train + tests) and "Socket timed out" in msg and "ssflctl cancel tmx" in msg
    out = capsys.readouterr().out.splitlines()
    # what was recorded is said; no job is reported as cancelled
    assert out[0].startswith("cancelled 2 runs: ") and "jobs" not in out[0]
    assert out[1].startswith("cancelled 4 test cells: ") and "jobs" not in out[1]
    assert sorted(fake.alive()) == sorted(train + tests)
    with Registry(ws) as reg:  # recorded cancelled, and why its jobs may still run (status keeps it so)
        items = view(reg, ws, "tmx")
        for i in items:
            assert i["state"] == "cancelled"
            for t in i["tests"]:
                assert t["state"] == "cancelled" and "did not cancel job(s)" in t["note"] and "Socket" in t["note"]
        assert all(r["claim_pid"] is not None for r in reg.test_rows("tmx"))
    # their jobs may still run: a submit sends neither the runs nor the cells again
    again = submit_mod.submit(path, ws, render=light.light_render)
    assert again.submitted == [] and again.tests_submitted == [] and len(fake.submitted) == 1
    for why in [p.why for p in again.plan] + [t.why for t in again.tests]:
        assert why.startswith("cancelled, but the scheduler did not cancel job(s) ") and \
            why.endswith("it may still run; run `ssflctl cancel` again first"), why
    fake.refuse_cancel = None
    if then == "cancel again":
        cancel_cmd.main(ws, "tmx")  # the scheduler answers again: the same command finishes it
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith("cancelled 2 runs: ") and out[0].endswith(f"(jobs {' '.join(sorted(train))})")
        assert out[1].startswith("cancelled 4 test cells: ") and \
            sorted(out[1].split("(jobs ")[1][:-1].split()) == tests
    else:  # the cancel's process is gone: its claims are abandoned, and a status finishes the cancel
        with Registry(ws) as reg:
            for r in reg.run_rows("tmx"):
                reg.update_run(r["run_id"], claim_pid=DEAD_PID, claim_host=socket.gethostname())
        _kill_claims(ws, [t.test.test_id for t in res.tests])
        with Registry(ws) as reg:
            items = view(reg, ws, "tmx")
        assert {t["state"] for i in items for t in i["tests"]} == {"cancelled"}
        assert sorted(fake.cancelled) == sorted(train + tests)
    assert fake.alive() == []
    with Registry(ws) as reg:
        assert {(r["state"], r["reason"].removeprefix("training cancelled: "), r["claim_pid"])
                for r in reg.test_rows("tmx")} == {("cancelled", "cancelled by user", None)}
        assert {(r["state"], r["reason"], r["claim_pid"]) for r in reg.run_rows("tmx")} == \
            {("cancelled", "cancelled by user", None)}
    # now they are sent again
    again = submit_mod.submit(path, ws, render=light.light_render)
    assert len(again.submitted) == 2 and len(again.tests_submitted) == 4


@pytest.mark.parametrize("when", ["before sending", "while recording"])
def test_cancel_while_the_test_cells_are_being_submitted(tmp_path, monkeypatch, fake, when):
    """`ssflctl cancel` takes the cells from a submit in flight: not sent when it comes before the
    backend call; cancelled by the submit itself when it comes after (its claim released then)."""
    from ssflctl.control.cancel import Cancelled, cancel

    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.5]))
    got = Cancelled()

    def cancel_now():
        with Registry(ws) as reg:
            cancel(reg, ws, "tmx", wait_s=0, result=got)

    if when == "before sending":
        real = fake.submit

        def submit_then_cancel(*a, **k):
            out = real(*a, **k)
            cancel_now()
            return out
        monkeypatch.setattr(fake, "submit", submit_then_cancel)
    else:
        real = fake.submit_tests

        def send_then_cancel(*a, **k):
            out = real(*a, **k)
            cancel_now()
            return out
        monkeypatch.setattr(fake, "submit_tests", send_then_cancel)
    res = submit_mod.submit(path, ws, render=light.light_render)
    assert len(got.tests) == 4 and set(got.in_flight) >= set(got.tests)
    assert {t.action for t in res.tests} == {"skip"}
    with Registry(ws) as reg:
        rows = reg.test_rows("tmx")
    assert {(r["state"], r["claim_pid"]) for r in rows} == {("cancelled", None)}
    if when == "before sending":
        assert fake.tests_submitted == [] and {r["job_id"] for r in rows} == {None}
        assert {t.why for t in res.tests} == {"cancelled by `ssflctl cancel` before it was sent"}
    else:
        jobs = fake.tests_submitted[0]["ids"]
        assert {r["test_id"]: r["job_id"] for r in rows} == jobs and set(jobs.values()) <= set(fake.cancelled)
        assert all(t.why.startswith("cancelled by `ssflctl cancel` while being submitted (job ") for t in res.tests)
    assert fake.alive() == []


def test_logs_of_a_test_cell(tmp_path, monkeypatch, fake, capsys):
    from conftest import cli_env, run_cli  # noqa: F401
    from ssflctl.commands import logs as logs_cmd

    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.5]))
    res = submit_mod.submit(path, ws, render=light.light_render)
    rid = res.submitted[0].run.run_id
    t1, t2 = (t.test for t in res.tests if t.run.run_id == rid)
    log = RunDir.of(ws, rid).latest().test(t2.test_id).path / "20260101_000000" / "20260101_000000.log"
    log.parent.mkdir(parents=True)
    log.write_text("mmengine test log of the cell\n")
    capsys.readouterr()
    for ref in (t2.test_id, t2.name, t2.test_id[:16]):  # its id, its name, a unique prefix
        assert logs_cmd.main(ws, rid, test=ref) == [log]
        assert capsys.readouterr().out == "mmengine test log of the cell\n"
    with pytest.raises(UserError) as exc:  # not written yet: says which test, and what to do
        logs_cmd.main(ws, rid, test=t1.test_id)
    assert str(exc.value) == (f"logs: no log yet for test {t1.test_id} of run {rid}; its job may still be queued "
                              f"(a test waits for its training) — try `ssflctl logs {rid} --test {t1.test_id} -f`")
    with pytest.raises(UserError, match="drop --rank 1 with --test"):
        logs_cmd.main(ws, rid, test=t2.test_id, rank=1)
    with pytest.raises(UserError, match=f"matches 2 test cells of run {rid}"):
        logs_cmd.main(ws, rid, test="score_thr")
    # the command line: an unknown test id is one line naming it and listing the run's test cells
    env = dict(__import__("os").environ, SSFLCTL_WORKSPACE=str(ws))
    proc = run_cli("logs", rid, "--test", "nope", env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: logs: run {rid} has no test cell 'nope'; its test cells are {t1.test_id}, {t2.test_id}"]
    proc = run_cli("logs", rid, "--test", t2.name, env=env)
    assert proc.returncode == 0 and proc.stdout == "mmengine test log of the cell\n", proc.stderr


# --------------------------------------------------------------------------------------------------
# a damaged registry is rebuilt with its test cells (runs/<id>/tests/<id>.json + test_jobs.json)

def _damage(ws):
    """A registry overwritten with garbage (its WAL folded in first, as a killed copy would leave it)."""
    path = ws / "registry.sqlite"
    fold_wal(path)
    path.write_bytes(b"this is not a database\n" * 300)


def _cells(reg, exp="tmx"):
    return {r["test_id"]: r for r in reg.test_rows(exp)}


def test_a_rebuilt_registry_has_its_test_cells_and_sends_only_those_whose_job_ended(tmp_path, monkeypatch, fake,
                                                                                     capsys):
    from ssflctl.commands.status import view

    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.3, 0.5]))
    res = submit_mod.submit(path, ws, render=light.light_render)
    ra, rb = (p.run.run_id for p in res.submitted)
    job = {t.test.test_id: t.job_id for t in res.tests}
    with Registry(ws) as reg:
        before = {tid: (r["job_id"], r["after_job_id"], r["submission_id"], r["backend"])
                  for tid, r in _cells(reg).items()}
        sid = res.submission_id
        test_jobs = reg.submission(sid)["info"]["test_jobs"]
    assert len(before) == 6 and test_jobs == job
    # the node: run A trained; its first cell tested, its second testing, its third's job failed without
    # results; run B still training, its three cells waiting for it
    _train_done(ws, ra)
    fake.set(res.submitted[0].job_id, JobKind.COMPLETED)
    done, testing, failed = (t.test.test_id for t in res.tests if t.run.run_id == ra)
    _tested(ws, ra, done)
    fake.set(job[done], JobKind.COMPLETED)
    fake.set(job[testing], JobKind.RUNNING)
    fake.set(job[failed], JobKind.FAILED, exit_code="1:0")
    fake.set(res.submitted[1].job_id, JobKind.RUNNING)
    _damage(ws)
    capsys.readouterr()
    with Registry(ws) as reg:  # rebuilt: every cell with its job, queued until the scheduler is asked
        assert " was damaged (" in capsys.readouterr().err
        rows = _cells(reg)
        assert {tid: (r["job_id"], r["after_job_id"], r["submission_id"], r["backend"])
                for tid, r in rows.items()} == before
        assert {r["state"] for r in rows.values()} == {"queued"}
        assert {r["name"] for r in rows.values()} == {t.test.name for t in res.tests}
        assert reg.submission(sid)["info"]["test_jobs"] == job  # what cancel reaches
        assert {r[1] for r in reg.test_job_ids_ever(ra)} == {job[done], job[testing], job[failed]}
    res2 = submit_mod.submit(path, ws, render=light.light_render)
    # only the cell whose job ended without results is sent again (after nothing: its run is trained)
    assert res2.submitted == [] and [t.test.test_id for t in res2.tests_submitted] == [failed]
    assert len(fake.tests_submitted) == 2 and fake.tests_submitted[1]["after"] == {failed: None}
    why = {t.test.test_id: t.why for t in res2.tests if t.action == "skip"}
    assert why[done] == "done" and why[testing] == f"running (job {job[testing]})"
    assert all(why[t.test.test_id] == f"queued (job {job[t.test.test_id]})" for t in res.tests if t.run.run_id == rb)
    with Registry(ws) as reg:
        items = {i["run"]: i for i in view(reg, ws, "tmx")}
    assert [t["state"] for t in items[ra]["tests"]] == ["done", "running", "queued"]
    assert [t["state"] for t in items[rb]["tests"]] == ["queued"] * 3


def test_a_rebuilt_test_cell_is_not_sent_while_the_scheduler_cannot_say_what_became_of_its_job(
        tmp_path, monkeypatch, fake):
    from ssflctl.commands.status import view

    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.5]))
    res = submit_mod.submit(path, ws, render=light.light_render)
    for p in res.submitted:
        _train_done(ws, p.run.run_id)
        fake.set(p.job_id, JobKind.COMPLETED)
    for t in res.tests:  # every test job ended without results ...
        fake.set(t.job_id, JobKind.FAILED, exit_code="1:0")
    _damage(ws)
    fake.fail_queries = "slurm_load_jobs error: Socket timed out"  # ... but the scheduler cannot say so
    res2 = submit_mod.submit(path, ws, render=light.light_render)
    assert res2.submitted == [] and res2.tests_submitted == [] and len(fake.tests_submitted) == 1
    with Registry(ws) as reg:
        items = view(reg, ws, "tmx")
    notes = [t["note"] for i in items for t in i["tests"]]
    assert {t["state"] for i in items for t in i["tests"]} == {"queued"}
    assert all("scheduler not answering about test job" in n for n in notes), notes
    fake.fail_queries = None  # it answers again: the four cells are sent again, once
    res3 = submit_mod.submit(path, ws, render=light.light_render)
    assert len(res3.tests_submitted) == 4 and len(fake.tests_submitted) == 2


def test_a_rebuilt_registry_adopts_the_test_jobs_of_a_submit_killed_before_recording_them(
        tmp_path, monkeypatch, fake):
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    path = _exp(tmp_path, _tm([0.05, 0.5]))
    _killed_after_sending_tests(path, ws, monkeypatch)
    sent = fake.tests_submitted[0]["ids"]
    _damage(ws)
    with Registry(ws) as reg:  # the submit's claim comes back from test_jobs.json ...
        rows = _cells(reg)
        assert {r["state"] for r in rows.values()} == {"submitting"} and not any(r["job_id"] for r in rows.values())
        assert {r["claim_pid"] for r in rows.values()} == {__import__("os").getpid()}
        assert len({r["submission_id"] for r in rows.values()}) == 1
    # ... and holds while its process lives (here: this one): a submit sends nothing, adopts nothing
    res = submit_mod.submit(path, ws, render=light.light_render)
    assert res.tests_submitted == [] and len(fake.tests_submitted) == 1
    assert {t.why.split(" ")[0] for t in res.tests} == {"being"}
    _kill_claims(ws, rows)  # the submit is dead: its jobs are adopted, none sent twice
    res = submit_mod.submit(path, ws, render=light.light_render)
    assert res.submitted == [] and res.tests_submitted == [] and len(fake.tests_submitted) == 1
    with Registry(ws) as reg:
        got = _cells(reg)
        train = {r["run_id"]: r["job_id"] for r in reg.run_rows("tmx")}
        assert {t: r["job_id"] for t, r in got.items()} == sent
        assert {r["state"] for r in got.values()} == {"queued"}
        assert all(r["after_job_id"] == train[r["run_id"]] for r in got.values())
    # the adoption is on disk too: a second rebuild knows the jobs
    _damage(ws)
    with Registry(ws) as reg:
        assert {t: r["job_id"] for t, r in _cells(reg).items()} == sent
        assert {r["state"] for r in _cells(reg).values()} == {"queued"}
