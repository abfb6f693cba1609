"""Test cells (``test_matrix:``): train once, test under many test-time settings.

Each run of a matrix cell has the test cells of the experiment's ``test_matrix`` (``RunSpec.tests``;
ids stable, the run id unchanged by them). A test cell is one test job on the run's finished
attempt with the cell's dotted test-time keys applied (``ssflctl.node.job.test_cell_run``); its
results are ``attempt-N/tests/<test_id>/`` (``workdir.layout.TestDir``). The registry keeps one row
per cell (table ``tests``); :func:`ssflctl.control.state.decide_test` is its state rule.

Submit (:func:`claim`, :func:`send`): a cell is sent when it is not done, queued, running or being
submitted, or when its run is (re)trained by this submission. Its job waits for the training
(``after``): the train job of this submission, the run's train job still queued/running from an
earlier one, or nothing when the run is already trained. A finished run is never retrained for a
test cell. All test jobs of a submission go out in one backend call (on Slurm: one array).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssflctl.backends import JobKind, JobRef, JobStatus
from ssflctl.backends.base import TestTask
from ssflctl.control.state import TestView, Verdict, decide_test
from ssflctl.workdir.layout import RunDir
from ssflctl.workdir.records import RunState

#: what ``after`` says when the cell's training is sent in the same submission
THIS_SUBMISSION = "this submission"
TEST_FOLDER = "tests"   # a submission's test cells are sent from <folder>/tests
ASK_STATES = ("queued", "running", "unknown", "failed", "done")


@dataclass
class TestItem:
    test: Any                     # spec.TestSpec
    run: Any                      # spec.RunSpec
    action: str                   # "submit" | "skip"
    why: str
    after: Optional[str] = None   # THIS_SUBMISSION, an earlier train job id, or None (trained)
    after_folder: Optional[str] = None
    job_id: Optional[str] = None


TestItem.__test__ = False  # not a pytest class


def _why_skip(row, run_claimed: bool) -> Optional[str]:
    from ssflctl.control.submit import refused_cancel

    st = row["state"]
    if st == "submitting":
        return f"being submitted by pid {row['claim_pid']} on {row['claim_host']}"
    if refused_cancel(row):  # its job may still run: never a second one
        return refused_cancel(row)
    if run_claimed:
        return None
    if st == "done":
        return "done"
    if st in ("queued", "running"):
        return f"{st} (job {row['job_id']})"
    return None


def claim(reg, exp_name: str, runs, run_items, sid: str, kind: str) -> List[TestItem]:
    """Inside submit's claim transaction: register every test cell; claim those to send."""
    from ssflctl.registry.store import hostname, now

    by_run = {i.run.run_id: i for i in run_items}
    items: List[TestItem] = []
    for run in runs:
        if not run.tests:
            continue
        ritem = by_run.get(run.run_id)
        claimed = ritem is not None and ritem.action == "submit"
        rrow = reg.get_run(run.run_id)
        for t in run.tests:
            row = reg.ensure_test(t.test_id, run.run_id, exp_name, t.name, t.axes)
            why = _why_skip(row, claimed)
            if why:
                items.append(TestItem(t, run, "skip", why))
                continue
            if claimed:
                after, folder = THIS_SUBMISSION, None
            elif rrow is not None and rrow["state"] == "done":
                after, folder = None, None
            elif rrow is not None and rrow["state"] in ("queued", "running") and rrow["job_id"]:
                sub = reg.submission(rrow["submission_id"]) if rrow["submission_id"] else None
                after, folder = rrow["job_id"], (sub["folder"] if sub else None)
            else:
                items.append(TestItem(t, run, "skip", f"waits for its run ({rrow['state'] if rrow else 'unknown'})"))
                continue
            why = "new" if row["state"] == "pending" else f"was {row['state']}" + (
                f": {row['reason']}" if row["reason"] else "")
            item = TestItem(t, run, "submit", why[:120], after=after, after_folder=folder)
            reg.update_test(t.test_id, state="submitting", reason=item.why, event="claimed", claim_pid=os.getpid(),
                            claim_host=hostname(), claimed_at=now(), submission_id=sid, backend=kind)
            items.append(item)
    return items


