"""Cancel the runs of an experiment (or one run): every job id they ever had that may still be alive.

Against a `submit` in flight the registry transaction decides: cancel marks the matched runs
``cancelled`` in one IMMEDIATE transaction, a run being submitted (``submitting``, its claim alive)
included, and the submit checks its claims in its own transactions — before it sends (a cancelled
run is not sent) and when it records the job ids (a cancelled run keeps that state and the submit
cancels the jobs it just sent, releasing its claim only then). A queued or running run is marked
with cancel's own claim until its jobs are cancelled (a cancel killed in between leaves the rest to
the next reconcile). Cancel then waits, bounded, for
those submits to let go, so what it reports is what happened; a submit that dies instead leaves
its claim on the row, and the next reconcile cancels what it had sent.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List

from ssflctl import backends
from ssflctl.backends import ALIVE, JobRef
from ssflctl.control.reconcile import _claim_abandoned, reconcile, refs_ever
from ssflctl.errors import UserError
from ssflctl.registry.store import hostname, now

CANCELLABLE = ("queued", "running", "submitting", "unknown")
#: how long cancel waits for a submit in flight to let go of the runs it took from it
WAIT_FOR_SUBMIT_S = 90.0


@dataclass
class Cancelled:
    runs: List[str] = field(default_factory=list)      # run ids recorded cancelled by this cancel
    jobs: List[str] = field(default_factory=list)      # job ids sent to the scheduler's cancel
    in_flight: Dict[str, str] = field(default_factory=dict)  # run id -> what its submit still owes


def cancel(reg, ws, target: str, jobs_out: List[str] = None, wait_s: float = WAIT_FOR_SUBMIT_S,
           result: Cancelled = None) -> List[str]:
    """Cancel the active runs of an experiment or a run; returns the run ids cancelled.

    Every job the matched runs ever had (each attempt's and each submission's train and test job,
    not only the current ones) is asked about, and each that may still be alive (queued, held,
    running, or the scheduler could not be asked) is cancelled: a job left by an earlier submission
    is never left behind. ``jobs_out`` receives the job ids sent to the scheduler's cancel;
    ``result`` (a :class:`Cancelled`) also what submits in flight still owe after ``wait_s``.

    Raises UserError for an unknown or ambiguous target, or when the scheduler refuses (then
    the runs stay recorded cancelled and the error says which jobs may still run)."""
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
    in_flight, mine = [], []
    with reg.transaction():
        for rid in ids:
            r = reg.get_run(rid)
            if r["state"] == "submitting" and not _claim_abandoned(r):
                reg.update_run(rid, state="cancelled", reason="cancelled by user while being submitted",
                               event="cancel")
                in_flight.append(rid)
                result.runs.append(rid)
            elif r["state"] in CANCELLABLE and r["job_id"]:
                # the claim marks a cancel whose jobs are still to be cancelled: if this process dies
                # before that, the next reconcile finishes it (_finish_cancel)
                reg.update_run(rid, state="cancelled", reason="cancelled by user", event="cancel",
                               claim_pid=os.getpid(), claim_host=hostname(), claimed_at=now())
                if r["attempt"]:
                    reg.upsert_attempt(rid, r["attempt"], state="cancelled", reason="cancelled by user")
                result.runs.append(rid)
                mine.append(rid)
    _cancel_jobs(reg, ids, result)
    with reg.transaction():
        for rid in mine:
            if reg.get_run(rid)["claim_pid"] == os.getpid():
                reg.update_run(rid, claim_pid=None)
    # the submits in flight cancel what they send for these runs, then release their claims
    deadline = time.time() + wait_s
    while in_flight:
        for e in exps:
            reconcile(reg, ws, e)  # a submit that died: its claim is abandoned, reconcile finishes the cancel
        in_flight = [rid for rid in in_flight if reg.get_run(rid)["claim_pid"] is not None]
        if not in_flight or time.time() > deadline:
            break
        time.sleep(0.3)
    for rid in in_flight:
        r = reg.get_run(rid)
        result.in_flight[rid] = f"being submitted by pid {r['claim_pid']} on {r['claim_host']}"
    if result.runs:
        _cancel_jobs(reg, result.runs, result)  # anything a submit recorded meanwhile
    if jobs_out is not None:
        jobs_out.extend(result.jobs)
    return list(result.runs)


def _cancel_jobs(reg, run_ids: List[str], result: Cancelled) -> None:
    by_backend: Dict[str, List[JobRef]] = defaultdict(list)
    for rid in run_ids:
        for name, refs in refs_ever(reg, rid).items():
            by_backend[name] += refs
    for name, refs in by_backend.items():
        backend = backends.get(name)
        statuses = backend.query(refs)
        alive = [j for j in refs if statuses.get(j.job_id) is None or statuses[j.job_id].kind in ALIVE]
        if alive:
            backend.cancel(alive)
            result.jobs.extend(j.job_id for j in alive if j.job_id not in result.jobs)
