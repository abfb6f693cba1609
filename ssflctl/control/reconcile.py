"""Reconcile the registry with the scheduler and the run directories (login node).

The run directory is the truth for what happened on the node; the scheduler (through the run's
backend) says whether a job is queued, running or gone; :func:`ssflctl.control.state.decide` is
the one rule that turns both into the run's state. Every state change and every node-side
recovery step goes to the events table. A read-only registry is read, never written.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssflctl import backends
from ssflctl.backends import JobKind, JobRef, JobStatus
from ssflctl.control.state import JobView, Verdict, decide
from ssflctl.registry.store import Registry, hostname
from ssflctl.workdir.layout import AttemptDir, RunDir, RunDirCache
from ssflctl.workdir.records import OutcomeKind, RunState

#: attempt rows still open (closed by close_open_attempts when their run is not active)
OPEN_ATTEMPT = ("pending", "submitting", "queued", "running")
ACTIVE = ("submitting", "queued", "running")
STALE_CLAIM_S = 600          # a claim from another host older than this is treated as abandoned
#: registry states whose jobs are asked about (done too: its results may have gone)
ASK_STATES = ("queued", "running", "unknown", "failed", "done")
#: how the reason of a run or test cell starts whose jobs the scheduler did not cancel (control.cancel)
REFUSED = "cancelled by user, but the scheduler did not cancel job(s)"


def ts(iso: Optional[str]) -> Optional[float]:
    """ISO-8601 → epoch seconds (None when absent or unreadable)."""
    if not iso:
        return None
    try:
        return datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def job_refs(reg: Registry, row, folders: Optional[Dict[str, Optional[Path]]] = None) -> List[JobRef]:
    """The run's current train and test job as JobRefs. ``folders``: {submission id: folder} read
    already (one query per submission, not per run)."""
    sid = row["submission_id"]
    if folders is not None and sid in folders:
        folder = folders[sid]
    else:
        sub = reg.submission(sid) if sid else None
        folder = Path(sub["folder"]) if sub else None
        if folders is not None:
            folders[sid] = folder
    hint = row["submission_id"] or ""
    return [JobRef(j, folder, hint) for j in (row["job_id"], row["test_job_id"]) if j]


def refs_ever(reg: Registry, run_id: str) -> Dict[str, List[JobRef]]:
    """Every job the run ever had (every attempt's and submission's train and test job), by backend."""
    out: Dict[str, List[JobRef]] = defaultdict(list)
    folders: Dict[str, Optional[Path]] = {}
    for jid, sid, backend in reg.job_ids_ever(run_id):
        if not backend:
            continue
        if sid and sid not in folders:
            sub = reg.submission(sid)
            folders[sid] = Path(sub["folder"]) if sub else None
        out[backend].append(JobRef(jid, folders.get(sid) if sid else None, sid or ""))
    return out


def query_all(reg: Registry, rows) -> Dict[Any, JobStatus]:
    """One query per backend for every job of ``rows``; keyed by (backend name, job id)."""
    by_backend: Dict[str, List[JobRef]] = defaultdict(list)
    folders: Dict[str, Optional[Path]] = {}
    for r in rows:
        if r["backend"] and r["job_id"]:
            by_backend[r["backend"]] += job_refs(reg, r, folders)
    out: Dict[Any, JobStatus] = {}
    for name, refs in by_backend.items():
        try:
            backend = backends.get(name)
        except Exception as exc:  # noqa: BLE001 - an unknown backend name in an old registry
            out.update({(name, j.job_id): JobStatus(j.job_id, JobKind.UNKNOWN, error=str(exc)) for j in refs})
            continue
        out.update({(name, k): v for k, v in backend.query(refs).items()})
    return out


def _claim_abandoned(r) -> bool:
    if r["claim_host"] == hostname():
        if r["claim_pid"] == os.getpid():
            return False
        try:
            os.kill(int(r["claim_pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, TypeError, ValueError):
            return False
        return False
    t = ts(r["claimed_at"])
    return t is None or time.time() - t > STALE_CLAIM_S


def view_of(r, statuses: Dict[Any, JobStatus]) -> JobView:
    """The scheduler's view of the run's current submission."""
    name = r["backend"]
    backend = backends.get(name) if name else None
    return JobView(
        train=statuses.get((name, r["job_id"])),
        test=statuses.get((name, r["test_job_id"])) if r["test_job_id"] else None,
        test_job_id=r["test_job_id"],
        test_in_train_job=bool(backend and backend.test_in_train_job),
        submitted_at=ts(r["submitted_at"]),
        since_attempt=r["attempt"] or 0,
        last_known=(r["state"], r["reason"] or ""),
    )


def remembered_view(r) -> Optional[JobView]:
    """The registry's last verdict standing in for the scheduler (report, read-only)."""
    if r is None or r["state"] in ("pending",):
        return None
    return JobView(last_known=(r["state"], r["reason"] or ""), asked=False)