def send(backend, ws: Path, items: List[TestItem], run_ids: Dict[str, Dict[str, Any]], folder: Path,
         options: Dict[str, Any], fns: Optional[Dict[str, str]] = None, sid: Optional[str] = None,
         kind: Optional[str] = None) -> Dict[str, str]:
    """Write each claimed cell's claim (``test_jobs.json``: this submission, no job yet; what a
    rebuilt registry knows an interrupted submit from) and definition (``runs/<id>/tests/<test_id>.json``),
    then send the test jobs in one backend call; ``run_ids`` are the train job ids of this
    submission (``folder``: its folder, ``sid``: its id, by default the folder's name; ``kind``: the
    backend's registered name, as the registry keeps it, by default ``backend.name``)."""
    from ssflctl.registry.store import hostname, now

    sid = sid or Path(folder).name
    sending = [it for it in items if it.action == "submit"]
    for it in sending:
        if it.after == THIS_SUBMISSION:
            it.after, it.after_folder = run_ids[it.run.run_id]["job_id"], str(folder)
    claims: Dict[str, List[Dict[str, Any]]] = {}
    t = now()
    for it in sending:
        claims.setdefault(it.run.run_id, []).append({
            "submission_id": sid, "backend": kind or backend.name, "test_id": it.test.test_id, "job_id": None,
            "after": it.after, "claim_pid": os.getpid(), "claim_host": hostname(), "claimed_at": t})
    for rid, entries in claims.items():
        RunDir.of(ws, rid).record_test_jobs(entries)
    tasks = []
    for it in sending:
        run = RunDir.of(ws, it.run.run_id)
        body = run.raw_run()
        cells = [t.test_id for t in it.run.tests]
        if body is not None and body.get("test_cells") != cells:  # the cells as last submitted (report)
            body["test_cells"] = cells
            run.write_run(body)
        path = run.write_test_cell(it.test.cell_json())
        tasks.append(TestTask(test_id=it.test.test_id, run_id=it.run.run_id, run_dir=str(run.path.resolve()),
                              cell=str(path.resolve()), resources=it.run.resources, after=it.after,
                              after_folder=it.after_folder))
    if not tasks:
        return {}
    return backend.submit_tests(tasks, Path(folder) / TEST_FOLDER, options, fns=fns)


def drop_cancelled(reg, items: List[TestItem], sid: str) -> None:
    """Just before sending: the cells `ssflctl cancel` took from this submit (their row is
    ``cancelled`` for this submission; the transaction decided) are not sent."""
    with reg.transaction():
        for it in items:
            if it.action != "submit":
                continue
            row = reg.get_test(it.test.test_id)
            if row is not None and row["state"] == "cancelled" and row["submission_id"] == sid:
                reg.update_test(it.test.test_id, claim_pid=None, event="not sent",
                                reason="cancelled by user before its job was sent")
                it.action, it.why = "skip", "cancelled by `ssflctl cancel` before it was sent"


def record(reg, items: List[TestItem], ids: Dict[str, str], sid: Optional[str] = None, backend=None,
           folder: Optional[Path] = None, warnings: Optional[List[str]] = None) -> None:
    """The scheduler took the test jobs: the registry, in one transaction that decides against a
    concurrent `ssflctl cancel` (a cell it marked ``cancelled`` meanwhile keeps that state and its new
    job is cancelled here; its claim is released only once it is). The submission keeps every test
    job it sent (``test_jobs``: what cancel reaches later)."""
    from ssflctl.registry.store import now

    t = now()
    sent = [it for it in items if it.action == "submit"]
    for it in sent:
        it.job_id = ids[it.test.test_id]
    if sid is not None:  # test_jobs.json first (merged into send's claim): what a rebuilt registry knows
        by_run: Dict[str, List[Dict[str, Any]]] = {}
        for it in sent:
            by_run.setdefault(it.run.run_id, []).append({
                "submission_id": sid, "test_id": it.test.test_id, "job_id": it.job_id, "after": it.after,
                "submitted_at": t})
        for rid, entries in by_run.items():
            RunDir.of(reg.ws, rid).record_test_jobs(entries)
    lost = []
    with reg.transaction():
        for it in sent:
            row = reg.get_test(it.test.test_id)
            if sid is not None and row is not None and row["state"] == "cancelled" and row["submission_id"] == sid:
                reg.update_test(it.test.test_id, event="cancelled while submitted", job_id=it.job_id,
                                after_job_id=it.after, submitted_at=t)
                lost.append(it)
                continue
            reg.update_test(it.test.test_id, state="queued", reason="", event="submitted", job_id=it.job_id,
                            after_job_id=it.after, submitted_at=t, claim_pid=None)
        if sid is not None:
            reg.add_test_jobs(sid, {it.test.test_id: it.job_id for it in sent})
    if not lost or backend is None:
        return
    from ssflctl.errors import UserError

    try:
        backend.cancel([JobRef(it.job_id, Path(folder) / TEST_FOLDER if folder else None, sid or "")
                        for it in lost])
    except UserError as exc:
        if warnings is not None:
            warnings.append(f"{len(lost)} test cell(s) were cancelled by `ssflctl cancel` while being submitted, "
                            f"but cancelling their new jobs failed ({exc}); the next `ssflctl status` tries again")
        for it in lost:
            it.action, it.why = "skip", "cancelled while being submitted; its job is still to be cancelled"
        return
    for it in lost:
        reg.update_test(it.test.test_id, claim_pid=None)
        it.action, it.why = "skip", f"cancelled by `ssflctl cancel` while being submitted (job {it.job_id} cancelled)"


