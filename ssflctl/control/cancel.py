"""Cancel the runs of an experiment (or one run): every job id they ever had that may still be alive.

Against a `submit` in flight the registry transaction decides: cancel marks the matched runs
``cancelled`` in one IMMEDIATE transaction, a run being submitted (``submitting``, its claim alive)
included, and the submit checks its claims in its own transactions — before it sends (a cancelled
run is not sent) and when it records the job ids (a cancelled run keeps that state and the submit
cancels the jobs it just sent, releasing its claim only then). A queued or running run is marked
with cancel's own claim until its jobs are cancelled (a cancel killed in between leaves the rest to
the next reconcile, as does a cancel the scheduler refused). Cancel then waits, bounded, for
those submits to let go, so what it reports is what happened; a submit that dies instead leaves
its claim on the row, and the next reconcile cancels what it had sent.

The runs' test cells (test_matrix) go the same way, in the same transaction: a cell queued,
running or being submitted is marked ``cancelled`` (``control.testcells`` checks it before sending
and when recording), and every job a cell of a matched run ever had (each submission's
``test_jobs``) that may still be alive is cancelled. A scheduler that refuses is reported as
such, naming the jobs that may still run; nothing is recorded as having stopped them.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

from ssflctl import backends
from ssflctl.backends import ALIVE, JobRef
from ssflctl.control.reconcile import REFUSED, _claim_abandoned, reconcile, refs_ever
from ssflctl.errors import UserError
from ssflctl.registry.store import hostname, now

CANCELLABLE = ("queued", "running", "submitting", "unknown")
#: how long cancel waits for a submit in flight to let go of the runs it took from it
WAIT_FOR_SUBMIT_S = 90.0



@dataclass
class Cancelled:
    runs: List[str] = field(default_factory=list)      # run ids recorded cancelled by this cancel
    jobs: List[str] = field(default_factory=list)      # the runs' job ids sent to the scheduler's cancel
    in_flight: Dict[str, str] = field(default_factory=dict)  # run or test id -> what its submit still owes
    tests: List[str] = field(default_factory=list)     # test cell ids (test_matrix) recorded cancelled
    test_jobs: List[str] = field(default_factory=list)  # the test cells' job ids sent to the scheduler's cancel
    refused: Dict[str, str] = field(default_factory=dict)  # job id -> the scheduler's answer when it did not cancel it


def cancel(reg, ws, target: str, jobs_out: List[str] = None, wait_s: float = WAIT_FOR_SUBMIT_S,
           result: Cancelled = None) -> List[str]:
    """Cancel the active runs of an experiment or a run, and their active test cells; returns the
    run ids cancelled.

    Every job the matched runs ever had (each attempt's and each submission's train and test job,
    and every job each of their test cells ever had; not only the current ones) is asked about, and
    each that may still be alive (queued, held, running, or the scheduler could not be asked) is
    cancelled: a job left by an earlier submission is never left behind. ``jobs_out`` receives the
    job ids sent to the scheduler's cancel; ``result`` (a :class:`Cancelled`) also the test cells,
    what submits in flight still owe after ``wait_s`` and each cancel the scheduler refused.

    Raises UserError for an unknown or ambiguous target, and, once everything else is done, when
    the scheduler refused to cancel some jobs: those runs and cells stay recorded ``cancelled``
    with this cancel's claim (the next reconcile tries again) and the error names the jobs that may
    still run. ``result`` says what was cancelled all the same."""
    result = result if result is not None else Cancelled()
    rows = reg.find_runs(target)
    if not rows:
        raise UserError(f"cancel: no experiment or run matching {target!r} in {ws}; see `ssflctl status`")
    exps = {r["experiment"] for r in rows}
    if len(rows) > 1 and target not in exps and not all(r["name"] == target for r in rows):
        raise UserError(f"cancel: {target!r} matches {len(rows)} runs ({', '.join(r['run_id'] for r in rows[:3])}...); "
                        "give the full run id or the experiment name")
    for e in exps:
        reconcile(reg, ws, e)
    ids = [r["run_id"] for r in rows]
    # the decision: one IMMEDIATE transaction against any submit's claim or record
    in_flight, mine, tests_in_flight, tests_mine = [], [], [], []
    with reg.transaction():
        for rid in ids:
            r = reg.get_run(rid)

            def close_attempt(row=r, rid=rid):
                if row["attempt"]:
                    reg.upsert_attempt(rid, row["attempt"], state="cancelled", reason="cancelled by user")

            _decide(r, rid, reg.update_run, in_flight, mine, result.runs, close_attempt)
            for t in reg.test_rows(run_id=rid):  # its test cells (test_matrix), the same way
                _decide(t, t["test_id"], reg.update_test, tests_in_flight, tests_mine, result.tests)
    refused = _cancel_jobs(reg, ids, result)
    with reg.transaction():  # the claims of the rows whose jobs are cancelled are released
        for rid in mine:
            r = reg.get_run(rid)
            if ("run", rid) not in refused and r["claim_pid"] == os.getpid():
                reg.update_run(rid, claim_pid=None, reason="cancelled by user" if _refused_before(r) else None)
        for tid in tests_mine:
            t = reg.get_test(tid)
            if ("test", tid) not in refused and t["claim_pid"] == os.getpid():
                reg.update_test(tid, claim_pid=None, reason="cancelled by user" if _refused_before(t) else None)
        _note_refused(reg, refused, result)
    # the submits in flight cancel what they send for these runs and cells, then release their claims
    deadline = time.time() + wait_s
    while in_flight or tests_in_flight:
        for e in exps:
            reconcile(reg, ws, e)  # a submit that died: its claim is abandoned, reconcile finishes the cancel
        in_flight = [rid for rid in in_flight if reg.get_run(rid)["claim_pid"] is not None]
        tests_in_flight = [tid for tid in tests_in_flight if reg.get_test(tid)["claim_pid"] is not None]
        if not (in_flight or tests_in_flight) or time.time() > deadline:
            break
        time.sleep(0.3)
    for rid in in_flight:
        r = reg.get_run(rid)
        result.in_flight[rid] = f"being submitted by pid {r['claim_pid']} on {r['claim_host']}"
    for tid in tests_in_flight:
        t = reg.get_test(tid)
        result.in_flight[tid] = f"being submitted by pid {t['claim_pid']} on {t['claim_host']}"
    later = list(dict.fromkeys(result.runs + [reg.get_test(t)["run_id"] for t in result.tests]))
    if later:
        refused = _cancel_jobs(reg, later, result)  # anything a submit recorded meanwhile
        with reg.transaction():
            _note_refused(reg, refused, result)
    if jobs_out is not None:
        jobs_out.extend(result.jobs + result.test_jobs)
    if result.refused:
        raise UserError(f"cancel: the scheduler did not cancel {refusal(result)}; recorded cancelled, but they may "
                        f"still run: run `ssflctl cancel {target}` again when the scheduler answers (`ssflctl status` "
                        "retries too)")
    return list(result.runs)


def _decide(row: dict, key: str, update, in_flight: list, mine: list, out: list, on_cancel=None) -> None:
    """One run's or test cell's cancel, inside the cancel's transaction (``update``: the registry's
    update_run or update_test): one being submitted is marked so its submit cancels what it sends
    (``in_flight``); one with a job is cancelled and claimed until its jobs are (``mine``: if this
    process dies before that, the next reconcile finishes it, _finish_cancel); one whose earlier
    cancel the scheduler refused is claimed to try again. ``out``: every one cancelled."""
    if row["state"] == "submitting" and not _claim_abandoned(row):
        update(key, state="cancelled", reason="cancelled by user while being submitted", event="cancel")
        in_flight.append(key)
    elif row["state"] in CANCELLABLE and row["job_id"]:
        update(key, state="cancelled", reason="cancelled by user", event="cancel", claim_pid=os.getpid(),
               claim_host=hostname(), claimed_at=now())
        if on_cancel is not None:
            on_cancel()
        mine.append(key)
    elif _refused_before(row):  # an earlier cancel the scheduler refused: this one tries again
        update(key, claim_pid=os.getpid(), claim_host=hostname(), claimed_at=now())
        mine.append(key)
    else:
        return
    out.append(key)


def _cancel_jobs(reg, run_ids: List[str], result: Cancelled) -> Dict[tuple, List[str]]:
    """Cancel every job the runs and their test cells ever had that may still be alive (one query
    and one cancel per backend). Returns ``{("run"|"test", id): [job ids]}`` of the jobs the
    scheduler did not cancel (each noted in ``result.refused`` with its answer, and left out of
    ``result.jobs``/``result.test_jobs``)."""
    from ssflctl.control import testcells

    by_backend: Dict[str, List[tuple]] = defaultdict(list)   # backend -> [(("run"|"test", id), JobRef)]
    for rid in run_ids:
        for name, refs in refs_ever(reg, rid).items():
            by_backend[name] += [(("run", rid), j) for j in refs]
        for name, pairs in testcells.refs_ever(reg, rid).items():
            by_backend[name] += [(("test", tid), j) for tid, j in pairs]
    refused: Dict[tuple, List[str]] = {}
    for name, owned in by_backend.items():
        backend = backends.get(name)
        statuses = backend.query([j for _, j in owned])
        alive = [(o, j) for o, j in owned if statuses.get(j.job_id) is None or statuses[j.job_id].kind in ALIVE]
        if not alive:
            continue
        try:
            backend.cancel([j for _, j in alive])
        except UserError as exc:
            msg = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]
            for o, j in alive:
                refused.setdefault(o, []).append(j.job_id)
                result.refused[j.job_id] = msg
            continue
        for (kind, _), j in alive:
            result.refused.pop(j.job_id, None)
            into = result.test_jobs if kind == "test" else result.jobs
            if j.job_id not in into:
                into.append(j.job_id)
    return refused


def _refused_before(row) -> bool:
    """A row recorded cancelled whose jobs the scheduler did not cancel (its reason says so)."""
    return row["state"] == "cancelled" and (row["reason"] or "").startswith(REFUSED)


def _note_refused(reg, refused: Dict[tuple, List[str]], result: Cancelled) -> None:
    """The reason of a run or cell whose jobs the scheduler did not cancel says so (its claim stays:
    the next reconcile tries again, reconcile._finish_cancel / testcells.finish_cancel)."""
    for (kind, oid), jobs in refused.items():
        if oid not in (result.tests if kind == "test" else result.runs):
            continue  # not cancelled by this cancel (e.g. a done run's leftover job): the error says it
        why = f"{REFUSED} {' '.join(jobs)} ({result.refused.get(jobs[0], '')}); it may still run"
        (reg.update_test if kind == "test" else reg.update_run)(oid, reason=why[:300])


def refusal(result: Cancelled) -> str:
    """The jobs the scheduler did not cancel, with its answer: ``jobs 101_0 101_1 (scancel ...: ...)``."""
    by_msg: Dict[str, List[str]] = defaultdict(list)
    for jid, msg in result.refused.items():
        by_msg[msg].append(jid)
    return "; ".join(f"job{'s' if len(j) > 1 else ''} {' '.join(j)} ({m})" for m, j in by_msg.items())
