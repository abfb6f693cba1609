"""The one state rule (ssflctl.control.state.decide) and its agreement across status, report and submit.

Scheduler answers come from the fake backend (ssflctl.backends.fake, registered in place of `local`
for these tests) or from the Slurm backend's parser of sacct/squeue records; the run directories
are written through ssflctl.workdir, as the job writes them.
"""
import json

import pytest

import submit_light_job as light
from ssflctl import backends
from ssflctl.backends import JobKind, JobStatus
from ssflctl.control import submit as submit_mod
from ssflctl.control.reconcile import reconcile
from ssflctl.control.state import JobView, decide
from ssflctl.registry.store import Registry
from ssflctl.report.collect import collect_workspace
from ssflctl.workdir.layout import RunDir
from ssflctl.workdir.records import Outcome, Progress, Recovery

pytestmark = pytest.mark.unit

EXP = """\
name: agree
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [focal, ssfl]
  seed: [1, 2, 3, 4, 5, 6, 7]
params: {{max_epochs: 1}}
resources: {{cpus: 1, mem: 1G, time: "00:10:00"}}
executor: {{type: local}}
"""


@pytest.fixture
def fake(monkeypatch):
    """The fake scheduler, registered under the name `local` for the duration of a test."""
    backends.register("local", "ssflctl.backends.fake:FakeBackend")
    yield backends.get("local")
    backends.register("local", "ssflctl.backends.local:LocalBackend")


def _run_dir(tmp_path, test=True, max_attempts=3):
    run = RunDir(tmp_path / "runs" / "r-00000001")
    run.write_run({"run_id": "r-00000001", "name": "r", "test": test, "retry": {"max_attempts": max_attempts},
                   "params": {"lr": 0.01}})
    return run


def _attempt(run, n, lr=0.01, outcome=None, metrics=False, progress=False, recovery=()):
    a = run.attempt(n)
    a.path.mkdir(parents=True, exist_ok=True)
    (a.path / "attempt.json").write_text(json.dumps({"attempt": n, "lr": lr, "reason": "first attempt"}))
    if outcome:
        a.write_outcome(Outcome.from_json(outcome))
    if metrics:
        a.write_metrics({"bbox": {"AP": 0.3}})
    if progress:
        a.write_progress(Progress(epoch=1, max_epochs=2, iter=5, max_iters=10))
    for r in recovery:
        a.append_recovery(Recovery.from_json(r))
    return a


def _slurm(job_id, state, **kw):
    from ssflctl.backends.slurm import to_status

    return to_status(job_id, dict({"state": state, "exit_code": kw.pop("exit_code", "0:0")}, **kw),
                     name_hint=kw.get("hint", ""))


def test_slurm_states_through_the_one_rule(tmp_path):
    run = _run_dir(tmp_path)
    _attempt(run, 1)
    view = lambda train, test=None: JobView(train=train, test=test, test_job_id="6_0", since_attempt=1)  # noqa: E731
    assert decide(run, view(_slurm("5_0", "PENDING", reason="Priority"))).as_tuple() == ("queued", "Priority")
    assert decide(run, view(_slurm("5_0", "RUNNING"))).state == "running"
    assert decide(run, view(_slurm("5_0", "COMPLETED"), _slurm("6_0", "RUNNING"))).as_tuple() == ("running", "testing")
    assert decide(run, view(_slurm("5_0", "FAILED", exit_code="1:0"))).as_tuple() == \
        ("failed", "train job 5_0 FAILED (exit 1:0)")
    assert decide(run, view(_slurm("5_0", "CANCELLED"))).state == "cancelled"
    assert decide(run, view(None)).state == "unknown"
    assert decide(run, view(_slurm("5_0", "COMPLETED"), _slurm("6_0", "COMPLETED"))).as_tuple() == \
        ("failed", "test job completed but wrote no metrics.json")
    # the same id, another job's name: slurmctld's ids restarted; ours is lost, never "done"
    from ssflctl.backends.slurm import to_status

    reused = to_status("5_0", {"state": "COMPLETED", "name": "train-x-20251231-000000-ffffff-0"},
                       "20260101-000000-abcdef")
    assert reused.kind is JobKind.GONE and decide(run, view(reused)).state == "unknown"
    # every state the Slurm backend knows maps to a kind; an unmapped one is "don't know", with its name
    assert to_status("7", {"state": "NO_SUCH_STATE"}).kind is JobKind.UNKNOWN


