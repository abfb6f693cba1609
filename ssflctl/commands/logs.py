"""`ssflctl logs RUN`: the attempt's mmengine log (or the job's output before it exists);
`ssflctl logs RUN --test TEST`: a test cell's (test_matrix) log, the same way."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from ssflctl.errors import UserError
from ssflctl.workdir import runref
from ssflctl.workdir.layout import RunDir
from ssflctl.workdir.records import ACTIVE

#: at most this many test ids are listed in the error for an unknown one
LIST_TESTS = 12


def find_logs(ws, run_id: str, attempt: Optional[int] = None, rank: int = 0) -> List[Path]:
    """The mmengine text logs of the run's attempt (latest by default), oldest first: the training
    log, then the test step's; ``rank`` K > 0: rank K's logs of a multi-GPU run. Raises UserError
    if the run has no attempt (or not that one)."""
    run = RunDir.of(ws, run_id)
    if not run.attempts():
        raise UserError(f"logs: run {run_id} has no attempts yet (nothing rendered in {run.path})")
    dirs = _attempt_dirs(ws, run_id, attempt)
    return dirs[-1].rank_logs(rank) if rank else dirs[-1].text_logs()


def _attempt_dirs(ws, run_id: str, attempt: Optional[int]):
    run = RunDir.of(ws, run_id)
    dirs = run.attempts()
    if attempt is not None:
        dirs = [d for d in dirs if d.n == attempt]
        if not dirs:
            raise UserError(f"logs: run {run_id} has no attempt {attempt}")
    return dirs


def find_test_logs(ws, run_id: str, test_id: str, attempt: Optional[int] = None) -> List[Path]:
    """The mmengine text logs of test cell ``test_id`` of the run, oldest first: on ``attempt``, or
    on the newest attempt that has them (the one the cell tested). Empty when none exists yet."""
    for a in reversed(_attempt_dirs(ws, run_id, attempt)):
        logs = a.test(test_id).text_logs()
        if logs:
            return logs
    return []


def resolve_test(reg, ws, run_id: str, ref: str) -> str:
    """The test id of the run's test cell ``ref`` (its id, its name, or a unique prefix of its id).
    UserError naming it, with the run's test cells, when it is not one of them."""
    rows = reg.test_rows(run_id=run_id)
    names = {r["test_id"]: r["name"] for r in rows}
    known = list(dict.fromkeys([r["test_id"] for r in rows] + list(RunDir.of(ws, run_id).test_cells())))
    if not known:
        raise UserError(f"logs: run {run_id} has no test cells (its experiment has no test_matrix); "
                        "drop --test for its training log")
    if ref in known:
        return ref
    cands = [t for t in known if names.get(t) == ref] or [t for t in known if t.startswith(ref)]
    if len(cands) == 1:
        return cands[0]
    if cands:
        raise UserError(f"logs: --test {ref!r} matches {len(cands)} test cells of run {run_id} "
                        f"({', '.join(cands[:LIST_TESTS])}); give the full test id")
    more = f" and {len(known) - LIST_TESTS} more (see `ssflctl status`)" if len(known) > LIST_TESTS else ""
    raise UserError(f"logs: run {run_id} has no test cell {ref!r}; its test cells are "
                    f"{', '.join(known[:LIST_TESTS])}{more}")


def _processes(res) -> int:
    """The run's processes: nodes × gpus (one on a CPU)."""
    return int(res.get("nodes", 1) or 1) * max(1, int(res.get("gpus", 0) or 0))


def _job_output(reg, row) -> Optional[Path]:
    """The scheduler's stdout/stderr file for the run's train job, when the mmengine log is absent."""
    from ssflctl import backends
    from ssflctl.control.reconcile import job_refs

    if not row["backend"] or not row["job_id"]:
        return None
    refs = job_refs(reg, row)
    return backends.get(row["backend"]).job_output(refs[0]) if refs else None


def _test_job_output(reg, row) -> Optional[Path]:
    """The scheduler's stdout/stderr file for a test cell's job, when its mmengine log is absent."""
    from ssflctl import backends
    from ssflctl.control.testcells import job_ref

    ref = job_ref(reg, row) if row is not None and row["backend"] else None
    return backends.get(row["backend"]).job_output(ref) if ref is not None else None


