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
from ssflctl.errors import UserError
from ssflctl.plan import spec as spec_mod
from ssflctl.workdir.layout import RunDir
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

    @property
    def submitted(self) -> List[PlanItem]:
        return [p for p in self.plan if p.action == "submit"]


def _why_skip(row) -> Optional[str]:
    st = row["state"]
    if st == "done":
        return "done"
    if st in ("queued", "running"):
        return f"{st} (job {row['job_id']})"
    if st == "submitting":
        return f"being submitted by pid {row['claim_pid']} on {row['claim_host']}"
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
           fns: Optional[Dict[str, str]] = None, render: Optional[Callable] = None) -> SubmitResult:
    """Validate, plan and (unless ``dry_run``) submit. ``fns`` overrides the job callables
    (``{"train", "test", "local"}`` as ``module:function``) and ``render`` the attempt renderer.

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
    if dry_run:
        result.plan = _dry_plan(ws, exp, runs)
        if render is None:
            _check_configs(exp, [p.run for p in result.plan if p.action == "submit"], result)
        return result

    from ssflctl.control.reconcile import reconcile
    from ssflctl.registry.store import Registry

    reg = Registry(ws)
    try:
        reg.upsert_experiment(exp.name, str(Path(path).resolve()), exp.description)
        reconcile(reg, ws, exp.name)
        sid = submission_id()
        folder = ws / "submissions" / sid
        claimed = _claim(reg, result, runs, sid, folder, path)
        if not claimed:
            return result
        result.submission_id = sid
        try:
            with deferred_fsync():  # every attempt's files on disk before the first sbatch
                tasks = _render_attempts(ws, claimed, sid, render, exp)
            options = dict(exp.executor.get(kind) or {})
            options["experiment"] = exp.name
            ids = backend.submit(tasks, folder, options, fns=fns)
        except BaseException as exc:
            _release(reg, ws, claimed, exc)
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if isinstance(exc, ImportError):
                raise UserError(f"rendering the configs needs the training stack ({msg}); install it with "
                                "scripts/setup.sh (or pip install 'ssflctl[train]') on this machine") from None
            raise
        _record_submitted(reg, claimed, ids, sid)
        return result
    finally:
        reg.close()


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


def _claim(reg, result: SubmitResult, runs, sid: str, folder: Path, path) -> List[PlanItem]:
    """In one IMMEDIATE transaction: register every run and claim those to submit (``submitting``)."""
    from ssflctl.registry.store import hostname, now

    exp, claimed = result.experiment, []
    with reg.transaction():
        for run in runs:
            row = reg.ensure_run(run.run_id, exp.name, run.name, run.axes, run.resources)
            why = _why_skip(row)
            if why:
                result.plan.append(PlanItem(run, "skip", why))
                continue
            item = PlanItem(run, "submit", _why_submit(row))
            reg.update_run(run.run_id, state="submitting", reason=item.why, event="claimed",
                           claim_pid=os.getpid(), claim_host=hostname(), claimed_at=now(), submission_id=sid,
                           backend=result.kind)
            result.plan.append(item)
            claimed.append(item)
        if claimed:
            reg.add_submission(sid, exp.name, result.kind, str(folder.resolve()), len(claimed),
                               {"spec": str(Path(path).resolve())})
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


def _render_attempts(ws: Path, claimed: List[PlanItem], sid: str, render: Optional[Callable],
                     exp=None) -> List[Task]:
    """run.json and the next attempt's config for every claimed run (continuing a checkpoint left
    by a job stopped from outside). The default renderer parses each template once for the whole
    submission and checks each config against the registries before writing it."""
    if render is None:
        from ssflctl.plan import registry_check
        from ssflctl.plan.render import RenderCache, render_attempt

        render = functools.partial(render_attempt, cache=RenderCache(), check=registry_check.check)
    tasks = []
    for item in claimed:
        run = RunDir.of(ws, item.run.run_id)
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


def _release(reg, ws: Path, claimed: List[PlanItem], exc: BaseException) -> None:
    """The submission never reached the scheduler: the runs go back to ``pending`` with the reason
    (never ``failed``: nothing ran), and the attempt directories rendered for them are removed, so
    they never count against the run's retry budget. The event log keeps what happened."""
    import shutil

    msg = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]
    for item in claimed:
        if item.attempt:
            adir = RunDir.of(ws, item.run.run_id).attempt(item.attempt)
            if adir.path.is_dir() and adir.outcome is None and adir.progress is None:
                shutil.rmtree(adir.path, ignore_errors=True)
        reg.update_run(item.run.run_id, state="pending", reason=f"not submitted: {msg}", event="not submitted",
                       claim_pid=None)


def _record_submitted(reg, claimed: List[PlanItem], ids: Dict[str, Dict[str, Any]], sid: str) -> None:
    from ssflctl.registry.store import now

    with reg.transaction():
        for item in claimed:
            got = ids[item.run.run_id]
            item.job_id, item.test_job_id = got["job_id"], got.get("test_job_id")
            reg.update_run(item.run.run_id, state="queued", reason="", event="submitted",
                           job_id=item.job_id, test_job_id=item.test_job_id, attempt=item.attempt,
                           submitted_at=now(), claim_pid=None)
            reg.upsert_attempt(item.run.run_id, item.attempt,
                               lr=item.lr if item.lr is not None else item.run.params.get("lr"), state="queued",
                               reason=item.reason or "first attempt", job_id=item.job_id,
                               submission_id=sid)
        reg.update_submission(sid, {"jobs": {i.run.run_id: [i.job_id, i.test_job_id] for i in claimed}})