def _attempt_state(a: AttemptDir, test: bool) -> str:
    out = a.outcome
    if out is not None:
        if out.done:
            return "done" if (a.has_metrics or not test) else "running"
        return out.outcome.value if out.outcome in (OutcomeKind.NAN, OutcomeKind.FAILED, OutcomeKind.PREEMPTED,
                                                      OutcomeKind.TIMEOUT) else "failed"
    if a.has_metrics:
        return "done"
    return "running" if a.progress is not None else "queued"


def _fold_attempts(registry: Registry, r, run: RunDir, known_rows=None) -> None:
    """Attempt files → the registry's attempts table and events (each change once; an attempt row
    that already says what the files say is not written). ``known_rows``: the run's attempt rows
    when the caller read them already (reconcile reads every run's in one query)."""
    attempts = run.attempts()
    if not attempts:
        return
    test = run.run.test
    known = {a["attempt"]: a for a in (registry.attempts(r["run_id"]) if known_rows is None else known_rows)}
    logged = None  # the run's events, read only when an attempt has recovery entries
    for a in attempts:
        fields: Dict[str, Any] = {"lr": a.info.lr, "state": _attempt_state(a, test), "reason": a.info.reason or None}
        if a.outcome is not None and a.outcome.reason and fields["state"] != "done":
            fields["reason"] = f"{a.info.reason or ''} → {a.outcome.reason}".strip(" →")
        if a.n >= (r["attempt"] or 0) and r["job_id"]:
            fields["job_id"] = r["job_id"]
        if a.info.started:
            fields["started_at"] = a.info.started
        if a.outcome is not None and a.outcome.finished_at:
            fields["ended_at"] = a.outcome.finished_at
        elif a.progress is not None and a.progress.updated_at and fields["state"] in ("done", "failed", "nan"):
            fields["ended_at"] = a.progress.updated_at
        before = known.get(a.n)
        if r["state"] == "cancelled" and fields["state"] in ("queued", "running"):
            fields["state"] = "cancelled"
        if fields["state"] in ("queued", "running") and r["state"] not in ACTIVE and before is not None \
                and before["state"] not in OPEN_ATTEMPT:  # closed when its run ended: not reopened
            fields["state"], fields["reason"] = before["state"], before["reason"]
        if before is None or any(before[k] != v for k, v in fields.items()):
            registry.upsert_attempt(r["run_id"], a.n, **fields)
        if before is None or before["state"] != fields["state"]:
            lr = fields["lr"]
            registry.event("attempt", run_id=r["run_id"], experiment=r["experiment"],
                           old_state=before["state"] if before is not None else None, new_state=fields["state"],
                           message=f"attempt {a.n}" + (f" · lr {lr:g}" if isinstance(lr, (int, float)) else "")
                           + (f" · {fields['reason']}" if fields["reason"] else ""))
        for rec in a.recovery:
            if logged is None:
                logged = {(e["kind"], e["message"]) for e in registry.events(r["run_id"])}
            msg = f"attempt {a.n}: {rec.message} ({rec.at or ''})"
            if (rec.kind, msg) not in logged:
                registry.event(rec.kind, run_id=r["run_id"], experiment=r["experiment"], message=msg)
                logged.add((rec.kind, msg))


