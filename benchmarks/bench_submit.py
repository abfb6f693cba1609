"""Submission overhead, on the real path (issues 15.5 and 21.5).

1. Rendering one run: ssflctl's renderer (the template parsed once per submission, the config
   written without yapf and checked as always) against per-run rendering as it was — the template's
   ``Config.fromfile`` for every run, ``Config.dump`` (yapf), ``check_rendered`` — in the same
   process. ratio = reference s/run / ours s/run (target >= 10).
2. ``ssflctl submit --dry-run`` of N runs (a fresh CLI process: imports, YAML, plan, every config
   rendered in memory and checked against mmdet's registries) against per-run rendering of the
   same N runs (1.'s reference per run x N: the rendering alone, nothing else counted).
3. ``ssflctl submit`` of N runs to the local Slurm cluster (a fresh CLI process, YAML to the last
   sbatch: plan, registry, N attempts rendered and written, the train and test arrays) against plain
   per-run ``sbatch`` of the same scripts: for each run ``sbatch --array=i <train script>`` then
   ``sbatch --array=i --dependency=afterok:<train job> <test script>`` (2N calls, no submitit and
   its fixed 0.2 s pause). At N = 2000 the reference is timed on 200 runs and scaled x10 (4000 more
   jobs in slurmctld for 10 minutes is more than a shared test cluster should take). All jobs start
   an hour later (``--begin``) and are cancelled at once with ``scancel``.

The experiment: retinanet_tiny on two datasets x N/2 seeds; the two datasets ask for different
memory, so the runs go out as two arrays of N/2 (the cluster's MaxArraySize is 1001; splitting one
resource group into several arrays is issue 15.4).

    python -m benchmarks.run submit [--quick]        # --quick: 10 runs only, no Slurm at 2000
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ssflctl.atomic import write_json

REPO = Path(__file__).resolve().parents[1]
EXP = """\
name: bench{n}
template: retinanet_tiny
datasets:
  a: {{root: {root}, resources: {{mem: 200M}}}}
  b: {{root: {root}, resources: {{mem: 300M}}}}
matrix:
  dataset: [a, b]
  seed: {seeds}
params: {{max_epochs: 1, loss: ssfl}}
overrides:
  optim_wrapper: {{clip_grad: {{max_norm: 35}}}}
resources: {{gpus: 0, cpus: 1, mem: 200M, time: "00:05:00"}}
executor:
  type: slurm
  slurm: {{partition: gpulab02, qos: gpulab02, sbatch: {{begin: now+1hour}}}}
