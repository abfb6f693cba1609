"""`ssflctl submit`: experiment file -> runs -> registry -> rendered attempts -> jobs.

Concurrency: the runs to submit are claimed inside one IMMEDIATE transaction (state
`submitting` + the claimer's pid/host), so two submits of the same file at once launch each run
exactly once. A submit killed between claim and launch leaves claims whose pid is gone; the
next `reconcile` marks them failed and the next submit sends them again.
"""
from __future__ import annotations

import functools
import os
import secrets
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ssflctl import backends
from ssflctl.atomic import deferred_fsync
from ssflctl.backends import Task
from ssflctl.control import testcells
from ssflctl.errors import UserError
from ssflctl.plan import spec as spec_mod
from ssflctl.workdir import versions
from ssflctl.workdir.layout import RunDir, write_submission_record
from ssflctl.workdir.records import RESUBMIT

RESUBMIT_STATES = tuple(s.value for s in RESUBMIT)


@dataclass
class PlanItem:
    run: spec_mod.RunSpec
    action: str          # "submit" | "skip"
    why: str
    job_id: Optional[str] = None
    test_job_id: Optional[str] = None
    attempt: Optional[int] = None
    lr: Optional[float] = None      # set when the attempt resumes another at that attempt's lr
    reason: Optional[str] = None    # why this attempt exists (attempt.json, the registry)


@dataclass
class SubmitResult:
    experiment: spec_mod.Experiment
    kind: str
    plan: List[PlanItem]
    submission_id: Optional[str] = None
    dry_run: bool = False
    warnings: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)  # why submit would refuse this plan (dry run)
    arrays: List[int] = field(default_factory=list)    # tasks of each train array the backend gets
    tests: List[Any] = field(default_factory=list)   # testcells.TestItem, one per test cell (test_matrix)

    @property
    def submitted(self) -> List[PlanItem]:
        return [p for p in self.plan if p.action == "submit"]

    @property
    def tests_submitted(self) -> List[Any]:
        return [t for t in self.tests if t.action == "submit"]


def _why_skip(row) -> Optional[str]:
    st = row["state"]
    if refused_cancel(row):
        return refused_cancel(row)
    if st == "done":
        return "done"
    if st in ("queued", "running"):
        return f"{st} (job {row['job_id']})"
    if st == "submitting":
        return f"being submitted by pid {row['claim_pid']} on {row['claim_host']}"
    return None


def refused_cancel(row) -> Optional[str]:
    """Why a run or test cell recorded cancelled is not sent again: the scheduler did not cancel its
    jobs (`ssflctl cancel` says so in its reason), so they may still run."""
    from ssflctl.control.reconcile import REFUSED

    if row["state"] == "cancelled" and (row["reason"] or "").startswith(REFUSED):
        return f"{row['reason'].replace('cancelled by user, ', 'cancelled, ', 1)}; run `ssflctl cancel` again first"
    return None


def _job_may_live(detail) -> Optional[str]:
    """Why a run must not be sent again although its state would allow it: a job of its current
    submission that may still exist (queued, held, running, or the scheduler could not be asked:
    a failed query is "don't know", never "gone"). Two live train jobs for one run are never made."""
    if not detail:
        return None
    from ssflctl.backends import ALIVE, JobKind

    for what in ("train", "test"):
        st = detail.get(what)
        if st is None or st.kind not in ALIVE:
            continue
        if st.kind is JobKind.UNKNOWN:
            return f"{detail['verdict'].state.value}, but the scheduler could not be asked about {what} job " \
                   f"{st.job_id} ({st.error}); not sent again while it may exist"
        return f"{detail['verdict'].state.value}, but {what} job {st.job_id} is still {st.raw or st.kind.value}; " \
               "submit again when it has ended (or `ssflctl cancel` it)"
    return None


def _why_submit(row) -> str:
    if row is None or row["state"] == "pending":
        return "new"
    reason = f": {row['reason']}" if row["reason"] else ""
    return f"was {row['state']}{reason}"[:120]