def _adopt_or_fail(registry: Registry, r, run: RunDir) -> Verdict:
    """A claim whose submit died: adopt the jobs it did send out when they can run (their submission
    files exist, and a tested run has its test job), else cancel them: the run is resubmittable."""
    sub = registry.submission(r["submission_id"]) if r["submission_id"] else None
    got, backend = None, None
    if sub is not None:
        try:
            backend = backends.get(sub["backend"])
            got = backend.recover(Path(sub["folder"])).get(r["run_id"])
        except (OSError, ValueError, KeyError):
            got = None
    if not got:
        registry.update_run(r["run_id"], claim_pid=None)
        return Verdict(RunState.FAILED, "a submit was interrupted before the job was launched; submit again")
    problems = list(got.get("problems") or [])
    if run.run.test and not backend.test_in_train_job and not got.get("test_job_id"):
        problems.append(f"no test job was sent for train job {got['job_id']}")
    ids = [j for j in (got["job_id"], got.get("test_job_id")) if j]
    registry.update_submission(r["submission_id"], {"jobs": dict(
        (registry.submission(r["submission_id"])["info"].get("jobs") or {}), **{r["run_id"]: ids})})
    if problems:
        from ssflctl.errors import UserError

        try:
            backend.cancel([JobRef(j, Path(sub["folder"]), r["submission_id"]) for j in ids])
        except UserError as exc:  # keep them on the run: a later cancel or submit sees them
            registry.update_run(r["run_id"], event="not adopted", job_id=got["job_id"],
                                test_job_id=got.get("test_job_id"), submitted_at=r["claimed_at"], claim_pid=None)
            return Verdict(RunState.UNKNOWN, f"a submit was interrupted after sending job {got['job_id']}, which "
                           f"cannot run ({'; '.join(problems)}); cancelling it failed ({exc})")
        registry.update_run(r["run_id"], event="not adopted", claim_pid=None,
                            reason=f"cancelled {' '.join(ids)}: {'; '.join(problems)}")
        return Verdict(RunState.FAILED, f"a submit was interrupted after sending job {got['job_id']}, which cannot "
                       f"run ({'; '.join(problems)}); cancelled it: submit again")
    last = run.latest()
    n = last.n if last is not None else 1
    run.record_jobs({"submission_id": r["submission_id"], "backend": sub["backend"], "job_id": got["job_id"],
                     "test_job_id": got.get("test_job_id"), "attempt": n, "submitted_at": r["claimed_at"]})
    registry.update_run(r["run_id"], event="recovered", job_id=got["job_id"], test_job_id=got.get("test_job_id"),
                        submitted_at=r["claimed_at"], attempt=n, claim_pid=None)
    registry.upsert_attempt(r["run_id"], n, state="queued", job_id=got["job_id"],
                            lr=last.info.lr if last is not None else None, submission_id=r["submission_id"])
    return Verdict(RunState.QUEUED, "recovered the jobs of an interrupted submit")


def _finish_cancel(registry: Registry, r) -> None:
    """A cancelled run whose claim is still on the row: a cancel killed before it cancelled the jobs,
    or a submit in flight it took the run from that died before cancelling the jobs it had sent.
    Cancel every job the run ever had and those the submission's folder shows (the backend's
    recover), then release the claim."""
    from ssflctl.errors import UserError

    sub = registry.submission(r["submission_id"]) if r["submission_id"] else None
    refs = refs_ever(registry, r["run_id"])
    if sub is not None:
        try:
            got = backends.get(sub["backend"]).recover(Path(sub["folder"])).get(r["run_id"]) or {}
        except (OSError, ValueError, KeyError):
            got = {}
        known = {j.job_id for j in refs.get(sub["backend"], [])}
        refs[sub["backend"]] = refs.get(sub["backend"], []) + [
            JobRef(j, Path(sub["folder"]), r["submission_id"]) for j in (got.get("job_id"), got.get("test_job_id"))
            if j and j not in known]
    for name, jobs in refs.items():
        backend = backends.get(name)
        st = backend.query(jobs)
        alive = [j for j in jobs if st.get(j.job_id) is None or st[j.job_id].kind in backends.ALIVE]
        try:
            backend.cancel(alive)
        except UserError:
            return  # the claim stays: the next reconcile tries again
    registry.update_run(r["run_id"], claim_pid=None, event="cancel finished",
                        reason="cancelled by user" if (r["reason"] or "").startswith(REFUSED) else
                        "cancelled by user while being submitted")


def close_open_attempts(registry: Registry, r, run: RunDir, verdict: Verdict) -> None:
    """A run that is not active has no open attempt: every attempt row still pending/queued/running
    (rendered by a submit that was killed, refused or cancelled; a job cancelled or gone before it
    ran) is closed with its reason. One that no job ever touched never ran (and the next submit
    reuses its number: it is no attempt of the retry budget)."""
    if verdict.state.value in ACTIVE:
        return
    for a in registry.attempts(r["run_id"]):
        if a["state"] not in OPEN_ATTEMPT:
            continue
        adir = run.attempt(a["attempt"])
        if not adir.started:
            state = "cancelled"
            reason = "never ran" + (f": {verdict.reason}" if verdict.reason else "")
        else:
            state = verdict.state.value if verdict.state.value in ("failed", "cancelled", "unknown") else "failed"
            reason = verdict.reason or "ended without an outcome"
        registry.close_attempt(r["run_id"], a["attempt"], state, reason[:300])


