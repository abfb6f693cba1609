"""`ssflctl report` over 1000 runs' metrics (issue 7: under 3 s here).

A synthetic workspace: 10 losses x 2 datasets (COCO with 80 per-class APs, Cityscapes with 8) x 50
seeds = 1000 run dirs, 5% of them retried after a NaN, 2% failed, a few running. Figures:
  1. `ssflctl report -w WS` end to end in a fresh process (interpreter, imports, markdown to stdout)
     against the 3 s target budget;
  2. collect + aggregate + render in process against a naive baseline measured in the same run:
     per run, json.load each file and build a pandas frame (pd.json_normalize), pd.concat, groupby.
  3. many configurations (issue 21 item 2): 5000 runs in 5000 configurations (each loss on one of
     the two datasets, one seed, every attempt with a training log; ``--quick``: 500), end to end
     in a fresh process: ``--out report.html`` (wall s, peak RSS MB (its VmHWM), HTML size) against
     15 s and 500 MB, ``--out index.md`` (with figures) and markdown to stdout against 5 s; the note
     splits one in-process run into collect+aggregate, render and figures. And in process, CPU: the
     per-class AP tables with the AP figure's columns against every configuration a column.
"""
from __future__ import annotations

import importlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 3.0
MANY_HTML_S, MANY_HTML_MB, MANY_MD_S = 15.0, 500.0, 5.0  # issue 21 item 2, 5000 configurations
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _train_log(ad: Path, nan_at=None) -> None:
    """A minimal mmengine text log (<timestamp>/<timestamp>.log) with 10 `Epoch(train)` loss lines."""
    ts = "20250101_120000"
    (ad / ts).mkdir()
    lines = []
    for i in range(1, 11):
        loss = "nan" if nan_at is not None and i * 10 >= nan_at else f"{2.0 / i:.4f}"
        lines.append(f"2025/01/01 12:00:{i:02d} - mmengine - INFO - Epoch(train) [1][{i * 10:>3}/100]  "
                     f"lr: 1.0000e-02  eta: 0:01:00  time: 0.1000  loss: {loss}  loss_cls: {loss}")
    (ad / ts / f"{ts}.log").write_text("\n".join(lines) + "\n")


def make_workspace(root: Path, n_losses=10, n_seeds=50, datasets=("cityscapes", "coco"), one_dataset=False,
                   logs=False) -> Path:
    """``one_dataset``: configuration i runs on datasets[i % len(datasets)] only (so every
    configuration lacks numbers on the other datasets); ``logs``: every attempt has a text log."""
    rng = random.Random(0)
    ws = root / "ws"
    classes = {"coco": [f"class{i}" for i in range(80)], "cityscapes": [f"c{i}" for i in range(8)]}
    k = 0
    for li in range(n_losses):
        loss = f"loss{li}"
        for ds in ([datasets[li % len(datasets)]] if one_dataset else datasets):
            for seed in range(n_seeds):
                k += 1
                rid = f"{loss}-{ds}-s{seed}-{k:08x}"
                rd = ws / "runs" / rid
                (rd / "attempt-1").mkdir(parents=True)
                (rd / "run.json").write_text(json.dumps({
                    "run_id": rid, "name": rid[:-9], "experiment": "bench",
                    "axes": {"loss": loss, "dataset": ds, "seed": seed, "lr": 0.01},
                    "retry": {"on_nan": "lower_lr", "factor": 0.1, "max_attempts": 3}}))
                kind = rng.random()
                attempts = [(1, 0.01)]
                if kind < 0.05:
                    attempts.append((2, 0.001))
                for n, lr in attempts:
                    ad = rd / f"attempt-{n}"
                    ad.mkdir(exist_ok=True)
                    (ad / "attempt.json").write_text(json.dumps({"run_id": rid, "attempt": n, "lr": lr}))
                    if logs:
                        _train_log(ad, nan_at=100 if n < len(attempts) else None)
                last = attempts[-1][0]
                if len(attempts) > 1:
                    (rd / "attempt-1" / "outcome.json").write_text(json.dumps(
                        {"outcome": "nan", "reason": "NaN in loss_cls at iter 100",
                         "nan": {"iter": 100, "loss_key": "loss_cls", "lr": 0.01}}))
                ad = rd / f"attempt-{last}"
                if 0.05 <= kind < 0.07:
                    (ad / "outcome.json").write_text(json.dumps({"outcome": "failed", "reason": "CUDA OOM"}))
                    continue
                if 0.07 <= kind < 0.08:
                    (ad / "progress.json").write_text(json.dumps({"epoch": 3, "max_epochs": 12}))
                    continue
                (ad / "outcome.json").write_text(json.dumps({"outcome": "done", "reason": "", "nan": None}))
                ap = 0.3 + 0.1 * li / n_losses + rng.uniform(-0.01, 0.01)
                (ad / "metrics.json").write_text(json.dumps({
                    "bbox": {m: ap * (1 + 0.1 * i) for i, m in enumerate(METRICS)},
                    "per_class": {c: ap + rng.uniform(-0.1, 0.1) for c in classes[ds]},
                    "num_images": 500, "num_detections": 10000, "evaluator": "pycocotools"}))
    return ws


