"""The one state rule: what a run's state is, from its files and what the scheduler says.

``status`` (through reconcile), ``report`` and ``submit``'s plan all ask :func:`decide`, so they
cannot disagree. Precedence:

1. The run directory, where it holds an outcome that settles the run: a tested attempt (or a
   finished one when the run is not tested) is ``done``; a failed attempt, or a NaN with the retry
   budget spent, is ``failed``. The scheduler cannot overrule files (a job that wrote
   ``metrics.json`` is done whatever sacct says about it).
2. Otherwise the scheduler's view of the run's current jobs (:class:`JobView`): queued, held,
   running, ended without the files the job should have written, cancelled, forgotten (GONE) or
   not askable (UNKNOWN, with the failing query).
3. Without any scheduler view (never submitted, or a report of a copied workspace): what the
   files show (running while progress is written, pending with no attempt).

The registry's last verdict (:attr:`JobView.last_known`) stands in for the scheduler where it is
not asked (``report``, read-only workspaces) and where its query failed (the state is kept, with
the failing command in the reason; whatever the state was: a failed query never makes a run
resubmittable): the rule is idempotent on it, so a report right after
``status`` says what ``status`` said. A run the registry holds as ``done`` whose files no longer
settle it has lost its results (``failed``, resubmittable).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ssflctl.backends.base import JobKind, JobStatus
from ssflctl.workdir import layout
from ssflctl.workdir.layout import AttemptDir, RunDir
from ssflctl.workdir.records import OutcomeKind, RunState, is_cuda_oom

#: sacct may not know a job for a moment after sbatch
SCHEDULER_GRACE_S = 120


@dataclass
class Verdict:
    state: RunState
    reason: str = ""

    def as_tuple(self) -> Tuple[str, str]:
        return self.state.value, self.reason


@dataclass
class JobView:
    """The scheduler's view of a run's current submission."""
    train: Optional[JobStatus] = None
    test: Optional[JobStatus] = None
    test_job_id: Optional[str] = None       # the test job the run should have (None: none submitted)
    test_in_train_job: bool = False         # local: the test step runs in the train job's process
    submitted_at: Optional[float] = None    # epoch seconds
    since_attempt: int = 0                  # the first attempt of this submission
    last_known: Optional[Tuple[str, str]] = None  # (state, reason) the registry holds from the last reconcile
    asked: bool = True                      # False: the scheduler was not asked (report, read-only)


CUDA_OOM_HINT = "GPU out of memory: lower batch_size or use a larger GPU, then submit again"
KILLED_HINT = "raise resources.mem or lower batch_size, then `ssflctl submit` again"


def explain(reason: str, *, log_tail: str = "", job: Optional[JobStatus] = None) -> str:
    """The failed verdict's reason with what to change: the one place the explanation is added.

    A CUDA out-of-memory error (in the outcome's reason or the log tail) says to lower
    ``batch_size``; a job the scheduler saw killed by a signal (SIGKILL: the kernel's OOM killer,
    Slurm's memory enforcement) or ended OUT_OF_MEMORY carries the backend's hint (``resources.mem``,
    ``batch_size``) or the one for its state (TIMEOUT: ``resources.time``)."""
    if is_cuda_oom(reason, log_tail):
        return reason if CUDA_OOM_HINT in reason else f"{reason} — {CUDA_OOM_HINT}"
    if job is not None and job.hint and job.hint not in reason:
        return f"{reason} — {job.hint}"
    return reason


def _attempt_note(a: AttemptDir) -> str:
    """The outcome's line, prefixed with the attempt when it is not the first."""
    what = a.outcome.describe() if a.outcome else ""
    note = (f"attempt {a.n}: {what}" if what else f"attempt {a.n}") if a.n > 1 else (what or "attempt 1")
    if a.outcome is not None and a.outcome.outcome is OutcomeKind.FAILED:
        note = explain(note, log_tail=a.outcome.log_tail)
    return note


def files_verdict(run: RunDir) -> Optional[Verdict]:
    """What the files alone settle (None: they do not)."""
    attempts = run.attempts()
    if not attempts:
        return None
    last = attempts[-1]
    test = run.run.test
    out = last.outcome
    if last.has_metrics or (out is not None and out.done and not test):
        return Verdict(RunState.DONE, f"attempt {last.n} at lr {last.lr_text()}" if len(attempts) > 1 else "")
    if out is None or out.done:
        return None
    if out.outcome is OutcomeKind.NAN:
        if run.run.retries_on_nan and last.n < run.run.max_attempts:
            return None  # the job renders the next attempt, if it is alive: the scheduler says
        nans = sum(1 for a in attempts if a.outcome is not None and a.outcome.outcome is OutcomeKind.NAN)
        return Verdict(RunState.FAILED, f"NaN after {nans} attempt{'s' if nans != 1 else ''}")
    if out.outcome is OutcomeKind.FAILED:
        if (run.run.retry or {}).get("on_error") == "retry" and last.n < run.run.max_attempts:
            return None
        return Verdict(RunState.FAILED, _attempt_note(last))
    return None  # preempted / timeout / node_fail: the policy resumes; the scheduler says whether


def files_only(run: RunDir) -> Verdict:
    """No scheduler view at all: what the files show."""
    last = run.latest()
    if last is None:
        return Verdict(RunState.PENDING, "not submitted")
    out = last.outcome
    if out is not None and out.done:
        return Verdict(RunState.RUNNING, "trained; no metrics.json yet (testing, or the test step failed)")
    if out is not None and out.outcome is OutcomeKind.NAN:
        return Verdict(RunState.RUNNING, f"NaN in attempt {last.n}; retry pending")
    if out is not None:
        return Verdict(RunState.QUEUED, f"{out.outcome.value}; resume pending")
    if last.progress is not None:
        return Verdict(RunState.RUNNING, last.progress.short())
    return Verdict(RunState.QUEUED, "")


def stopped_from_outside(attempts: List[AttemptDir], fallback: str) -> str:
    """Why a job ended without the files it should have written, with what to do."""
    last = attempts[-1] if attempts else None
    if last is not None and last.outcome is not None:
        return _attempt_note(last)
    intr = last.last_interruption() if last is not None else None
    if intr is not None:
        n = len(last.resumes())
        path = last.latest_checkpoint()
        ck = path.rsplit("/", 1)[-1] if path else intr.checkpoint
        cause = intr.cause or "a signal"
        return (f"{fallback}: stopped by {cause} after {n} requeue{'s' if n != 1 else ''}; raise resources.time "
                "or executor.slurm.max_num_timeout"
                + (f", then `ssflctl submit` again: it continues from {ck}" if ck else ""))
    return fallback


def _kept(view: JobView, note: str) -> Verdict:
    """A query failed: the job may still exist, so the registry's last verdict stands (whatever it
    was: a run held as queued stays queued, and ``submit`` skips it), with the failing query said."""
    last = view.last_known[0] if view.last_known is not None else None
    if last in RunState._value2member_map_ and last not in (RunState.PENDING.value, RunState.SUBMITTING.value):
        return Verdict(RunState(last), f"{note}; last known state kept")
    return Verdict(RunState.UNKNOWN, f"{note}; no state known yet")


def decide(run: RunDir, view: Optional[JobView]) -> Verdict:
    """A run's state and a one-line reason (see the module docstring for the precedence)."""
    settled = files_verdict(run)
    if settled is not None:
        return settled
    if view is None:
        return files_only(run)
    if view.last_known is not None and view.last_known[0] == RunState.DONE.value:
        last = run.latest()
        what = layout.METRICS if last is not None and last.outcome is not None and last.outcome.done \
            else layout.OUTCOME
        return Verdict(RunState.FAILED, f"results missing: no {what} in {last.path if last else run.path}")
    if not view.asked:
        if view.last_known is not None:
            return Verdict(RunState(view.last_known[0]), view.last_known[1] or "")
        return files_only(run)
    submitted = [a for a in run.attempts() if a.n >= view.since_attempt]
    tj = view.train
    if tj is None or tj.kind is JobKind.GONE:
        if view.submitted_at is not None and time.time() - view.submitted_at < SCHEDULER_GRACE_S:
            return Verdict(RunState.QUEUED, "")
        jid = tj.job_id if tj is not None else "?"
        return Verdict(RunState.UNKNOWN, (tj.reason if tj is not None and tj.reason else
                                          f"the scheduler has no record of job {jid}"))
    k = tj.kind
    if k is JobKind.UNKNOWN:  # a failed query is "don't know", never "gone": keep the last known state
        return _kept(view, f"scheduler not answering about job {tj.job_id} ({tj.error})")
    if k in (JobKind.QUEUED, JobKind.HELD):
        note = tj.reason + (f" — {tj.hint}" if tj.hint else "")
        return Verdict(RunState.QUEUED, note)
    if k is JobKind.RUNNING:
        return Verdict(RunState.RUNNING, "")
    if k is JobKind.CANCELLED:
        return Verdict(RunState.CANCELLED, tj.describe("train job") if tj.raw else "cancelled")
    if k is JobKind.FAILED:
        return Verdict(RunState.FAILED, explain(stopped_from_outside(submitted, tj.describe("train job")), job=tj))
    # COMPLETED: the train job ended 0 without a settling outcome
    test = run.run.test
    if view.test_in_train_job or not test:
        what = layout.METRICS if test else f"a 'done' {layout.OUTCOME}"
        return Verdict(RunState.FAILED, stopped_from_outside(submitted, f"the job exited 0 but wrote no {what}"))
    if not view.test_job_id:
        return Verdict(RunState.FAILED, "trained, but no test job was submitted")
    sj = view.test
    if sj is None or sj.kind is JobKind.GONE:
        return Verdict(RunState.UNKNOWN, f"the scheduler has no record of test job {view.test_job_id}")
    if sj.kind is JobKind.UNKNOWN:
        return _kept(view, f"scheduler not answering about test job {sj.job_id} ({sj.error})")
    if sj.kind in (JobKind.QUEUED, JobKind.HELD, JobKind.RUNNING):
        return Verdict(RunState.RUNNING, "testing")
    if sj.kind is JobKind.CANCELLED:
        return Verdict(RunState.CANCELLED, f"test job {sj.job_id} cancelled")
    if sj.kind is JobKind.COMPLETED:
        return Verdict(RunState.FAILED, "test job completed but wrote no metrics.json")
    return Verdict(RunState.FAILED, f"{sj.describe('test job')}; see `ssflctl logs`")


# --------------------------------------------------------------------------------------------
# test cells (test_matrix): the same precedence for one test cell of a run
# --------------------------------------------------------------------------------------------

@dataclass
class TestView:
    """The scheduler's view of a test cell's current job."""
    job: Optional[JobStatus] = None
    job_id: Optional[str] = None
    submitted_at: Optional[float] = None
    last_known: Optional[Tuple[str, str]] = None
    asked: bool = True


TestView.__test__ = False  # not a pytest class


def decide_test(run: RunDir, test_id: str, run_verdict: Verdict, view: Optional[TestView]) -> Verdict:
    """A test cell's state: its metrics on the run's finished attempt settle it (done); a run that
    failed or was cancelled takes its test cells with it; otherwise the test job's scheduler view
    (a queued test job waits for its training: ``afterok`` on the train job); without a view, what
    the files show."""
    if run.tested_cell(test_id) is not None:
        return Verdict(RunState.DONE, "")
    rs = run_verdict.state
    if rs in (RunState.FAILED, RunState.CANCELLED):
        return Verdict(rs, f"training {rs.value}" + (f": {run_verdict.reason}" if run_verdict.reason else ""))
    if view is None or (view.job_id is None and view.last_known is None):
        return Verdict(RunState.PENDING, "not submitted")
    if view.last_known is not None and view.last_known[0] == RunState.DONE.value:
        return Verdict(RunState.FAILED, f"results missing: no {layout.METRICS} for test {test_id} on the "
                                        "run's finished attempt")
    if not view.asked:
        if view.last_known is not None:
            return Verdict(RunState(view.last_known[0]), view.last_known[1] or "")
        return Verdict(RunState.PENDING, "")
    j = view.job
    if j is None or j.kind is JobKind.GONE:
        if view.submitted_at is not None and time.time() - view.submitted_at < SCHEDULER_GRACE_S:
            return Verdict(RunState.QUEUED, "")
        return Verdict(RunState.UNKNOWN, j.reason if j is not None and j.reason else
                       f"the scheduler has no record of test job {view.job_id}")
    if j.kind is JobKind.UNKNOWN:
        note = f"scheduler not answering about test job {j.job_id} ({j.error}); last known state kept"
        if view.last_known is not None:  # as for a run: a failed query keeps whatever state it had
            return Verdict(RunState(view.last_known[0]), note)
        return Verdict(RunState.UNKNOWN, note)
    if j.kind in WAITING_KINDS:
        waiting = rs in (RunState.QUEUED, RunState.RUNNING, RunState.SUBMITTING) or j.reason == "Dependency"
        return Verdict(RunState.QUEUED, "waiting for training" if waiting else
                       j.reason + (f" — {j.hint}" if j.hint else ""))
    if j.kind is JobKind.RUNNING:
        return Verdict(RunState.RUNNING, "testing")
    if j.kind is JobKind.CANCELLED:
        return Verdict(RunState.CANCELLED, j.describe("test job"))
    if j.kind is JobKind.COMPLETED:
        return Verdict(RunState.FAILED, f"test job {j.job_id} completed but wrote no {layout.METRICS}")
    return Verdict(RunState.FAILED, f"{j.describe('test job')}; see `ssflctl logs`")


WAITING_KINDS = (JobKind.QUEUED, JobKind.HELD)