def row_verdict(r, run: RunDir, statuses: Dict[Any, JobStatus]) -> Verdict:
    """The state rule for one registry row and its run directory, with the scheduler's answers
    ``statuses`` (:func:`query_all`); computes only (reconcile adopts an abandoned claim first)."""
    if r["state"] == "submitting":
        return Verdict(RunState.SUBMITTING, r["reason"] or "")
    if r["state"] in ASK_STATES and r["job_id"]:
        return decide(run, view_of(r, statuses))
    if r["state"] == "pending":
        return Verdict(RunState.PENDING, r["reason"] or "")
    return decide(run, remembered_view(r))  # cancelled; or a row without jobs


def run_verdict(registry: Registry, ws, run_id: str) -> Optional[Verdict]:
    """One run's state now, by the same rule as :func:`reconcile` (the scheduler asked about its
    current jobs), without writing anything (``logs -f`` asks it to know when to stop). None when
    the registry has no such run."""
    r = registry.get_run(run_id)
    if r is None:
        return None
    statuses = query_all(registry, [r]) if r["state"] in ASK_STATES else {}
    return row_verdict(r, RunDir.of(ws, run_id), statuses)


def _fold_key(r) -> tuple:
    """What of the registry row the fold depends on (with the run's files)."""
    return r["state"], r["reason"], r["attempt"], r["job_id"]


def reconcile(registry: Registry, ws, experiment: Optional[str] = None,
              cache: Optional[RunDirCache] = None) -> Dict[str, Dict[str, Any]]:
    """Fold attempt files and scheduler state into the registry (read-only: compute only).

    Returns per run id ``{"run": RunDir, "train": JobStatus|None, "test": JobStatus|None,
    "verdict": Verdict}`` for display. ``cache`` (kept between calls, ``status --watch``): a run
    whose directory is unchanged since the last call is not read again, and when its registry row
    is unchanged too its attempt files are not folded again (they were, into this row); the
    scheduler is asked and the state rule applied every time.
    """
    ws = Path(ws)
    rows = registry.run_rows(experiment)
    statuses = query_all(registry, [r for r in rows if r["state"] in ASK_STATES])
    writable = not registry.read_only
    known: Optional[Dict[str, list]] = None  # every run's attempt rows, read at the first fold
    details: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        if cache is None:
            run, fresh = RunDir.of(ws, r["run_id"]), True
        else:
            run, fresh = cache.get(ws, r["run_id"])
        if writable and (fresh or cache.memo.get(("fold", r["run_id"])) != _fold_key(r)):
            if known is None:
                known = registry.attempts_by_run(experiment)
            _fold_attempts(registry, r, run, known.get(r["run_id"], []))
            if cache is not None:
                cache.memo[("fold", r["run_id"])] = _fold_key(r)
        if writable and r["state"] == "cancelled" and r["claim_pid"] is not None and _claim_abandoned(r):
            _finish_cancel(registry, r)
            r = registry.get_run(r["run_id"])
        if r["state"] == "submitting" and writable and _claim_abandoned(r):
            verdict = _adopt_or_fail(registry, r, run)
        else:
            verdict = row_verdict(r, run, statuses)
        if writable and (verdict.state.value != r["state"] or (verdict.reason != (r["reason"] or "")
                                                                and verdict.reason)):
            registry.update_run(r["run_id"], state=verdict.state.value, reason=verdict.reason or "")
        # a run that is not active has no open attempt: the registry's attempt rows follow the run
        if writable:
            close_open_attempts(registry, r, run, verdict)
        details[r["run_id"]] = {"run": run, "verdict": verdict,
                                "train": statuses.get((r["backend"], r["job_id"])),
                                "test": statuses.get((r["backend"], r["test_job_id"]))}
    # test cells (test_matrix): their own jobs, after the runs' verdicts
    from ssflctl.control import testcells

    cells = testcells.reconcile_tests(registry, ws, experiment, {k: d["verdict"] for k, d in details.items()})
    for tid, cell in cells.items():
        if cell["row"]["run_id"] in details:
            details[cell["row"]["run_id"]].setdefault("tests", {})[tid] = cell
    return details