def test_requeues_spent_at_a_time_limit_say_what_to_do(tmp_path):
    run = _run_dir(tmp_path)
    cause = "SIGUSR2, a time limit by submitit's rule (ran 0.8 of 1 min)"
    _attempt(run, 1, recovery=[
        {"kind": "interrupted", "cause": cause, "message": "x", "checkpoint": "epoch_32.pth"},
        {"kind": "resumed", "message": "resumed from epoch_32.pth"},
        {"kind": "interrupted", "cause": cause, "message": "y", "checkpoint": "epoch_68.pth"}])
    v = decide(run, JobView(train=_slurm("77", "FAILED", exit_code="1:0"), test_job_id="78", since_attempt=1))
    assert v.as_tuple() == ("failed", f"train job 77 FAILED (exit 1:0): stopped by {cause} after 1 requeue; raise "
                            "resources.time or executor.slurm.max_num_timeout, then `ssflctl submit` again: it "
                            "continues from epoch_68.pth")


def test_an_outcome_wins_over_the_scheduler(tmp_path):
    run = _run_dir(tmp_path)
    _attempt(run, 1, outcome={"outcome": "failed", "reason": "ValueError: boom"})
    timeout = _slurm("77", "TIMEOUT", exit_code="0:15")
    assert decide(run, JobView(train=timeout, since_attempt=1)).as_tuple() == ("failed", "ValueError: boom")
    # a NaN with the retries spent: the files settle it, whatever sacct says (here: still running)
    run2 = RunDir(tmp_path / "runs" / "r2")
    run2.write_run({"run_id": "r2", "test": True, "retry": {"max_attempts": 2}})
    for n in (1, 2):
        _attempt(run2, n, outcome={"outcome": "nan", "reason": "", "nan": {"iter": 3, "loss_key": "loss_cls"}})
    assert decide(run2, JobView(train=_slurm("9", "RUNNING"))).as_tuple() == ("failed", "NaN after 2 attempts")
    # metrics.json without an outcome (an old or hand-made dir) is done
    run3 = RunDir(tmp_path / "runs" / "r3")
    run3.write_run({"run_id": "r3", "test": True})
    _attempt(run3, 1, metrics=True)
    assert decide(run3, JobView(train=JobStatus("1", JobKind.GONE))).state == "done"


def test_a_failed_query_keeps_the_last_known_state(tmp_path):
    run = _run_dir(tmp_path)
    _attempt(run, 1)
    err = "`sacct` failed: sacct: error: Problem talking to the database: Connection refused"
    v = decide(run, JobView(train=JobStatus("5", JobKind.UNKNOWN, error=err), last_known=("queued", "")))
    assert v.state == "queued" and "Connection refused" in v.reason and "last known state kept" in v.reason


# --------------------------------------------------------------------------------------------------
# agreement: status, report and submit's plan ask the same rule


def _make_tricky(ws, runs):
    """Seven kinds of run directory, one per run of the experiment (in run-id order)."""
    kinds = {}
    names = ["done_after_nan_retry", "interrupted_with_checkpoint", "test_failed", "metrics_without_outcome",
             "stale_progress", "nan_retries_spent", "failed_outcome"]
    for kind, rid in zip(names, runs):
        run = RunDir.of(ws, rid)
        kinds[rid] = kind
        for a in run.attempts():
            for f in a.path.iterdir():
                f.unlink()
            a.path.rmdir()
        run = run.refresh()
        if kind == "done_after_nan_retry":
            _attempt(run, 1, outcome={"outcome": "nan", "nan": {"iter": 3, "loss_key": "loss_cls"}})
            _attempt(run, 2, lr=0.001, outcome={"outcome": "done"}, metrics=True)
        elif kind == "interrupted_with_checkpoint":
            a = _attempt(run, 1, progress=True, recovery=[{"kind": "interrupted", "cause": "SIGUSR2"}])
            (a.path / "epoch_1.pth").write_bytes(b"w")
            (a.path / "last_checkpoint").write_text(str(a.path / "epoch_1.pth"))
        elif kind == "test_failed":
            _attempt(run, 1, outcome={"outcome": "done"})
        elif kind == "metrics_without_outcome":
            _attempt(run, 1, metrics=True)
        elif kind == "stale_progress":
            _attempt(run, 1, progress=True)
        elif kind == "nan_retries_spent":
            for n in (1, 2, 3):
                _attempt(run, n, lr=0.01 * 0.1 ** (n - 1), outcome={"outcome": "nan", "nan": {"iter": 3}})
        else:
            _attempt(run, 1, outcome={"outcome": "failed", "reason": "RuntimeError: CUDA out of memory"})
    return kinds


