"""`ssflctl status` over 5000 runs (issue 21 item 3: at most 2 s in a terminal).

A synthetic workspace of ``n`` runs in 10 experiments on the local backend (a live stand-in runner
process, a task file per run), settled by one reconcile first (the steady state a user watches):
about 75% done, 8% running, 7% queued, 1% whose job the scheduler has no record of (unknown), 3%
failed with a log tail, 5% retried after a NaN (attempt 2 done or running), 1% cancelled. Figures, each a
fresh process of `ssflctl status -w WS`:
  1. in a terminal (a pseudo-terminal from ``script -qc``, 120 columns): the grouped view against
     the 2 s target;
  2. ``--all`` in the same terminal (every row);
  3. piped (tab-separated, every row) against the 2 s target;
and in process: rendering CPU against a rich Table of every row (the terminal view before), and a
second `view` after the first (what ``--watch`` redraws from) against the first,
with nothing changed (the run-dir cache: unchanged attempt dirs are not re-read).
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 2.0
RUNNER_MODULE = "ssflctl.backends.local"


def _w(path: Path, body) -> None:
    path.write_text(json.dumps(body))


def make_workspace(root: Path, n: int = 5000, n_exp: int = 10, seed: int = 0) -> Path:
    """A workspace of ``n`` runs (see the module docstring); returns its path. The runner's pid in
    each submission's runner.json is 0 (dead) until :func:`start_runner` writes a live one."""
    from ssflctl.registry.store import Registry

    rng = random.Random(seed)
    ws = root / "ws"
    ws.mkdir(parents=True)
    per = n // n_exp
    t0 = "2025-01-01T12:00:00+00:00"
    with Registry(ws) as reg, reg.transaction() as c:
        for e in range(n_exp):
            exp = f"exp{e:02d}"
            reg.upsert_experiment(exp, f"/x/{exp}.yaml")
            sub = ws / "submissions" / exp
            (sub / "tasks").mkdir(parents=True)
            _w(sub / "runner.json", {"pid": 0, "cmd": RUNNER_MODULE})
            c.execute("INSERT INTO submissions(id, experiment, backend, folder, pid, host, n_runs, info, created_at) "
                      "VALUES (?,?,?,?,?,?,?,?,?)", (exp, exp, "local", str(sub), 0, "h", per, "{}", t0))
            for i in range(per):
                loss, ds, seed_ = f"loss{i % 25}", ("coco", "cityscapes")[i // 25 % 2], i // 50
                rid = f"{exp}-{loss}-{ds}-s{seed_}-{i:08x}"
                rd = ws / "runs" / rid
                axes = {"loss": loss, "dataset": ds, "seed": seed_, "lr": 0.01}
                rd.mkdir(parents=True)
                _w(rd / "run.json", {"run_id": rid, "name": rid[:-9], "experiment": exp, "axes": axes,
                                     "retry": {"on_nan": "lower_lr", "factor": 0.1, "max_attempts": 3}, "test": True})
                k = rng.random()
                kind = ("done" if k < 0.75 else "running" if k < 0.83 else "queued" if k < 0.90 else
                        "lost" if k < 0.91 else "failed" if k < 0.94 else "retry_done" if k < 0.965 else
                        "retry_running" if k < 0.99 else "cancelled")
                n_att = 2 if kind.startswith("retry") else 1
                for a in range(1, n_att + 1):
                    if kind in ("queued", "lost") and a == 1:
                        break
                    ad = rd / f"attempt-{a}"
                    ad.mkdir()
                    lr = 0.01 * 0.1 ** (a - 1)
                    _w(ad / "attempt.json", {"run_id": rid, "attempt": a, "lr": lr, "rendered_at": t0,
                                             "reason": "first attempt" if a == 1 else
                                             "after NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)"})
                    if a < n_att:
                        _w(ad / "outcome.json", {"outcome": "nan", "reason": "NaN in loss_cls at iter 1234",
                                                 "finished_at": t0, "nan": {"iter": 1234, "loss_key": "loss_cls",
                                                                            "lr": lr}})
                        continue
                    if kind in ("done", "retry_done"):
                        _w(ad / "outcome.json", {"outcome": "done", "finished_at": "2025-01-01T14:00:00+00:00"})
                        _w(ad / "metrics.json", {"bbox": {"AP": 0.3}, "per_class": {}})
                    elif kind == "failed":
                        _w(ad / "outcome.json", {"outcome": "failed", "reason": "RuntimeError: shapes do not match",
                                                 "finished_at": t0, "log_tail": "Traceback...\nRuntimeError: shapes\n"})
                    elif kind in ("running", "retry_running"):
                        _w(ad / "progress.json", {"epoch": 3, "max_epochs": 12, "iter": 1500, "max_iters": 5000,
                                                  "loss": 0.75, "updated_at": t0})
                task = {"done": "done", "retry_done": "done", "failed": "failed", "cancelled": "cancelled",
                        "running": "running", "retry_running": "running"}.get(kind, "pending")
                _w(sub / "tasks" / f"{i}.json", {"state": task, "returncode": 1 if task == "failed" else 0})
                c.execute("INSERT INTO runs(run_id, experiment, name, axes, resources, state, reason, backend, "
                          "job_id, submission_id, attempt, submitted_at, created_at, updated_at) "
                          "VALUES (?,?,?,?,'{}','queued','','local',?,?,?,?,?,?)",
                          (rid, exp, rid[:-9], json.dumps(axes, sort_keys=True),
                           f"local-{1000 + e}_{i}", exp, n_att, t0, t0, t0))
                if kind == "lost":  # no task file: the scheduler has no record of the job (unknown)
                    (sub / "tasks" / f"{i}.json").unlink()
    return ws


def start_runner(ws: Path) -> subprocess.Popen:
    """A live process standing in for every submission's local runner (its command line names the
    runner module), written into each runner.json; the caller terminates it."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", RUNNER_MODULE])
    for sub in (ws / "submissions").iterdir():
        _w(sub / "runner.json", {"pid": p.pid, "cmd": RUNNER_MODULE})
    return p


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), COLUMNS="120", LINES="40",
                TERM="xterm-256color")


def _cli(ws: Path, *args, terminal: bool = False) -> tuple:
    """(wall s, CPU s, stdout bytes) of `ssflctl status -w WS ARGS` in a fresh process; ``terminal``:
    under ``script -qc`` (a pseudo-terminal; stdout is then what the terminal received)."""
    cmd = [sys.executable, "-m", "ssflctl.cli", "status", "-w", str(ws), *map(str, args)]
    if terminal:
        cmd = ["script", "-qec", " ".join(cmd), "/dev/null"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"ssflctl status {' '.join(map(str, args))}: exit {p.returncode}")
    return wall, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, len(p.stdout)


def _median(ws, *args, n=3, terminal=False) -> tuple:
    got = [_cli(ws, *args, terminal=terminal) for _ in range(n)]
    return tuple(statistics.median(g[i] for g in got) for i in range(3))


def _view_twice(ws: Path) -> tuple:
    """(first view s, second view s) in one process: what --watch redraws from."""
    from ssflctl.commands.status import view
    from ssflctl.registry.store import Registry
    from ssflctl.workdir.layout import RunDirCache

    with Registry(ws) as reg:
        cache = RunDirCache()
        t0 = time.perf_counter()
        view(reg, ws, cache=cache)
        t1 = time.perf_counter()
        view(reg, ws, cache=cache)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _render_cpu(ws: Path) -> tuple:
    """CPU s of rendering one view of ``ws`` into a terminal (rich Console with force_terminal into
    a StringIO, 120 columns): the grouped view, --all, and the reference measured here: a rich
    Table of every row (what a terminal got before)."""
    import io

    from rich.console import Console

    from ssflctl.commands.status import HEADERS, STATE_STYLE, _rows, terminal_view, view
    from ssflctl.commands.table import rich_table
    from ssflctl.registry.store import Registry

    with Registry(ws) as reg:
        items = view(reg, ws)
    out = []
    for make in (lambda: terminal_view("t", items), lambda: terminal_view("t", items, show_all=True),
                 lambda: rich_table("t", HEADERS, _rows(items), [STATE_STYLE.get(i["state"]) for i in items])):
        console = Console(force_terminal=True, width=120, file=io.StringIO(), color_system="truecolor")
        t0 = time.process_time()
        console.print(make())
        out.append(time.process_time() - t0)
    return tuple(out)


def run(quick: bool = False) -> list[dict]:
    n = 500 if quick else 5000
    reps = 1 if quick else 3
    if not shutil.which("script"):
        raise RuntimeError("`script` (util-linux) is needed for the pseudo-terminal")
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        ws = make_workspace(Path(tmp), n)
        runner = start_runner(ws)
        try:
            _cli(ws)  # settle the registry once (the first reconcile writes every state)
            term_s, term_cpu, term_b = _median(ws, n=reps, terminal=True)
            all_s, all_cpu, all_b = _median(ws, "--all", n=reps, terminal=True)
            pipe_s, pipe_cpu, pipe_b = _median(ws, n=reps)
            first, again = _view_twice(ws)
            grouped_cpu, all_cpu_r, table_cpu = _render_cpu(ws)
        finally:
            runner.terminate()
            runner.wait()
    load = os.getloadavg()[0]
    where = f"load average {load:.1f} on {os.cpu_count()} cores"
    return [
        {"name": f"status in a terminal, {n} runs (median)", "value": term_s, "reference": TARGET_S,
         "ratio": TARGET_S / term_s, "unit": "s",
         "note": f"fresh process under `script -qc` (pty, 120 columns); CPU {term_cpu:.2f} s; "
                 f"{term_b / 1e3:.0f} kB to the terminal; {where}; target <= {TARGET_S:g} s"},
        {"name": f"status --all in a terminal, {n} runs (median)", "value": all_s, "reference": TARGET_S,
         "ratio": TARGET_S / all_s, "unit": "s",
         "note": f"every row; CPU {all_cpu:.2f} s; {all_b / 1e3:.0f} kB to the terminal; target <= {TARGET_S:g} s"},
        {"name": f"status piped, {n} runs (median)", "value": pipe_s, "reference": TARGET_S,
         "ratio": TARGET_S / pipe_s, "unit": "s",
         "note": f"tab-separated, every row; CPU {pipe_cpu:.2f} s; {pipe_b / 1e3:.0f} kB; target <= {TARGET_S:g} s"},
        {"name": f"status terminal rendering, {n} runs (CPU)", "value": grouped_cpu, "reference": table_cpu,
         "ratio": table_cpu / grouped_cpu, "unit": "s",
         "note": f"in process, rich Console(force_terminal=True) into a StringIO: the grouped view; --all "
                 f"{all_cpu_r:.2f} s; reference: a rich Table of every row (the view before) {table_cpu:.2f} s"},
        {"name": f"status --watch redraw, nothing changed, {n} runs", "value": again, "reference": first,
         "ratio": first / again, "unit": "s",
         "note": "in process: view() again with the run-dir cache, against the first view() (every run dir read)"},
    ]


if __name__ == "__main__":
    for row in run("--quick" in sys.argv):
        print(f"{row['name']}: {row['value']:.3f} {row['unit']} (reference {row['reference']:.3f}, "
              f"ratio {row['ratio']:.2f}) — {row['note']}")