def naive(ws: Path):
    """What one writes by hand: per run, read the files and build a DataFrame; concat; groupby."""
    import pandas as pd

    frames = []
    for rd in sorted((ws / "runs").iterdir()):
        rj = json.loads((rd / "run.json").read_text())
        for ad in sorted(rd.glob("attempt-*")):
            mp = ad / "metrics.json"
            if mp.exists():
                m = json.loads(mp.read_text())
                f = pd.json_normalize(m)
                for k, v in rj["axes"].items():
                    f[k] = v
                f["attempt"] = json.loads((ad / "attempt.json").read_text())["attempt"]
                frames.append(f)
    df = pd.concat(frames, ignore_index=True)
    cols = [c for c in df.columns if c.startswith("bbox.") or c.startswith("per_class.")]
    return df.groupby(["loss", "dataset"])[cols].agg(["mean", "std", "count"])


def _ours(ws: Path):
    from ssflctl.report import make_report, render

    rep = make_report(ws)
    return render(rep, "markdown")


def _best(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def _cli(ws: Path, *args) -> tuple:
    """(wall s, peak RSS MB, CPU s) of `ssflctl report -w ws ARGS` in a fresh process (peak: the
    process's own VmHWM, see benchmarks.childproc)."""
    from benchmarks import childproc

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = childproc.run("-m", "ssflctl.cli", ["report", "-w", str(ws), *map(str, args)], env=env)
    if r["rc"] != 0:
        raise RuntimeError(f"ssflctl report {' '.join(map(str, args))}: exit {r['rc']}")
    return r["wall_s"], r["peak_mb"], r["cpu_s"]


def _breakdown(ws: Path) -> str:
    """One in-process run split into its parts (seconds), as the command runs them (the collector
    paused while the records are read, the figures in forked workers)."""
    from ssflctl import gcpause
    from ssflctl.report import make_report, plots, render

    t0 = time.perf_counter()
    with gcpause.paused():
        rep = make_report(ws)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-report-figs-") as tmp:
        images = plots.draw(rep, tmp)
        t2 = time.perf_counter()
        page = render(rep, "html", images)
    t3 = time.perf_counter()
    md = render(rep, "markdown")
    t4 = time.perf_counter()
    return (f"in process: collect+aggregate {t1 - t0:.1f} s, {len(images)} figures {t2 - t1:.1f} s, html render "
            f"{t3 - t2:.1f} s ({len(page) / 1e6:.1f} MB), markdown render {t4 - t3:.1f} s ({len(md) / 1e6:.1f} MB)")


def _per_class_cpu(ws: Path) -> tuple:
    """(CPU s, markdown MB) of the per-class AP tables as the report builds them (the AP figure's
    columns beyond TOP_N + MAX_BASELINES configurations) and, the reference, with every
    configuration a column (the report before issue 21.2's cap), in this process."""
    from ssflctl.report import aggregate, collect, writers

    records = collect.collect(ws, [], [])
    ctx = aggregate._prepare(records, None, [], "loss=focal", None)
    rep = aggregate.build(records)
    out = []
    for columns in (aggregate.per_class_columns(ctx, rep), None):
        t0 = time.process_time()
        tables = aggregate._per_class_tables(ctx, columns)
        md = "\n".join(writers.md_table(t) for t in tables)
        out += [time.process_time() - t0, len(md) / 1e6]
    return tuple(out)


def run_many(quick: bool = False) -> list[dict]:
    n = 500 if quick else 5000
    with tempfile.TemporaryDirectory(prefix="bench-report-many-") as tmp:
        ws = make_workspace(Path(tmp), n_losses=n, n_seeds=1, one_dataset=True, logs=True)
        html_s, html_mb, html_cpu = _cli(ws, "--out", Path(tmp) / "html" / "report.html")
        html_size = (Path(tmp) / "html" / "report.html").stat().st_size / 1e6
        md_s, md_mb, md_cpu = _cli(ws, "--out", Path(tmp) / "md" / "index.md")
        n_png = len(list((Path(tmp) / "md").glob("*.png")))
        stdout_s, _, stdout_cpu = _cli(ws)
        parts = _breakdown(ws)
        pc_cpu, pc_mb, every_cpu, every_mb = _per_class_cpu(ws)
    load = os.getloadavg()[0]
    size = f"{n} runs in {n} configurations"
    return [
        {"name": f"report --out report.html, {size}", "value": html_s, "reference": MANY_HTML_S,
         "ratio": MANY_HTML_S / html_s, "unit": "s",
         "note": f"fresh process, CPU {html_cpu:.1f} s; {html_size:.1f} MB of HTML; {parts}; load average {load:.1f} on "
                 f"{os.cpu_count()} cores; target <= {MANY_HTML_S:g} s"},
        {"name": f"report --out report.html peak RSS, {size}", "value": html_mb, "reference": MANY_HTML_MB,
         "ratio": MANY_HTML_MB / html_mb, "unit": "MB", "note": f"the process's own VmHWM (benchmarks.childproc); target <= {MANY_HTML_MB:g} MB"},
        {"name": f"report --out index.md (figures), {size}", "value": md_s, "reference": MANY_MD_S,
         "ratio": MANY_MD_S / md_s, "unit": "s",
         "note": f"fresh process, CPU {md_cpu:.1f} s, {n_png} PNG files, peak RSS {md_mb:.0f} MB; load average "
                 f"{load:.1f}; target <= {MANY_MD_S:g} s"},
        {"name": f"per-class AP tables, {size} (CPU)", "value": pc_cpu, "reference": every_cpu,
         "ratio": every_cpu / pc_cpu, "unit": "s",
         "note": f"in process, build + markdown of the tables: the AP figure's columns ({pc_mb:.2f} MB) against "
                 f"every configuration a column ({every_mb:.1f} MB), measured here"},
        {"name": f"report markdown to stdout, {size}", "value": stdout_s, "reference": MANY_MD_S,
         "ratio": MANY_MD_S / stdout_s, "unit": "s", "note": f"fresh process, CPU {stdout_cpu:.1f} s, no figures; target <= {MANY_MD_S:g} s"},
    ]


def run(quick: bool = False) -> list[dict]:
    n = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        ws = make_workspace(Path(tmp), n_seeds=10 if quick else 50)
        n_runs = len(os.listdir(ws / "runs"))
        importlib.import_module("pandas")  # keep the import cost out of the in-process comparison

        _ours(ws)  # warm the page cache and imports
        _, ours_med = _best(lambda: _ours(ws), n)
        _, naive_med = _best(lambda: naive(ws), n)
        cli, cpu = [], []
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        for _ in range(n):
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "ssflctl.cli", "report", "-w", str(ws)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            cli.append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        cli_med = statistics.median(cli)
        cpu_med = statistics.median(cpu)
        load = os.getloadavg()[0]
    return [
        {"name": f"ssflctl report, {n_runs} runs, end to end (median)", "value": cli_med, "reference": TARGET_S,
         "ratio": TARGET_S / cli_med, "unit": "s",
         "note": f"fresh process, markdown to stdout; CPU time {cpu_med:.2f} s; load average {load:.1f} "
                 f"on {os.cpu_count()} cores; target < {TARGET_S} s"},
        {"name": f"report collect+aggregate+render, {n_runs} runs (median)", "value": ours_med,
         "reference": naive_med, "ratio": naive_med / ours_med, "unit": "s",
         "note": "reference: naive per-file json + pd.json_normalize + concat + groupby (no tables, no gaps)"},
    ] + run_many(quick)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    for row in (run_many(quick) if "--many" in sys.argv else run(quick)):
        print(f"{row['name']}: {row['value']:.3f} {row['unit']} (reference {row['reference']:.3f}, "
              f"ratio {row['ratio']:.2f}) — {row['note']}")