@pytest.mark.parametrize("scheduler", ["ended", "alive", "not_answering"])
def test_status_report_and_submit_plan_agree(tmp_path, monkeypatch, fake, scheduler):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    path = tmp_path / "agree.yaml"
    path.write_text(EXP.format(root=tmp_path / "data"))
    ws = tmp_path / "ws"
    res = submit_mod.submit(path, ws, render=light.light_render)
    ids = sorted(p.run.run_id for p in res.submitted)
    assert len(ids) == 14 and len(fake.submitted) == 1
    kinds = _make_tricky(ws, ids)
    job_of = {rid: got for rid, got in fake.submitted[0]["ids"].items()}
    for rid in ids:
        train, test = job_of[rid]["job_id"], job_of[rid]["test_job_id"]
        if scheduler == "ended":
            fake.set(train, JobKind.FAILED if kinds.get(rid) != "test_failed" else JobKind.COMPLETED,
                     exit_code="1:0")
            fake.set(test, JobKind.COMPLETED if kinds.get(rid) == "test_failed" else JobKind.CANCELLED)
        elif scheduler == "alive":
            fake.set(train, JobKind.RUNNING)
    if scheduler == "not_answering":
        fake.fail_queries = "`squeue` timed out after 60 s"

    with Registry(ws) as reg:
        reconcile(reg, ws, "agree")
        status = {r["run_id"]: (r["state"], r["reason"]) for r in reg.list_runs("agree")}
    report = {r["run_id"]: (r["state"], r["reason"]) for r in collect_workspace(ws, ["agree"])}
    plan = {p.run.run_id: p.action for p in submit_mod.submit(path, ws, dry_run=True).plan}
    assert status == report
    for rid in ids:
        state = status[rid][0]
        assert plan[rid] == ("skip" if state in ("done", "queued", "running", "submitting") else "submit"), \
            (kinds.get(rid), status[rid], plan[rid])
    # files that settle a run decide it whatever the scheduler says
    by_kind = {kinds[r]: status[r] for r in kinds}
    assert by_kind["done_after_nan_retry"] == ("done", "attempt 2 at lr 0.001")
    assert by_kind["metrics_without_outcome"][0] == "done"
    assert by_kind["nan_retries_spent"] == ("failed", "NaN after 3 attempts")
    assert by_kind["failed_outcome"][0] == "failed"  # CUDA OOM: explained, with what to change
    assert by_kind["failed_outcome"][1] == ("RuntimeError: CUDA out of memory — GPU out of memory: lower "
                                            "batch_size or use a larger GPU, then submit again")
    if scheduler == "ended":
        assert by_kind["test_failed"] == ("failed", "test job completed but wrote no metrics.json")
        assert by_kind["stale_progress"][0] == "failed"
    if scheduler == "alive":
        assert by_kind["stale_progress"][0] == by_kind["interrupted_with_checkpoint"][0] == "running"
    if scheduler == "not_answering":  # never "gone": the last known state stays, and nothing is sent again
        assert by_kind["stale_progress"][0] == "queued" and "timed out" in by_kind["stale_progress"][1]
        assert all(plan[r] == "skip" for r in ids if kinds.get(r) in ("stale_progress", "interrupted_with_checkpoint"))


def test_a_refused_submission_spends_no_attempt(tmp_path, monkeypatch, fake):
    """sbatch refused (a typo in the partition, say): the runs stay unsubmitted with the reason,
    never `failed`, and the next submit starts at attempt 1 again (the retry budget is intact)."""
    from ssflctl.errors import UserError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    path = tmp_path / "agree.yaml"
    path.write_text(EXP.format(root=tmp_path / "data"))
    ws = tmp_path / "ws"
    fake.refuse = "Invalid partition name specified"
    with pytest.raises(UserError, match="Invalid partition"):
        submit_mod.submit(path, ws, render=light.light_render)
    with Registry(ws) as reg:
        rows = reg.list_runs("agree")
    assert {r["state"] for r in rows} == {"pending"} and all("Invalid partition" in r["reason"] for r in rows)
    assert not list((ws / "runs").glob("*/attempt-*"))
    fake.refuse = None
    res = submit_mod.submit(path, ws, render=light.light_render)
    assert len(res.submitted) == 14 and {p.attempt for p in res.submitted} == {1}


