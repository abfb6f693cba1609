"""The registry: schema, list_runs contract, events on state changes, concurrent writers, reconcile."""
import json
import multiprocessing as mp
import os
import sqlite3

import pytest

from ssflctl.atomic import write_json
from ssflctl.registry.store import Registry
from ssflctl.control import reconcile as supervise

pytestmark = pytest.mark.unit


def test_wal_and_list_runs_contract(tmp_path):
    with Registry(tmp_path) as reg:
        assert reg.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        reg.upsert_experiment("exp", "/x/exp.yaml")
        reg.ensure_run("a-12345678", "exp", "a", {"loss": "focal", "seed": 1})
        reg.update_run("a-12345678", state="queued", job_id="7_0", backend="slurm", attempt=1)
        reg.upsert_attempt("a-12345678", 1, lr=0.01, state="queued", job_id="7_0")
        runs = reg.list_runs("exp")
    assert len(runs) == 1
    r = runs[0]
    for key in ("run_id", "experiment", "name", "axes", "state", "reason", "job_id", "attempts"):
        assert key in r
    assert r["axes"] == {"loss": "focal", "seed": 1} and r["state"] == "queued" and r["job_id"] == "7_0"
    assert r["attempts"] == [{"attempt": 1, "lr": 0.01, "state": "queued", "reason": None, "job_id": "7_0",
                              "started_at": None, "ended_at": None}]
    with Registry(tmp_path) as reg:  # reopening keeps everything; events record every change
        kinds = [(e["kind"], e["old_state"], e["new_state"]) for e in reg.events("a-12345678")]
        assert kinds == [("registered", None, "pending"), ("state", "pending", "queued")]
        assert reg.update_run("a-12345678", state="queued") is False
        assert len(reg.events("a-12345678")) == 2
        with pytest.raises(ValueError):
            reg.update_run("a-12345678", state="bogus")


def test_update_run_and_update_test_write_fields_and_events(tmp_path):
    with Registry(tmp_path) as reg:
        reg.upsert_experiment("exp")
        reg.ensure_run("a-12345678", "exp", "a", {})
        reg.ensure_test("t-1", "a-12345678", "exp", "t", {"score_thr": 0.3})
        assert reg.update_run("a-12345678", event="claimed", reason="why", claim_pid=5, resources={"gpus": 1}) is False
        assert reg.update_test("t-1", state="queued", reason="", event="submitted", job_id="9_1") is True
        assert reg.update_test("t-1", state="queued") is False
        assert reg.update_test("t-1", state="done", reason="tested") is True
        with pytest.raises(KeyError):
            reg.update_test("t-none", state="done")
        with pytest.raises(ValueError):
            reg.update_test("t-1", state="bogus")
        run, (test,) = reg.get_run("a-12345678"), reg.test_rows(run_id="a-12345678")
        assert (run["state"], run["reason"], run["claim_pid"], json.loads(run["resources"])) == \
            ("pending", "why", 5, {"gpus": 1})
        assert (test["state"], test["reason"], test["job_id"]) == ("done", "tested", "9_1")
        events = [(e["kind"], e["old_state"], e["new_state"], e["message"]) for e in reg.events("a-12345678")]
    assert events == [("registered", None, "pending", None), ("claimed", "pending", "pending", "why"),
                      ("submitted", "pending", "queued", "test t-1"), ("test", "queued", "done", "test t-1: tested")]


def test_transaction_rolls_back(tmp_path):
    with Registry(tmp_path) as reg:
        reg.upsert_experiment("exp")
        with pytest.raises(RuntimeError):
            with reg.transaction():
                reg.ensure_run("r-1", "exp", "r", {})
                raise RuntimeError("boom")
        assert reg.list_runs() == []


def _claimer(ws, q, start):
    start.wait()
    reg = Registry(ws)
    got = []
    with reg.transaction():
        for i in range(20):
            row = reg.get_run(f"r-{i}")
            if row["state"] == "pending":
                reg.update_run(f"r-{i}", state="submitting", claim_pid=os.getpid())
                got.append(i)
    q.put(got)


def test_concurrent_claims_are_exclusive(tmp_path):
    with Registry(tmp_path) as reg:
        reg.upsert_experiment("exp")
        for i in range(20):
            reg.ensure_run(f"r-{i}", "exp", f"r{i}", {"i": i})
    ctx = mp.get_context("spawn")
    q, start = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claimer, args=(str(tmp_path), q, start)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    claimed = sorted(i for r in results for i in r)
    assert claimed == list(range(20))  # each exactly once
    with Registry(tmp_path) as reg:
        assert {r["state"] for r in reg.list_runs()} == {"submitting"}