def _resume_point(run: RunDir) -> Optional[Tuple[Optional[float], str]]:
    """(lr, checkpoint) when the run's last attempt ended without an outcome but saved a
    checkpoint: its job was stopped from outside (time limit after its last requeue, node failure,
    a cancel). The resubmission continues it at the same lr instead of training from scratch."""
    prev = run.latest()
    if prev is None or prev.outcome is not None:
        return None
    ck = prev.latest_checkpoint()
    if ck is None:
        return None
    return prev.info.lr, ck


def submission_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def submit(path, ws, dry_run: bool = False, executor: Optional[str] = None,
           fns: Optional[Dict[str, str]] = None, render: Optional[Callable] = None,
           preflight: Optional[bool] = None) -> SubmitResult:
    """Validate, plan and (unless ``dry_run``) submit. ``fns`` overrides the job callables
    (``{"train", "test", "local"}`` as ``module:function``) and ``render`` the attempt renderer;
    ``preflight`` checks the data the runs read (plan.preflight; default: unless ``render`` is a
    stand-in). The dry run lists what submit would refuse in ``result.problems``.

    Raises UserError for a bad experiment file (nothing written) and when the scheduler refuses
    the submission (the claimed runs go back to ``pending`` with the reason; the attempts rendered
    for them are removed, so they never count against the retry budget)."""
    ws = Path(ws)
    exp = spec_mod.load(path)
    runs = spec_mod.expand(exp, check_paths=True, dry_run=dry_run)
    kind = spec_mod.executor_kind(exp, executor)
    backend = backends.get(kind)
    if not dry_run:
        backend.check_available(f"{exp.path}:{exp.lines.get('executor', 1)}: ")
    result = SubmitResult(experiment=exp, kind=kind, plan=[], dry_run=dry_run, warnings=list(exp.warnings))
    if preflight is None:  # a stand-in renderer (tests' light job) brings its own data
        preflight = render is None
    problems = _preflight(exp, runs, result) if preflight else []
    options = dict(exp.executor.get(kind) or {})
    options["experiment"] = exp.name
    if dry_run:
        result.plan = _dry_plan(ws, exp, runs)
        result.problems = problems
        try:
            _plan_arrays(backend, result, _tasks(ws, result.submitted), options, notes=True)
        except UserError as exc:
            result.problems.append(str(exc))
        if render is None:
            _check_configs(exp, [p.run for p in result.plan if p.action == "submit"], result)
        result.tests = _dry_tests(ws, exp, runs, result.plan)
        return result
    if problems:
        raise UserError("\n".join(problems))

    from ssflctl.control.reconcile import reconcile
    from ssflctl.registry.store import Registry, now

    reg = Registry(ws)
    try:
        reg.upsert_experiment(exp.name, str(Path(path).resolve()), exp.description)
        details = reconcile(reg, ws, exp.name)
        sid = submission_id()
        folder = ws / "submissions" / sid
        claimed = _claim(reg, result, runs, sid, folder, path, details)
        versions.record(ws, exp.name, path, [r.run_id for r in runs])  # the report's current version
        if not claimed and not result.tests_submitted:
            return result
        result.submission_id = sid
        options = dict(exp.executor.get(kind) or {})
        options["experiment"] = exp.name
        ids: Dict[str, Dict[str, Any]] = {}
        write_submission_record(folder, {"id": sid, "experiment": exp.name, "backend": kind,
                                         "spec": str(Path(path).resolve()),
                                         "run_ids": [i.run.run_id for i in claimed], "created_at": now()})
        try:
            if claimed:
                arrays = _plan_arrays(backend, result, _tasks(ws, claimed), options)
                with deferred_fsync():  # every attempt's files on disk before the first sbatch
                    tasks = _render_attempts(reg, ws, claimed, sid, render, exp)
                claimed, tasks = _drop_cancelled(reg, ws, claimed, tasks, sid)
                if not claimed and not result.tests_submitted:
                    return result
                where = {t.run_id: i for i, arr in enumerate(arrays) for t in arr}
                for t in tasks:
                    t.array = where[t.run_id]
                if tasks:
                    ids = backend.submit(tasks, folder, options, fns=fns)
        except BaseException as exc:
            _release(reg, ws, claimed, exc)
            testcells.release(reg, result.tests, exc)
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, ImportError):
                raise UserError(f"rendering the configs needs the training stack ({msg}); install it with "
                                "scripts/setup.sh (or pip install 'ssflctl[train]') on this machine") from None
            raise
        if claimed:
            _record_submitted(reg, ws, backend, claimed, ids, sid, folder, result)
        if result.tests_submitted:  # the test cells: one more backend call, after their trainings
            try:
                testcells.drop_cancelled(reg, result.tests, sid)
                tids = testcells.send(backend, ws, result.tests, ids, folder, options, fns=fns, sid=sid,
                                      kind=result.kind)
            except BaseException as exc:
                testcells.release(reg, result.tests, exc)
                raise
            testcells.record(reg, result.tests, tids, sid=sid, backend=backend, folder=folder,
                             warnings=result.warnings)
        return result
    finally:
        reg.close()