"""
REF_SAMPLE = 200


def _experiment(tmp: Path, n: int) -> Path:
    from ssflctl.convert import synth_coco

    root = tmp / "data"
    if not (root / "annotations").is_dir():
        synth_coco.generate(root, n_train=2, n_val=1, size=(64, 64), seed=1)
    path = tmp / f"bench{n}.yaml"
    path.write_text(EXP.format(n=n, root=root, seeds=list(range(n // 2))))
    return path


def _cli(args, cwd: Path) -> float:
    """Seconds of one ``ssflctl`` process (this checkout's code)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", "from ssflctl.cli import main; main()", *args], cwd=cwd, env=env,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"ssflctl {' '.join(args)}: rc {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}")
    return dt


def _scancel(ids) -> None:
    ids = sorted({str(i).split("_")[0] for i in ids if i})
    for k in range(0, len(ids), 500):
        subprocess.run(["scancel", *ids[k:k + 500]], capture_output=True)


def _slurm_jobs() -> int:
    """Job records slurmctld holds (array tasks each count against MaxJobCount; finished and
    cancelled ones stay for MinJobAge)."""
    p = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i"], capture_output=True, text=True)
    return len(p.stdout.split())


def _per_run_render(tmp: Path, k: int):
    """(reference s/run, ours s/run): per-run Config.fromfile + yapf dump vs the submission's cache."""
    from ssflctl.plan import config_check, registry_check, render

    root = str(tmp / "data") + "/"
    runs = [({"data_root": root, "seed": i, "max_epochs": 1, "loss": "ssfl"},
             {"optim_wrapper": {"clip_grad": {"max_norm": 35}}}) for i in range(max(k, 1))]
    out = tmp / "render"
    out.mkdir(exist_ok=True)
    render.render_config("retinanet_tiny", *runs[0])  # imports (torch, mmdet) outside both timings
    t0 = time.perf_counter()
    for i, (p, o) in enumerate(runs[:k]):
        cfg = render.render_config("retinanet_tiny", p, o)
        cfg.dump(str(out / f"ref{i}.py"))
        config_check.check_rendered(out / f"ref{i}.py", cfg.to_dict())
    ref = (time.perf_counter() - t0) / k
    cache = render.RenderCache()
    m = 20 * k
    t0 = time.perf_counter()
    for i in range(m):
        p, o = runs[i % len(runs)]
        cfg = render.render_config("retinanet_tiny", dict(p, seed=i), o, cache=cache)
        registry_check.check(cfg)
        meant = cfg.to_dict()
        text = render.config_text(cfg, meant)
        config_check.check_text(text, meant, out / f"ours{i}.py")
        (out / f"ours{i}.py").write_text(text)
    ours = (time.perf_counter() - t0) / m
    return ref, ours


def _reference_sbatch(ws: Path, n: int) -> float:
    """Seconds for 2n plain sbatch calls of the submission's own scripts (one train + one test per run)."""
    scripts = sorted(ws.glob("submissions/*/group*/*/*_submission.sh"))
    train = [s for s in scripts if s.parent.name == "train"][0]
    test = [s for s in scripts if s.parent.name == "test"][0]
    ids = []
    t0 = time.perf_counter()
    try:
        for i in range(n):
            j = subprocess.run(["sbatch", "--parsable", f"--array={i}", str(train)],
                               capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
            ids.append(j)
            k = subprocess.run(["sbatch", "--parsable", f"--array={i}", f"--dependency=afterok:{j}_{i}",
                                str(test)], capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
            ids.append(k)
        return time.perf_counter() - t0
    finally:
        _scancel(ids)


def _submitted_ids(ws: Path, exp: str):
    from ssflctl.registry.store import Registry

    with Registry.for_reading(ws) as reg:
        rows = reg.run_rows(exp)
    return [r["job_id"] for r in rows] + [r["test_job_id"] for r in rows]


def _submit_rows(n: int, tmp: Path, per_run_ref: float, slurm: bool):
    rows = []
    path = _experiment(tmp, n)
    dry = _cli(["submit", str(path), "--dry-run", "--workspace", str(tmp / f"ws_dry{n}")], tmp)
    ref = per_run_ref * n
    rows.append({"name": f"submit_dry_run_{n}_runs", "value": round(dry, 2), "reference": round(ref, 2),
                 "ratio": round(ref / dry, 2), "unit": "s",
                 "note": f"ssflctl submit --dry-run (fresh process, {n} configs rendered + checked) vs "
                         f"{n} x per-run Config.fromfile + yapf dump"})
    if not slurm:
        return rows
    ws = tmp / f"ws{n}"
    try:
        ours = _cli(["submit", str(path), "--workspace", str(ws)], tmp)
    finally:
        if (ws / "registry.sqlite").exists():
            _scancel(_submitted_ids(ws, f"bench{n}"))
    m = min(n, REF_SAMPLE) if n > REF_SAMPLE else n
    ref = _reference_sbatch(ws, m) * (n / m)
    scaled = f", timed on {m} runs x{n // m}" if m < n else ""
    rows.append({"name": f"submit_slurm_{n}_runs", "value": round(ours, 2), "reference": round(ref, 2),
                 "ratio": round(ref / ours, 2), "unit": "s",
                 "note": f"ssflctl submit, YAML to last sbatch (fresh process, {n} configs rendered) vs "
                         f"{2 * n} plain sbatch calls of the same scripts{scaled}"})
    return rows


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
        _experiment(tmp, 2)
        ref, ours = _per_run_render(tmp, 2 if quick else 5)
        rows.append({"name": "render_per_run", "value": round(ours, 4), "reference": round(ref, 3),
                     "ratio": round(ref / ours, 1), "unit": "s/run",
                     "note": "submission's renderer (cached template, no yapf, registry + text checks) vs "
                             "per-run Config.fromfile + Config.dump + check_rendered"})
        slurm = bool(shutil.which("sbatch"))
        for n in ([10] if quick else [10, 100, 2000]):
            # leave room for the cluster's other users (MaxJobCount 10000 here)
            big = slurm and _slurm_jobs() + 2 * n + 2 * min(n, REF_SAMPLE) > 7000
            try:
                rows += _submit_rows(n, tmp, ref, slurm and not big)
                if big:
                    rows.append({"name": f"submit_slurm_{n}_runs", "value": None, "reference": None, "ratio": None,
                                 "unit": "s", "note": f"skipped: slurmctld holds {_slurm_jobs()} job records; "
                                                      "run again in 10 minutes (MinJobAge)"})
            except Exception as exc:  # the cluster may be down: report, do not crash the suite
                rows.append({"name": f"submit_{n}_runs", "value": None, "reference": None, "ratio": None,
                             "unit": "s", "note": f"skipped: {type(exc).__name__}: {exc}"[:300]})
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick=False), indent=2))
