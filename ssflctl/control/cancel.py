"""Cancel the runs of an experiment (or one run): every job id they ever had that may still be alive."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

from ssflctl import backends
from ssflctl.backends import ALIVE, JobRef
from ssflctl.control.reconcile import reconcile, refs_ever
from ssflctl.errors import UserError

CANCELLABLE = ("queued", "running", "submitting", "unknown")


def cancel(reg, ws, target: str, jobs_out: List[str] = None) -> List[str]:
    """Cancel the active runs of an experiment or a run; returns the run ids cancelled.

    Every job the matched runs ever had (each attempt's and each submission's train and test job,
    not only the current ones) is asked about, and each that may still be alive (queued, held,
    running, or the scheduler could not be asked) is cancelled: a job left by an earlier submission
    is never left behind. ``jobs_out`` receives the job ids sent to the scheduler's cancel.

    Raises UserError for an unknown or ambiguous target, or when the scheduler refuses (then
    nothing is recorded as cancelled)."""
    rows = reg.find_runs(target)
    if not rows:
        raise UserError(f"cancel: no experiment or run matching {target!r} in {ws}; see `ssflctl status`")
    exps = {r["experiment"] for r in rows}
    if len(rows) > 1 and target not in exps and not all(r["name"] == target for r in rows):
        raise UserError(f"cancel: {target!r} matches {len(rows)} runs ({', '.join(r['run_id'] for r in rows[:3])}...); "
                        "give the full run id or the experiment name")
    for e in exps:
        reconcile(reg, ws, e)
    rows = [reg.get_run(r["run_id"]) for r in rows]
    by_backend: Dict[str, List[JobRef]] = defaultdict(list)
    for r in rows:
        for name, refs in refs_ever(reg, r["run_id"]).items():
            by_backend[name] += refs
    for name, refs in by_backend.items():
        backend = backends.get(name)
        statuses = backend.query(refs)
        alive = [j for j in refs if statuses.get(j.job_id) is None or statuses[j.job_id].kind in ALIVE]
        if alive:
            backend.cancel(alive)
            if jobs_out is not None:
                jobs_out.extend(j.job_id for j in alive)
    active = [r for r in rows if r["state"] in CANCELLABLE and r["job_id"]]
    for r in active:
        reg.update_run(r["run_id"], state="cancelled", reason="cancelled by user", event="cancel")
        if r["attempt"]:
            reg.upsert_attempt(r["run_id"], r["attempt"], state="cancelled", reason="cancelled by user")
    return [r["run_id"] for r in active]