def _preflight(exp, runs, result: SubmitResult) -> List[str]:
    """Problems with the data the runs will read (plan.preflight), one line each."""
    from ssflctl.plan import preflight

    pf = preflight.check(runs, where=lambda run: f"{exp.path}:{run.line}")
    result.warnings.extend(pf.notes)
    return pf.problems


def _tasks(ws: Path, items: List[PlanItem]) -> List[Task]:
    return [Task(i.run.run_id, str(RunDir.of(ws, i.run.run_id).path.resolve()), i.run.resources, i.run.test)
            for i in items]


def _plan_arrays(backend, result: SubmitResult, tasks: List[Task], options: Dict[str, Any],
                 notes: bool = False) -> List[List[Task]]:
    """The backend's arrays for these tasks, within the scheduler's limits (read once here);
    UserError with the number and the limit when the scheduler cannot take them. ``notes``: say
    which limits could not be read (the dry run)."""
    if not tasks:
        return []
    limits = backend.limits(options)
    if notes:
        result.warnings.extend(f"{backend.name}: {n}; sbatch has the last word" for n in limits.notes)
    arrays = backend.plan_arrays(tasks, options, limits)
    result.arrays = [len(a) for a in arrays]
    if len(arrays) > 1 and limits.max_array_size and any(len(a) == limits.max_array_size for a in arrays):
        result.warnings.append(f"{len(tasks)} runs go out as {len(arrays)} train arrays of at most "
                               f"{limits.max_array_size} tasks (the cluster's MaxArraySize), each with its own "
                               "test array" + (f"; array_parallelism {options['array_parallelism']} applies to each "
                                               "array" if options.get("array_parallelism") else ""))
    return arrays


def _dry_plan(ws: Path, exp, runs) -> List[PlanItem]:
    """What a submit would do, from the registry as it is (read-only; nothing reconciled)."""
    rows = {}
    if (ws / "registry.sqlite").exists():
        from ssflctl.registry.store import Registry

        with Registry.for_reading(ws) as reg:
            rows = {r["run_id"]: r for r in reg.run_rows(exp.name)}
    plan = []
    for run in runs:
        row = rows.get(run.run_id)
        why = _why_skip(row) if row is not None else None
        plan.append(PlanItem(run, "skip" if why else "submit", why or _why_submit(row)))
    return plan


def _dry_tests(ws: Path, exp, runs, plan) -> List[Any]:
    """The test cells a submit would send (read-only)."""
    rows = {}
    if (ws / "registry.sqlite").exists():
        from ssflctl.registry.store import Registry

        with Registry.for_reading(ws) as reg:
            try:
                rows = {r["test_id"]: r for r in reg.test_rows(exp.name)}
            except Exception:  # noqa: BLE001 - a registry from before test cells
                rows = {}
    retrain = {p.run.run_id for p in plan if p.action == "submit"}
    out = []
    for run in runs:
        for t in run.tests:
            row = rows.get(t.test_id)
            why = testcells._why_skip(row, run.run_id in retrain) if row is not None else None
            out.append(testcells.TestItem(t, run, "skip" if why else "submit", why or "new"))
    return out