def _run(reg, ws, run_id, state="done", backend="local", attempt=1, outcome="done", metrics=True):
    reg.upsert_experiment("exp")
    reg.ensure_run(run_id, "exp", run_id, {"seed": 1})
    reg.update_run(run_id, state=state, backend=backend, job_id="local-1_0", attempt=attempt)
    rdir = ws / "runs" / run_id
    write_json(rdir / "run.json", {"run_id": run_id, "test": True, "retry": {"max_attempts": 3}})
    adir = rdir / f"attempt-{attempt}"
    write_json(adir / "attempt.json", {"attempt": attempt, "lr": 0.001, "reason": "after NaN in loss_cls at epoch 3"})
    if outcome:
        write_json(adir / "outcome.json", {"outcome": outcome, "reason": f"{outcome} reason", "finished_at": None})
    if metrics:
        write_json(adir / "metrics.json", {"bbox": {"AP": 0.3}})
    return rdir


def test_reconcile_lost_results_and_abandoned_claims(tmp_path):
    ws = tmp_path
    with Registry(ws) as reg:
        rdir = _run(reg, ws, "ok-00000001")
        _run(reg, ws, "lost-00000002")
        (ws / "runs" / "lost-00000002" / "attempt-1" / "metrics.json").unlink()
        # a claim whose submitting process is gone (killed between claim and launch)
        reg.ensure_run("claimed-00000003", "exp", "claimed", {})
        reg.update_run("claimed-00000003", state="submitting", claim_pid=2 ** 22 + 12345,
                       claim_host=__import__("socket").gethostname())
        # a local job whose runner vanished
        reg.ensure_run("gone-00000004", "exp", "gone", {})
        reg.update_run("gone-00000004", state="running", backend="local", job_id="local-999999_0",
                       submission_id="nosuch")
        supervise.reconcile(reg, ws)
        states = {r["run_id"]: (r["state"], r["reason"]) for r in reg.list_runs()}
    assert states["ok-00000001"][0] == "done"
    assert states["lost-00000002"][0] == "failed"
    assert states["claimed-00000003"][0] == "failed" and "interrupted" in states["claimed-00000003"][1]
    assert states["gone-00000004"][0] == "unknown"  # never "done"


def test_local_task_state_lost_runner(tmp_path):
    from ssflctl.backends import local

    (tmp_path / "tasks").mkdir()
    write_json(tmp_path / "runner.json", {"pid": 2 ** 22 + 4321})
    write_json(tmp_path / "tasks" / "0.json", {"state": "running", "pid": 2 ** 22 + 4322})
    write_json(tmp_path / "tasks" / "1.json", {"state": "done", "returncode": 0})
    assert local.task_state(tmp_path, 0)["state"] == "lost"
    assert local.task_state(tmp_path, 1)["state"] == "done"
    assert local.task_state(tmp_path, 2)["state"] == "missing"
    assert local.parse_job_id("local-12_3") == (12, 3) and local.parse_job_id("17_0") is None


def test_status_view_shows_lineage_of_retried_runs(tmp_path):
    from ssflctl.commands.status import view

    ws = tmp_path
    with Registry(ws) as reg:
        rdir = _run(reg, ws, "r-0000000a", state="running", attempt=1, outcome="nan", metrics=False)
        write_json(rdir / "attempt-1" / "attempt.json", {"attempt": 1, "lr": 0.01, "reason": "first attempt"})
        write_json(rdir / "attempt-2" / "attempt.json",
                   {"attempt": 2, "lr": 0.001, "reason": "after NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)"})
        write_json(rdir / "attempt-2" / "progress.json", {"epoch": 4, "max_epochs": 12, "iter": 1500,
                                                          "max_iters": 5000, "loss": 0.75})
        # its job is still alive as far as the (local) scheduler knows
        sub = ws / "submissions" / "s1"
        write_json(sub / "runner.json", {"pid": os.getpid(), "cmd": "ssflctl.backends.local"})
        write_json(sub / "tasks" / "0.json", {"state": "running", "pid": os.getpid()})
        reg.add_submission("s1", "exp", "local", str(sub), 1)
        reg.update_run("r-0000000a", submission_id="s1", job_id="local-%d_0" % os.getpid())
        import ssflctl.backends.local as local

        orig = local.pid_alive
        local.pid_alive = lambda pid, marker="": pid == os.getpid()
        try:
            (item,) = view(reg, ws, "exp")
        finally:
            local.pid_alive = orig
        attempts = reg.list_runs("exp")[0]["attempts"]
    assert item["state"] == "running" and item["attempt"] == 2 and item["lr"] == 0.001
    assert item["progress"] == "epoch 4/12 iter 1500/5000" and item["loss_val"] == 0.75
    assert item["note"].startswith("attempt 2/3 · lr 0.001 · after NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)")
    assert [(a["attempt"], a["state"], a["lr"]) for a in attempts] == [(1, "nan", 0.01), (2, "running", 0.001)]