# --------------------------------------------------------------------------------------------------
# issue 14: failed queries never resubmit; cancel reaches every job; killed jobs explained


def _agree(tmp_path, monkeypatch, seeds="[1]"):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "agree.yaml"
    path.write_text(EXP.format(root=tmp_path / "data").replace("[1, 2, 3, 4, 5, 6, 7]", seeds))
    return path, tmp_path / "ws"


def test_a_failed_query_keeps_any_last_known_state_and_the_test_jobs(tmp_path):
    run = _run_dir(tmp_path)
    _attempt(run, 1)
    down = JobStatus("5", JobKind.UNKNOWN, error="unknown: sacct -j 5: exit 1: Connection refused")
    v = decide(run, JobView(train=down, last_known=("failed", "train job 5 FAILED (exit 1:0)")))
    assert v.state == "failed" and "Connection refused" in v.reason
    v = decide(run, JobView(train=down, last_known=None))
    assert v.state == "unknown" and "no state known yet" in v.reason
    # the train job ended 0, the test job cannot be asked about: it may still run, the run stays running
    v = decide(run, JobView(train=_slurm("5", "COMPLETED"), test=JobStatus("6", JobKind.UNKNOWN, error="boom"),
                            test_job_id="6", last_known=("running", "testing")))
    assert v.as_tuple() == ("running", "scheduler not answering about test job 6 (boom); last known state kept")


def test_submit_never_resubmits_a_run_whose_job_may_still_exist(tmp_path, monkeypatch, fake):
    path, ws = _agree(tmp_path, monkeypatch)
    res = submit_mod.submit(path, ws, render=light.light_render)
    jobs = {p.run.run_id: p.job_id for p in res.submitted}
    (a, b) = sorted(jobs)
    fake.fail_queries = "unknown: squeue -j 100: no answer in 30 s"
    again = submit_mod.submit(path, ws, render=light.light_render)
    assert again.submitted == [] and len(fake.submitted) == 1
    assert {p.why for p in again.plan} == {f"queued (job {jobs[a]})", f"queued (job {jobs[b]})"}
    fake.fail_queries = None
    # files say failed while the train job still runs (it is writing its outcome): not sent again
    _attempt(RunDir.of(ws, a).refresh(), 1, outcome={"outcome": "failed", "reason": "ValueError: x"})
    fake.set(jobs[a], JobKind.RUNNING)
    again = submit_mod.submit(path, ws, render=light.light_render)
    skipped = {p.run.run_id: p.why for p in again.plan}
    assert again.submitted == [] and skipped[a] == f"failed, but train job {jobs[a]} is still RUNNING; submit " \
        "again when it has ended (or `ssflctl cancel` it)"
    # ... and while the scheduler cannot be asked about it
    fake.fail_queries = "unknown: sacct -j 100: exit 1: Connection refused"
    again = submit_mod.submit(path, ws, render=light.light_render)
    assert again.submitted == [] and "could not be asked" in {p.run.run_id: p.why for p in again.plan}[a]
    fake.fail_queries = None
    fake.set(jobs[a], JobKind.FAILED, exit_code="1:0")
    fake.set(res.submitted[[p.run.run_id for p in res.submitted].index(a)].test_job_id, JobKind.CANCELLED)  # kill_invalid_depend
    again = submit_mod.submit(path, ws, render=light.light_render)
    assert [p.run.run_id for p in again.submitted] == [a]


def test_cancel_cancels_every_job_a_run_ever_had(tmp_path, monkeypatch, fake):
    from ssflctl.control.cancel import cancel

    path, ws = _agree(tmp_path, monkeypatch)
    first = {p.run.run_id: (p.job_id, p.test_job_id) for p in submit_mod.submit(path, ws, render=light.light_render).submitted}
    for jid, tid in first.values():  # the scheduler forgot them (an answer): the runs are resubmitted ...
        fake.forget(jid)
        fake.forget(tid)
    with Registry(ws) as reg:  # past the grace time after sbatch
        for rid in first:
            reg.update_run(rid, submitted_at="2000-01-01T00:00:00+00:00")
    second = {p.run.run_id: (p.job_id, p.test_job_id) for p in submit_mod.submit(path, ws, render=light.light_render).submitted}
    assert set(second) == set(first)
    for jid, _ in first.values():  # ... and then the old train jobs turn up again, still queued
        fake.set(jid, JobKind.QUEUED)
    jobs = []
    with Registry(ws) as reg:
        done = cancel(reg, ws, "agree", jobs_out=jobs)
        ever = {rid: {j for j, _, _ in reg.job_ids_ever(rid)} for rid in first}
    assert sorted(done) == sorted(first)
    for rid in first:
        assert ever[rid] == {*first[rid], *second[rid]}
    # the alive ones: the old train jobs and the new train and test jobs (the forgotten old test jobs are gone)
    want = {j for j, _ in first.values()} | {j for pair in second.values() for j in pair}
    assert set(jobs) == want and set(fake.cancelled) == want and fake.alive() == []