def _claim(reg, result: SubmitResult, runs, sid: str, folder: Path, path,
           details: Optional[Dict[str, Dict[str, Any]]] = None) -> List[PlanItem]:
    """In one IMMEDIATE transaction: register every run and claim those to submit (``submitting``):
    not done, not queued or running, and no job of theirs that may still exist (``details``: what
    reconcile found)."""
    from ssflctl.registry.store import hostname, now

    exp, claimed = result.experiment, []
    with reg.transaction():
        for run in runs:
            row = reg.ensure_run(run.run_id, exp.name, run.name, run.axes, run.resources)
            why = _why_skip(row) or _job_may_live((details or {}).get(run.run_id))
            if why:
                result.plan.append(PlanItem(run, "skip", why))
                continue
            item = PlanItem(run, "submit", _why_submit(row))
            # no current job until this submit records one (an earlier submission's stay in the attempt
            # rows and the submissions table, for cancel): a claim that dies never looks like it
            reg.update_run(run.run_id, state="submitting", reason=item.why, event="claimed",
                           claim_pid=os.getpid(), claim_host=hostname(), claimed_at=now(), submission_id=sid,
                           backend=result.kind, job_id=None, test_job_id=None)
            result.plan.append(item)
            claimed.append(item)
        result.tests = testcells.claim(reg, exp.name, runs, result.plan, sid, result.kind)
        if claimed or result.tests_submitted:
            reg.add_submission(sid, exp.name, result.kind, str(folder.resolve()), len(claimed),
                               {"spec": str(Path(path).resolve()), "tests": len(result.tests_submitted)})
    return claimed


def _check_configs(exp, runs, result: SubmitResult) -> None:
    """``--dry-run``: render every run's config in memory (the template parsed once) and look its
    types and constructor keys up in mmdet's/mmengine's registries, as the submission would; the
    first problem is a UserError at the experiment file's line that causes it."""
    try:
        from ssflctl.plan import registry_check, render as render_mod
    except ImportError as exc:  # a login node without the training stack: the plan is still checked
        result.warnings.append(f"configs not rendered nor checked here ({exc}); `submit` renders and checks them")
        return
    cache = render_mod.RenderCache(lenient=True)
    for run in runs:
        with located(exp, run):
            registry_check.check(render_mod.render_config(run.template, run.params, run.overrides, cache=cache))


@contextmanager
def located(exp, run):
    """Turn a rendering or registry problem of ``run`` into one line at the experiment file's line."""
    from ssflctl.plan.overrides import OverrideError

    try:
        yield
    except OverrideError as exc:
        raise UserError(_at(exp, run, exc.key, exc.what)) from None
    except UserError as exc:
        path = getattr(exc, "path", None)
        if path is None:
            raise UserError(f"{exp.path}:{run.line or 1}: run {run.name}: {exc}") from None
        raise UserError(_at(exp, run, path, exc.what)) from None


def _at(exp, run, path: str, what: str) -> str:
    """``file:line: <yaml key>: [config path: ]what`` for a problem at config ``path``: the override
    (experiment, dataset or matrix axis) whose key leads there, else the run's matrix line."""
    from ssflctl.plan.overrides import leaves

    ep = path.split(".")
    best, best_n = None, -1
    for top, val in run.overrides.items():
        for leaf, _ in leaves({top: val}):
            lp = leaf.split(".")
            n = next((i for i, (a, b) in enumerate(zip(lp, ep)) if a != b), min(len(lp), len(ep)))
            if n >= len(ep) - 1 and n > best_n:
                best, best_n = (top, leaf), n
    if best is None:
        return f"{exp.path}:{run.line or 1}: run {run.name} (template {Path(run.template).stem}): {path}: {what}"
    top, leaf = best
    ds = exp.datasets.get(run.axes["dataset"]) if isinstance(run.axes.get("dataset"), str) else (
        next(iter(exp.datasets.values())) if len(exp.datasets) == 1 else None)
    if top in run.axes:
        prefix = "matrix"
    elif ds is not None and top in ds.overrides:
        prefix = f"datasets.{ds.name}.overrides"
    else:
        prefix = "overrides"
    key = f"{prefix}.{leaf}"
    return f"{exp.where(key)}: {key}: " + (what if path == leaf else f"{path}: {what}")