def release(reg, items: List[TestItem], exc: BaseException) -> None:
    msg = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]
    for it in items:
        if it.action != "submit":
            continue
        row = reg.get_test(it.test.test_id)
        if row is not None and row["state"] == "cancelled":  # `ssflctl cancel` took it meanwhile: stays so
            reg.update_test(it.test.test_id, claim_pid=None, event="not submitted",
                            reason=f"cancelled; not submitted: {msg}")
            continue
        reg.update_test(it.test.test_id, state="pending", reason=f"not submitted: {msg}", event="not submitted",
                        claim_pid=None)


# --------------------------------------------------------------------------------------------
# reconcile
# --------------------------------------------------------------------------------------------

def _ts(iso: Optional[str]) -> Optional[float]:
    from ssflctl.control.reconcile import ts

    return ts(iso)


def job_ref(reg, row) -> Optional[JobRef]:
    if not row["job_id"]:
        return None
    sub = reg.submission(row["submission_id"]) if row["submission_id"] else None
    folder = Path(sub["folder"]) / TEST_FOLDER if sub else None
    return JobRef(row["job_id"], folder, row["submission_id"] or "")


def refs_ever(reg, run_id: str) -> Dict[str, List[tuple]]:
    """Every job the run's test cells ever had, by backend: ``[(test id, JobRef)]`` (each JobRef
    with the test folder of the submission that sent it)."""
    out: Dict[str, List[tuple]] = {}
    folders: Dict[str, Optional[Path]] = {}
    for tid, jid, sid, backend in reg.test_job_ids_ever(run_id):
        if not backend:
            continue
        if sid and sid not in folders:
            sub = reg.submission(sid)
            folders[sid] = Path(sub["folder"]) / TEST_FOLDER if sub else None
        out.setdefault(backend, []).append((tid, JobRef(jid, folders.get(sid) if sid else None, sid or "")))
    return out


def _recovered(reg, row) -> Optional[Dict[str, Any]]:
    """What the backend finds in the submission's test folder for this cell (None: nothing)."""
    from ssflctl import backends

    sub = reg.submission(row["submission_id"]) if row["submission_id"] else None
    if sub is None:
        return None
    try:
        got = backends.get(sub["backend"]).recover_tests(Path(sub["folder"]) / TEST_FOLDER).get(row["test_id"])
    except (OSError, ValueError, KeyError):
        return None
    return dict(got, backend=sub["backend"], folder=Path(sub["folder"]) / TEST_FOLDER) if got else None


