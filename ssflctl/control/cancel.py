"""Cancel the runs of an experiment (or one run): every job id they have that may still be alive."""
from __future__ import annotations

from collections import defaultdict
from typing import List

from ssflctl import backends
from ssflctl.control.reconcile import job_refs, reconcile
from ssflctl.errors import UserError

CANCELLABLE = ("queued", "running", "submitting", "unknown")


def cancel(reg, ws, target: str) -> List[str]:
    """Cancel the active runs of an experiment or a run; returns the run ids cancelled.

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
    active = [r for r in rows if r["state"] in CANCELLABLE and r["job_id"]]
    by_backend = defaultdict(list)
    for r in active:
        by_backend[r["backend"]] += job_refs(reg, r)
    for name, refs in by_backend.items():
        backends.get(name).cancel(refs)
    for r in active:
        reg.update_run(r["run_id"], state="cancelled", reason="cancelled by user", event="cancel")
        if r["attempt"]:
            reg.upsert_attempt(r["run_id"], r["attempt"], state="cancelled", reason="cancelled by user")
    return [r["run_id"] for r in active]