def _render_attempts(reg, ws: Path, claimed: List[PlanItem], sid: str, render: Optional[Callable],
                     exp=None) -> List[Task]:
    """run.json and the next attempt's config for every claimed run (continuing a checkpoint left
    by a job stopped from outside). The default renderer parses each template once for the whole
    submission and checks each config against the registries before writing it. Trailing attempts
    no job ever touched (rendered by a submit that was killed, refused or cancelled, or whose job
    was cancelled before it started) are discarded first: they are no attempt of the retry budget
    and the new attempt takes their number (the claim guarantees no job of the run may still start)."""
    if render is None:
        from ssflctl.plan import registry_check
        from ssflctl.plan.render import RenderCache, render_attempt

        render = functools.partial(render_attempt, cache=RenderCache(), check=registry_check.check)
    tasks = []
    for item in claimed:
        run = RunDir.of(ws, item.run.run_id)
        for n in run.discard_unstarted():
            reg.close_attempt(item.run.run_id, n, "cancelled", "never ran; its number is reused by the next attempt")
        rj = item.run.run_json()
        rj["submission_id"] = sid
        run.write_run(rj)
        n = run.next_attempt_number()
        reason = "first attempt" if n == 1 else f"resubmitted ({item.why})"
        resume = _resume_point(run)
        with located(exp, item.run) if exp is not None else nullcontext():
            if resume is None:
                render(run.path, n, reason=reason, run=rj)
            else:
                item.lr, ck = resume
                reason += f"; resumes attempt-{n - 1}/{Path(ck).name}" + \
                    (f" at lr {item.lr:g}" if item.lr is not None else "")
                render(run.path, n, lr=item.lr, resume_from=ck, reason=reason, run=rj)
        item.attempt, item.reason = n, reason
        tasks.append(Task(item.run.run_id, str(run.path.resolve()), item.run.resources, item.run.test))
    return tasks


def _drop_cancelled(reg, ws: Path, claimed: List[PlanItem], tasks: List[Task], sid: str):
    """Just before sending: the runs `ssflctl cancel` took from this submit (their registry row is
    ``cancelled`` for this submission; the transaction decided) are not sent; their rendered
    attempts are discarded. Returns the claimed items and tasks still to send."""
    keep, dropped = [], []
    with reg.transaction():
        for item, task in zip(claimed, tasks):
            row = reg.get_run(item.run.run_id)
            if row is not None and row["state"] == "cancelled" and row["submission_id"] == sid:
                reg.update_run(item.run.run_id, claim_pid=None, event="not sent",
                               reason="cancelled by user before its jobs were sent")
                dropped.append(item)
            else:
                keep.append((item, task))
    for item in dropped:
        RunDir.of(ws, item.run.run_id).discard_unstarted(above=(item.attempt or 1) - 1)
        reg.close_attempt(item.run.run_id, item.attempt, "cancelled", "never reached the scheduler: cancelled by user")
        item.action, item.why = "skip", "cancelled by `ssflctl cancel` before it was sent"
    return [k for k, _ in keep], [t for _, t in keep]