def main(workspace, run: str, follow: bool = False, attempt: Optional[int] = None, rank: int = 0,
         test: Optional[str] = None) -> List[Path]:
    from ssflctl.commands.status import open_registry

    reg = open_registry(workspace)
    try:
        run_id = runref.resolve(workspace, run, "logs").name
        row = reg.get_run(run_id)
        if row is None:
            raise UserError(f"logs: run {run_id} is not in this workspace's registry; see `ssflctl status`")
        if test is not None:  # a test cell's job (test_matrix): one process, its own log
            if rank:
                raise UserError(f"logs: a test cell runs on one process; drop --rank {rank} with --test")
            test_id = resolve_test(reg, workspace, run_id, test)
            paths = find_test_logs(workspace, run_id, test_id, attempt)
            if not paths:
                alt = _test_job_output(reg, reg.get_test(test_id))
                if alt is not None and alt.exists():
                    paths = [alt]
            refind = lambda: find_test_logs(workspace, run_id, test_id, attempt)  # noqa: E731
            missing = (f"logs: no log yet for test {test_id} of run {run_id}; its job may still be queued (a test "
                       f"waits for its training) — try `ssflctl logs {run} --test {test_id} -f`")
        else:
            paths = find_logs(workspace, run_id, attempt, rank)
            procs = _processes(json.loads(row["resources"] or "{}"))
            if rank >= procs:
                raise UserError(f"logs: run {run_id} runs {procs} process{'es' if procs > 1 else ''} "
                                f"(ranks 0-{procs - 1}); there is no rank {rank}")
            if not paths and rank == 0:
                alt = _job_output(reg, row)
                if alt is not None and alt.exists():
                    paths = [alt]
            refind = lambda: find_logs(workspace, run_id, attempt, rank)  # noqa: E731
            missing = (f"logs: no training log yet for {run_id}" + (f" rank {rank}" if rank else "")
                       + "; the job may still be queued — try `ssflctl logs -f`")
    finally:
        reg.close()
    what = f"test {test_id} of run {run_id}" if test is not None else f"run {run_id}"
    return _print(paths, follow, refind, missing,
                  ended=lambda: ended_state(workspace, run_id, test_id if test is not None else None), what=what)


#: the states a followed log keeps waiting in (control.state's rule: a job may still write)
FOLLOW_STATES = tuple(s.value for s in ACTIVE)
#: seconds between asking whether a followed run has ended (the scheduler is asked each time)
STATE_CHECK_S = 5.0


def ended_state(ws, run_id: str, test_id: Optional[str] = None) -> Optional[str]:
    """The run's state (or its test cell's) when it has ended (anything but submitting, queued or
    running by :func:`ssflctl.control.state.decide`, the scheduler asked as ``status`` does),
    else None: ``logs -f`` stops following then."""
    from ssflctl.control.reconcile import run_verdict
    from ssflctl.registry.store import Registry

    reg = Registry.for_reading(ws)
    try:
        verdict = run_verdict(reg, ws, run_id)
        if verdict is not None and test_id is not None:
            from ssflctl.control.testcells import live_cell_verdict

            verdict = live_cell_verdict(reg, ws, test_id, verdict)
    finally:
        reg.close()
    if verdict is None or verdict.state.value in FOLLOW_STATES:
        return None
    return verdict.state.value


def _print(paths: List[Path], follow: bool, refind, missing: str, ended=None, what: str = "the run") -> List[Path]:
    """Print the logs (``follow``: as they grow, new ones found by ``refind``, until ``ended()``
    names the state the run ended in: what is left is printed, then it returns); UserError
    ``missing`` when there is none and nothing to wait for."""
    if not paths and not follow:
        raise UserError(missing)
    out = sys.stdout
    pos: Dict[Path, int] = {}
    current: Optional[Path] = None
    next_check = 0.0
    while True:
        over = None
        if follow and ended is not None and time.monotonic() >= next_check:
            over = ended()  # asked before the last read: whatever the job wrote before it ended is printed
            next_check = time.monotonic() + STATE_CHECK_S
            if over:
                try:
                    paths = refind() or paths
                except UserError:
                    pass
        for path in paths:
            try:
                with open(path, "r", encoding="utf-8", errors="replace") as fh:
                    fh.seek(pos.get(path, 0))
                    chunk = fh.read()
                    pos[path] = fh.tell()
            except OSError:
                continue
            if chunk:
                if current is not None and current != path:
                    out.write(f"==> {path} <==\n")
                current = path
                out.write(chunk)
                out.flush()
        if not follow:
            return paths
        if over:
            if not paths:
                sys.stderr.write(missing.split(";")[0] + "\n")
            sys.stderr.write(f"logs: {what} is {over}; stopped following\n")
            return paths
        time.sleep(1.0)
        try:  # new logs appear: the test step's, or a retry's new attempt
            fresh = refind()
        except UserError:
            fresh = []
        paths = fresh or paths