def test_a_killed_job_is_explained_with_signal_memory_and_what_to_change(tmp_path):
    from ssflctl.backends import slurm_query as q
    from ssflctl.backends.slurm import to_status

    run = _run_dir(tmp_path)
    _attempt(run, 1, progress=True)
    # captured (Slurm 22.05.8, JobAcctGatherParams=OverMemoryKill): the step killed with SIGKILL
    rec = q.parse_sacct("31|FAILED|0:9|None||00:00:02|wrap\n31.batch|CANCELLED by 0|0:9||434950144|00:00:02|batch\n")
    v = decide(run, JobView(train=to_status("31", rec["31"]), since_attempt=1))
    assert v.state == "failed"
    assert v.reason == ("train job 31 FAILED (exit 0:9): killed by SIGKILL (signal 9), peak memory 415 MiB, "
                        "out of memory? — raise resources.mem or lower batch_size")
    # OUT_OF_MEMORY (task/cgroup saw the kernel's OOM killer), sacct's format
    rec = q.parse_sacct("32|OUT_OF_MEMORY|0:125|None||00:01:02|train\n32.batch|OUT_OF_MEMORY|0:125||8.5G|00:01:02|batch\n")
    v = decide(run, JobView(train=to_status("32", rec["32"]), since_attempt=1))
    assert v.state == "failed" and "OUT_OF_MEMORY" in v.reason and "peak memory 8.50 GiB" in v.reason
    assert "out of memory" in v.reason and "resources.mem" in v.reason and "batch_size" in v.reason
    # CUDA out of memory in the log: a failure explained, whatever the job's exit
    run2 = RunDir(tmp_path / "runs" / "r2")
    run2.write_run({"run_id": "r2", "test": True, "retry": {"max_attempts": 3}})
    _attempt(run2, 1, outcome={"outcome": "failed", "reason": "RuntimeError: step failed",
                               "log_tail": "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"})
    v = decide(run2, JobView(train=_slurm("9", "FAILED", exit_code="1:0"), since_attempt=1))
    assert v.state == "failed" and v.reason == ("RuntimeError: step failed — GPU out of memory: lower batch_size "
                                                "or use a larger GPU, then submit again")


def test_cuda_oom_is_never_retried_as_a_nan(tmp_path):
    from ssflctl.node import retry

    adir = tmp_path / "attempt-1"
    adir.mkdir()
    (adir / "nan.json").write_text(json.dumps({"iter": 3, "loss_key": "loss_cls", "nonfinite": {"loss_cls": "nan"}}))
    oom = {"outcome": "failed", "reason": "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"}
    d = retry.decide(retry.RetryPolicy(), adir, 1, 0.01, oom)
    assert d.action == "stop" and d.lr == 0.01 and "CUDA out of memory" in d.reason
    # the same logs with another exception: the NaN is the cause
    assert retry.decide(retry.RetryPolicy(), adir, 1, 0.01, {"outcome": "failed", "reason": "AssertionError"}).action \
        == "retry"


def test_status_says_once_which_query_failed(tmp_path, monkeypatch, fake, capsys):
    from ssflctl.commands import status as status_cmd

    path, ws = _agree(tmp_path, monkeypatch, seeds="[1, 2]")
    submit_mod.submit(path, ws, render=light.light_render)
    fake.fail_queries = "unknown: sacct -P -n -j 100,101: exit 1: sacct: error: Problem talking to the database"
    items = status_cmd.main(ws, "agree", as_json=True)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if "could not be asked" in ln]
    assert lines == ["note: the scheduler could not be asked: sacct -P -n -j 100,101: exit 1: sacct: error: Problem "
                     "talking to the database; 8 jobs not known: their runs keep the last known state"]
    got = json.loads(out)
    assert {d["state"] for d in got} == {"queued"} and len(items) == 4
    assert all(d["scheduler"]["known"] is False and "Problem talking" in d["scheduler"]["error"] for d in got)