def _release(reg, ws: Path, claimed: List[PlanItem], exc: BaseException) -> None:
    """The submission never reached the scheduler: the runs go back to ``pending`` with the reason
    (never ``failed``: nothing ran; a run `ssflctl cancel` took meanwhile stays ``cancelled``), and
    the attempt directories rendered for them are removed (a registry row for them, folded by a
    `status` meanwhile, is closed), so they never count against the run's retry budget. The event
    log keeps what happened."""
    msg = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]
    for item in claimed:
        if item.attempt:
            RunDir.of(ws, item.run.run_id).discard_unstarted(above=item.attempt - 1)
            reg.close_attempt(item.run.run_id, item.attempt, "cancelled", f"never reached the scheduler: {msg}")
        row = reg.get_run(item.run.run_id)
        if row is not None and row["state"] == "cancelled":
            reg.update_run(item.run.run_id, claim_pid=None, event="not submitted", reason=f"cancelled; not submitted: {msg}")
            continue
        reg.update_run(item.run.run_id, state="pending", reason=f"not submitted: {msg}", event="not submitted",
                       claim_pid=None)


def _record_submitted(reg, ws: Path, backend, claimed: List[PlanItem], ids: Dict[str, Dict[str, Any]], sid: str,
                      folder: Path, result: SubmitResult) -> None:
    """The scheduler took the jobs: jobs.json in each run directory first (what a rebuilt registry
    knows them from), then the registry, in one transaction that decides against a concurrent
    `ssflctl cancel`: a run it marked ``cancelled`` meanwhile keeps that state, and its new jobs are
    cancelled here (its claim is released only once they are, so a submit killed in between leaves
    the clean-up to the next reconcile)."""
    from ssflctl.registry.store import now

    t = now()
    for item in claimed:
        got = ids[item.run.run_id]
        item.job_id, item.test_job_id = got["job_id"], got.get("test_job_id")
        RunDir.of(ws, item.run.run_id).record_jobs({
            "submission_id": sid, "backend": result.kind, "job_id": item.job_id, "test_job_id": item.test_job_id,
            "attempt": item.attempt, "submitted_at": t})
    lost = []
    with reg.transaction():
        for item in claimed:
            lr = item.lr if item.lr is not None else item.run.params.get("lr")
            row = reg.get_run(item.run.run_id)
            if row is not None and row["state"] == "cancelled" and row["submission_id"] == sid:
                reg.update_run(item.run.run_id, event="cancelled while submitted", job_id=item.job_id,
                               test_job_id=item.test_job_id, attempt=item.attempt, submitted_at=t)
                reg.upsert_attempt(item.run.run_id, item.attempt, lr=lr, state="cancelled",
                                   reason="cancelled by user while being submitted", job_id=item.job_id,
                                   submission_id=sid)
                lost.append(item)
                continue
            reg.update_run(item.run.run_id, state="queued", reason="", event="submitted",
                           job_id=item.job_id, test_job_id=item.test_job_id, attempt=item.attempt,
                           submitted_at=t, claim_pid=None)
            reg.upsert_attempt(item.run.run_id, item.attempt, lr=lr, state="queued",
                               reason=item.reason or "first attempt", job_id=item.job_id,
                               submission_id=sid)
        reg.update_submission(sid, {"jobs": {i.run.run_id: [i.job_id, i.test_job_id] for i in claimed}})
    if not lost:
        return
    from ssflctl.backends import JobRef

    refs = [JobRef(j, folder, sid) for i in lost for j in (i.job_id, i.test_job_id) if j]
    try:
        backend.cancel(refs)
    except UserError as exc:
        result.warnings.append(f"{len(lost)} run(s) were cancelled by `ssflctl cancel` while being submitted, but "
                               f"cancelling their new jobs failed ({exc}); the next `ssflctl status` tries again")
        for item in lost:
            item.action, item.why = "skip", "cancelled while being submitted; its jobs are still to be cancelled"
        return
    for item in lost:
        reg.update_run(item.run.run_id, claim_pid=None)
        item.action, item.why = "skip", f"cancelled by `ssflctl cancel` while being submitted (job {item.job_id} " \
                                        "cancelled)"