def _adopt_or_fail(reg, row) -> Verdict:
    """A cell's claim whose submit died: adopt the test job it did send when it can run (the
    backend finds it, its files exist, and the train job it waits for is the run's), else cancel
    it: the cell is sent again by the next submit. As for a run (reconcile._adopt_or_fail)."""
    from ssflctl import backends
    from ssflctl.errors import UserError

    got = _recovered(reg, row)
    if not got or not got.get("job_id"):
        reg.update_test(row["test_id"], claim_pid=None)
        return Verdict(RunState.FAILED, "a submit was interrupted before the test job was launched; submit again")
    jid, after = got["job_id"], got.get("after")
    problems = list(got.get("problems") or [])
    rrow = reg.get_run(row["run_id"])
    if after and (rrow is None or rrow["job_id"] != after):
        problems.append(f"the train job it waits for ({after}) is not its run's "
                        f"({rrow['job_id'] if rrow is not None and rrow['job_id'] else 'none'})")
    # cancel reaches it whatever happens, a rebuilt registry too
    RunDir.of(reg.ws, row["run_id"]).record_test_jobs([{
        "submission_id": row["submission_id"], "backend": got["backend"], "test_id": row["test_id"], "job_id": jid,
        "after": after, "submitted_at": row["claimed_at"]}])
    reg.add_test_jobs(row["submission_id"], {row["test_id"]: jid})
    backend = backends.get(got["backend"])
    if problems:
        try:
            backend.cancel([JobRef(jid, got["folder"], row["submission_id"])])
        except UserError as exc:  # keep it on the cell: a later cancel or submit sees it
            reg.update_test(row["test_id"], event="not adopted", job_id=jid, after_job_id=after,
                            submitted_at=row["claimed_at"], claim_pid=None)
            return Verdict(RunState.UNKNOWN, f"a submit was interrupted after sending test job {jid}, which cannot "
                           f"run ({'; '.join(problems)}); cancelling it failed ({exc})")
        reg.update_test(row["test_id"], event="not adopted", claim_pid=None,
                        reason=f"cancelled {jid}: {'; '.join(problems)}")
        return Verdict(RunState.FAILED, f"a submit was interrupted after sending test job {jid}, which cannot run "
                       f"({'; '.join(problems)}); cancelled it: submit again")
    reg.update_test(row["test_id"], event="recovered", job_id=jid, after_job_id=after,
                    submitted_at=row["claimed_at"], claim_pid=None)
    return Verdict(RunState.QUEUED, "recovered the test job of an interrupted submit")


def finish_cancel(reg, row) -> bool:
    """A cancelled cell whose claim is still on the row (a cancel killed or refused by the scheduler
    before it cancelled the jobs, or a submit in flight it took the cell from that died): cancel
    every job the cell ever had that may still be alive, and the one the submission's folder shows,
    then release the claim. False when the scheduler refused (the claim stays: tried again)."""
    from ssflctl import backends
    from ssflctl.backends import ALIVE
    from ssflctl.errors import UserError

    refs: Dict[str, List[JobRef]] = {}
    for name, pairs in refs_ever(reg, row["run_id"]).items():
        refs[name] = [ref for tid, ref in pairs if tid == row["test_id"]]
    got = _recovered(reg, row)
    if got and got.get("job_id") and got["job_id"] not in {j.job_id for j in refs.get(got["backend"], [])}:
        refs.setdefault(got["backend"], []).append(JobRef(got["job_id"], got["folder"], row["submission_id"] or ""))
    for name, jobs in refs.items():
        if not jobs:
            continue
        backend = backends.get(name)
        st = backend.query(jobs)
        alive = [j for j in jobs if st.get(j.job_id) is None or st[j.job_id].kind in ALIVE]
        try:
            if alive:
                backend.cancel(alive)
        except UserError:
            return False
    from ssflctl.control.reconcile import REFUSED

    reg.update_test(row["test_id"], claim_pid=None, event="cancel finished",
                    reason="cancelled by user" if (row["reason"] or "").startswith(REFUSED) else None)
    return True


