"""`ssflctl logs RUN`: the attempt's mmengine log (or the job's output before it exists)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from ssflctl.errors import UserError
from ssflctl.workdir import runref
from ssflctl.workdir.layout import RunDir



def find_logs(ws, run_id: str, attempt: Optional[int] = None, rank: int = 0) -> List[Path]:
    """The mmengine text logs of the run's attempt (latest by default), oldest first: the training
    log, then the test step's; ``rank`` K > 0: rank K's logs of a multi-GPU run. Raises UserError
    if the run has no attempt (or not that one)."""
    run = RunDir.of(ws, run_id)
    dirs = run.attempts()
    if not dirs:
        raise UserError(f"logs: run {run_id} has no attempts yet (nothing rendered in {run.path})")
    if attempt is not None:
        dirs = [d for d in dirs if d.n == attempt]
        if not dirs:
            raise UserError(f"logs: run {run_id} has no attempt {attempt}")
    return dirs[-1].rank_logs(rank) if rank else dirs[-1].text_logs()


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


def main(workspace, run: str, follow: bool = False, attempt: Optional[int] = None, rank: int = 0) -> List[Path]:
    from ssflctl.commands.status import open_registry

    reg = open_registry(workspace)
    try:
        run_id = runref.resolve(workspace, run, "logs").name
        row = reg.get_run(run_id)
        if row is None:
            raise UserError(f"logs: run {run_id} is not in this workspace's registry; see `ssflctl status`")
        paths = find_logs(workspace, row["run_id"], attempt, rank)
        procs = _processes(json.loads(row["resources"] or "{}"))
        if rank >= procs:
            raise UserError(f"logs: run {row['run_id']} runs {procs} process{'es' if procs > 1 else ''} "
                            f"(ranks 0-{procs - 1}); there is no rank {rank}")
        if not paths and rank == 0:
            alt = _job_output(reg, row)
            if alt is not None and alt.exists():
                paths = [alt]
    finally:
        reg.close()
    if not paths and not follow:
        raise UserError(f"logs: no training log yet for {row['run_id']}"
                        + (f" rank {rank}" if rank else "") + "; the job may still be queued — try `ssflctl logs -f`")
    out = sys.stdout
    pos: Dict[Path, int] = {}
    current: Optional[Path] = None
    while True:
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
        time.sleep(1.0)
        try:  # new logs appear: the test step's, or a retry's new attempt
            fresh = find_logs(workspace, row["run_id"], attempt, rank)
        except UserError:
            fresh = []
        paths = fresh or paths
