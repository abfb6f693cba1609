"""ssflctl.control.reconcile.decide: a run's state and reason from its attempt files and the scheduler."""
import pytest

from ssflctl.control import reconcile as supervise

pytestmark = pytest.mark.unit


def _row(**kw):
    base = {"backend": "slurm", "attempt": 1, "job_id": "77", "test_job_id": "78", "submission_id": "s1",
            "submitted_at": "2026-01-01T00:00:00+00:00"}
    return {**base, **kw}


def _attempt(recovery=None, outcome=None):
    return {"dir": None, "attempt": 1, "info": {"lr": 0.01}, "progress": None, "outcome": outcome,
            "metrics": None, "recovery": recovery or []}


def test_requeues_spent_at_a_time_limit_say_what_to_do():
    rec = [{"kind": "interrupted", "message": "SIGUSR2, a time limit by submitit's rule (ran 0.8 of 1 min) at "
            "iter 66; last checkpoint epoch_32.pth; requeued", "checkpoint": "epoch_32.pth"},
           {"kind": "resumed", "message": "resumed from epoch_32.pth"},
           {"kind": "interrupted", "message": "SIGUSR2, a time limit by submitit's rule (ran 0.8 of 1 min) at "
            "iter 138; last checkpoint epoch_68.pth; requeued", "checkpoint": "epoch_68.pth"}]
    sched = {"77": {"state": "FAILED", "exit_code": "1:0", "elapsed": "00:00:50", "name": "train-x-s1-0"}}
    state, reason = supervise.decide(_row(), [_attempt(rec)], True, sched)
    assert state == "failed"
    assert reason == ("train job 77 FAILED (exit 1:0): stopped by SIGUSR2, a time limit by submitit's rule "
                      "(ran 0.8 of 1 min) after 1 requeue; raise resources.time or executor.slurm.max_num_timeout, "
                      "then `ssflctl submit` again: it continues from epoch_68.pth")


def test_an_outcome_wins_and_a_plain_failure_keeps_the_schedulers_words():
    sched = {"77": {"state": "TIMEOUT", "exit_code": "0:15", "elapsed": "01:00:00", "name": "train-x-s1-0"}}
    out = {"outcome": "failed", "reason": "ValueError: boom"}
    assert supervise.decide(_row(), [_attempt(outcome=out)], True, sched) == ("failed", "attempt 1: ValueError: boom")
    assert supervise.decide(_row(), [_attempt()], True, sched) == ("failed", "train job 77 TIMEOUT (exit 0:15)")
    resumed = [{"kind": "interrupted", "message": "x"}, {"kind": "resumed", "message": "y"}]
    assert supervise.decide(_row(), [_attempt(resumed)], True, sched)[1] == "train job 77 TIMEOUT (exit 0:15)"
