"""Submission overhead.

1. Slurm (when sbatch is on PATH): seconds to get N train jobs + N dependent test jobs queued —
   ssflctl (one train array + one `aftercorr` test array: 2 sbatch calls) vs the reference of one
   submitit job per sbatch (2N calls, each test with `afterok` on its train job). The jobs are
   cancelled at once. ratio = reference / ours.
2. Registry + reconcile: `ssflctl status` view of a workspace with N finished runs, against a
   budget of 2 s (ratio = budget / ours).

    python -m benchmarks.run submit [--quick]
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ssflctl.atomic import write_json

EXP = """\
name: bench
template: retinanet_tiny
datasets:
  d: {{root: {root}}}
matrix:
  loss: [focal, ssfl]
  seed: {seeds}
params: {{max_epochs: 1}}
resources: {{gpus: 0, cpus: 1, mem: 200M, time: "00:05:00"}}
executor:
  type: {kind}
  slurm: {{partition: gpulab02, qos: gpulab02}}
"""
NOOP = {"train": "os.path:exists", "test": "os.path:exists", "local": "os.path:exists"}


def _render(run_dir, attempt, *, lr=None, resume_from=None, reason="first attempt"):
    adir = Path(run_dir) / f"attempt-{attempt}"
    write_json(adir / "attempt.json", {"attempt": attempt, "lr": 0.01, "reason": reason,
                                       "rendered_at": datetime.now(timezone.utc).isoformat()})
    return adir


def _scancel(ids):
    ids = sorted({i.split("_")[0] for i in ids if i})
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def _slurm_rows(n: int, tmp: Path):
    from ssflctl.control import submit
    from ssflctl.backends import slurm as sl

    seeds = list(range(n // 2))
    path = tmp / "bench.yaml"
    path.write_text(EXP.format(root=tmp, seeds=seeds, kind="slurm"))
    t0 = time.perf_counter()
    res = submit.submit(path, tmp / "ws", fns=NOOP, render=_render)
    ours = time.perf_counter() - t0
    _scancel([p.job_id for p in res.submitted] + [p.test_job_id for p in res.submitted])

    ex = sl.make_executor(tmp / "ref", {"cpus": 1, "mem_gb": 0.2, "time_min": 5},
                          {"partition": "gpulab02", "qos": "gpulab02"})
    ids = []
    t0 = time.perf_counter()
    for _ in range(n):
        ex.update_parameters(dependency=None)
        j = ex.submit(sl.run_test, str(tmp), "os.path:exists")
        ex.update_parameters(dependency=f"afterok:{j.job_id}")
        k = ex.submit(sl.run_test, str(tmp), "os.path:exists")
        ids += [j.job_id, k.job_id]
    ref = time.perf_counter() - t0
    _scancel(ids)
    return [{"name": f"submit_slurm_{n}_runs", "value": round(ours, 3), "reference": round(ref, 3),
             "ratio": round(ref / ours, 2), "unit": "s",
             "note": f"ssflctl submit (validate, register, render, 2 sbatch) vs {2 * n} sbatch calls via submitit"}]


def _status_rows(n: int, tmp: Path):
    from ssflctl.commands.status import view
    from ssflctl.registry.store import Registry

    ws = tmp / "ws_status"
    now = datetime.now(timezone.utc).isoformat()
    with Registry(ws) as reg:
        reg.upsert_experiment("bench")
        with reg.transaction():
            for i in range(n):
                rid = f"run{i}-{i:08x}"
                reg.ensure_run(rid, "bench", f"run{i}", {"seed": i, "loss": "focal"})
                reg.update_run(rid, state="done", backend="local", job_id=f"local-1_{i}", attempt=1)
        for i in range(n):
            rid = f"run{i}-{i:08x}"
            adir = ws / "runs" / rid / "attempt-1"
            write_json(ws / "runs" / rid / "run.json", {"run_id": rid, "test": True})
            write_json(adir / "attempt.json", {"attempt": 1, "lr": 0.01, "reason": "first attempt", "rendered_at": now})
            write_json(adir / "outcome.json", {"outcome": "done", "finished_at": now})
            write_json(adir / "progress.json", {"epoch": 12, "max_epochs": 12, "iter": 100, "loss": 0.5})
            write_json(adir / "metrics.json", {"bbox": {"AP": 0.3}})
        view(reg, ws, "bench")  # first pass fills the attempts table
        t0 = time.perf_counter()
        items = view(reg, ws, "bench")
        dt = time.perf_counter() - t0
    assert len(items) == n and {i["state"] for i in items} == {"done"}
    budget = 2.0
    return [{"name": f"status_view_{n}_runs", "value": round(dt, 3), "reference": budget,
             "ratio": round(budget / dt, 2), "unit": "s", "note": "reconcile + table data for finished runs (budget 2 s)"}]


def run(quick: bool) -> list:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "d").mkdir()
        rows += _status_rows(50 if quick else 500, tmp)
        if shutil.which("sbatch"):
            try:
                rows += _slurm_rows(4 if quick else 16, tmp)
            except Exception as exc:  # the cluster may be down: report, do not crash the suite
                rows.append({"name": "submit_slurm", "value": None, "reference": None, "ratio": None, "unit": "s",
                             "note": f"skipped: {type(exc).__name__}: {exc}"[:200]})
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick=False), indent=2))