def reconcile_tests(reg, ws, experiment: Optional[str], run_verdicts: Dict[str, Verdict],
                    ask: bool = True) -> Dict[str, Dict[str, Any]]:
    """Fold each test cell's files and job into the registry; per test id ``{"row", "verdict",
    "job"}`` (for status). ``run_verdicts``: the runs' verdicts of the same reconcile."""
    from ssflctl import backends

    from ssflctl.control.reconcile import REFUSED, _claim_abandoned

    rows = reg.test_rows(experiment)
    statuses: Dict[Any, JobStatus] = {}
    if ask:
        by_backend: Dict[str, List[JobRef]] = {}
        for r in rows:
            ref = job_ref(reg, r) if r["state"] in ASK_STATES else None
            if ref is not None and r["backend"]:
                by_backend.setdefault(r["backend"], []).append(ref)
        for name, refs in by_backend.items():
            try:
                got = backends.get(name).query(refs)
            except Exception as exc:  # noqa: BLE001 - an unknown backend name in an old registry
                got = {j.job_id: JobStatus(j.job_id, JobKind.UNKNOWN, error=str(exc)) for j in refs}
            statuses.update({(name, k): v for k, v in got.items()})
    writable = not reg.read_only
    out: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        run = RunDir.of(ws, r["run_id"])
        rv = run_verdicts.get(r["run_id"], Verdict(RunState.UNKNOWN, ""))
        if writable and r["state"] == "cancelled" and r["claim_pid"] is not None and _claim_abandoned(r) \
                and finish_cancel(reg, r):
            r = reg.get_test(r["test_id"])
        if r["state"] == "submitting":
            verdict = _adopt_or_fail(reg, r) if writable and _claim_abandoned(r) else \
                Verdict(RunState.SUBMITTING, r["reason"] or "")
            if run.tested_cell(r["test_id"]) is not None:
                verdict = Verdict(RunState.DONE, "")
        elif r["state"] == "pending":
            verdict = decide_test(run, r["test_id"], rv, None)
            if verdict.state is RunState.PENDING:
                verdict = Verdict(RunState.PENDING, r["reason"] or verdict.reason)
        else:
            job = statuses.get((r["backend"], r["job_id"])) if r["job_id"] else None
            view = TestView(job=job, job_id=r["job_id"], submitted_at=_ts(r["submitted_at"]),
                            last_known=(r["state"], r["reason"] or ""),
                            asked=ask and r["state"] in ASK_STATES and bool(r["job_id"]))
            verdict = decide_test(run, r["test_id"], rv, view)
            if verdict.state is RunState.CANCELLED and r["state"] == "cancelled" and \
                    (r["reason"] or "").startswith(REFUSED):  # its own jobs may still run: that stays said
                verdict = Verdict(RunState.CANCELLED, r["reason"])
        if writable and (verdict.state.value != r["state"] or (verdict.reason and verdict.reason != (r["reason"] or ""))):
            reg.update_test(r["test_id"], state=verdict.state.value, reason=verdict.reason or "")
        out[r["test_id"]] = {"row": r, "verdict": verdict, "job": statuses.get((r["backend"], r["job_id"]))}
    return out


def cell_verdict(ws, run_id: str, test_id: str, run_verdict: Verdict, row=None) -> Verdict:
    """A test cell's state for readers that do not ask the scheduler (report)."""
    run = RunDir.of(ws, run_id)
    view = None
    if row is not None and row["state"] != "pending":
        view = TestView(job_id=row["job_id"], last_known=(row["state"], row["reason"] or ""), asked=False)
    return decide_test(run, test_id, run_verdict, view)



def live_cell_verdict(reg, ws, test_id: str, run_verdict: Verdict) -> Optional[Verdict]:
    """A test cell's state now (its job asked), by :func:`reconcile_tests`' rule, without writing
    (``logs --test -f`` asks it to know when to stop). None when the registry has no such cell."""
    from ssflctl import backends

    r = reg.get_test(test_id)
    if r is None:
        return None
    run = RunDir.of(ws, r["run_id"])
    if r["state"] == "submitting":
        return Verdict(RunState.DONE, "") if run.tested_cell(test_id) is not None else \
            Verdict(RunState.SUBMITTING, r["reason"] or "")
    if r["state"] == "pending":
        return decide_test(run, test_id, run_verdict, None)
    job = None
    ref = job_ref(reg, r) if r["state"] in ASK_STATES and r["backend"] else None
    if ref is not None:
        try:
            job = backends.get(r["backend"]).query([ref]).get(ref.job_id)
        except Exception as exc:  # noqa: BLE001 - as reconcile_tests: a query that failed is "don't know"
            job = JobStatus(ref.job_id, JobKind.UNKNOWN, error=str(exc))
    view = TestView(job=job, job_id=r["job_id"], submitted_at=_ts(r["submitted_at"]),
                    last_known=(r["state"], r["reason"] or ""), asked=ref is not None)
    return decide_test(run, test_id, run_verdict, view)
