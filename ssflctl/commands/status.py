"""`ssflctl status`, `cancel`, `logs`: reconcile, then show; cancel jobs; print training logs."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssflctl.workdir import runref
from ssflctl.errors import UserError

COLUMNS = ["run", "loss", "dataset", "seed", "lr", "attempt", "state", "job", "progress", "loss_val", "elapsed", "note"]
HEADERS = ["run", "loss", "dataset", "seed", "lr", "attempt", "state", "job id", "progress", "last loss", "elapsed",
           "note"]
STATE_STYLE = {"done": "green", "running": "cyan", "queued": "blue", "failed": "red", "cancelled": "yellow",
               "unknown": "magenta", "submitting": "blue", "pending": "dim"}


def print_table(title: str, headers: List[str], rows: List[List[str]], console=None, styles=None) -> None:
    """A rich table on a terminal; tab-separated plain text (header first) when piped."""
    from rich.console import Console

    console = console or Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        out = sys.stdout
        out.write("\t".join(headers) + "\n")
        for r in rows:
            out.write("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in r) + "\n")
        out.flush()
        return
    console.print(_rich_table(title, headers, rows, styles))


def _rich_table(title, headers, rows, styles=None):
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for h in headers:
        table.add_column(h, overflow="fold")
    for i, r in enumerate(rows):
        table.add_row(*[str(c) for c in r], style=(styles[i] if styles else None))
    return table


def _ws_registry(ws, create: bool = False):
    from ssflctl.registry.store import Registry

    ws = Path(ws)
    if not (ws / "registry.sqlite").exists() and not create:
        raise UserError(f"{ws}: no ssflctl workspace here (no registry.sqlite); submit an experiment first or "
                        "pass --workspace / set SSFLCTL_WORKSPACE")
    return Registry(ws)


def _fmt_elapsed(seconds: Optional[float]) -> str:
    if seconds is None or seconds < 0:
        return ""
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _ts(iso):
    from ssflctl.control.reconcile import _ts as ts

    return ts(iso)


def _sacct_elapsed(txt: str) -> Optional[float]:
    if not txt:
        return None
    d = 0
    if "-" in txt:
        ds, txt = txt.split("-", 1)
        d = int(ds)
    parts = [int(p) for p in txt.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return d * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def lineage(attempt: Dict[str, Any], max_attempts: Optional[int]) -> str:
    """'attempt 2/3 · lr 0.001 · after NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)'."""
    info = attempt["info"]
    n = attempt["attempt"]
    bits = [f"attempt {n}/{max_attempts}" if max_attempts else f"attempt {n}"]
    lr = info.get("lr")
    if lr is not None:
        bits.append(f"lr {lr:g}" if isinstance(lr, (int, float)) else f"lr {lr}")
    reason = info.get("reason")
    if reason and reason != "first attempt":
        bits.append(str(reason))
    return " · ".join(bits)


def view(reg, ws, experiment: Optional[str] = None) -> List[Dict[str, Any]]:
    """Reconcile, then one dict per run with everything the table shows."""
    from ssflctl.control.reconcile import reconcile

    if experiment and experiment not in reg.experiments():
        known = reg.experiments()
        import difflib

        hint = difflib.get_close_matches(experiment, known, n=1)
        raise UserError(f"status: no experiment {experiment!r} in {ws}"
                        + (f"; did you mean '{hint[0]}'?" if hint else f" (known: {', '.join(known) or 'none'})"))
    details = reconcile(reg, ws, experiment)
    out = []
    for run in reg.list_runs(experiment):
        d = details.get(run["run_id"], {})
        attempts = d.get("attempts") or []
        last = attempts[-1] if attempts else None
        prog = (last or {}).get("progress") or {}
        max_attempts = ((d.get("run_json") or {}).get("retry") or {}).get("max_attempts")
        progress = ""
        if prog:
            ep, mep, it, mit = prog.get("epoch"), prog.get("max_epochs"), prog.get("iter"), prog.get("max_iters")
            if ep is not None and mep:
                progress = f"epoch {ep}/{mep}"
            if it is not None:
                progress += (" " if progress else "") + (f"iter {it}/{mit}" if mit else f"iter {it}")
        elapsed = None
        sched = d.get("sched")
        if sched and sched.get("elapsed"):
            try:
                elapsed = _sacct_elapsed(sched["elapsed"])
            except ValueError:
                elapsed = None
        if elapsed is None and attempts:
            starts = [_ts(a["info"].get("rendered_at") or a["info"].get("created_at")) for a in attempts
                      if a["info"].get("rendered_at") or a["info"].get("created_at")]
            local = d.get("local") or {}
            t0 = _ts(local.get("started_at")) or (min(starts) if starts else None)
            ends = [(a["outcome"] or {}).get("finished_at") for a in attempts]
            t1 = _ts(local.get("ended_at")) or (_ts(ends[-1]) if ends and ends[-1] else None)
            if t0 is not None:
                if t1 is None and run["state"] in ("running", "queued"):
                    t1 = time.time()
                elapsed = (t1 - t0) if t1 else None
        note = run["reason"] or ""
        if last is not None and last["attempt"] > 1:
            note = lineage(last, max_attempts) + (f" — {note}" if note and run["state"] != "done" else "")
        resumes = [x for x in (last or {}).get("recovery") or [] if isinstance(x, dict) and x.get("kind") == "resumed"]
        if resumes:  # requeue / time limit / preemption: resumed in place at the same lr
            note = (f"{note} · " if note else "") + f"resumed {len(resumes)}× (last from {resumes[-1].get('checkpoint')})"
        ax = run["axes"]
        lr = (last or {}).get("info", {}).get("lr")
        if lr is None:
            lr = ((d.get("run_json") or {}).get("params") or {}).get("lr", ax.get("lr"))
        loss_val = prog.get("loss")
        out.append({
            "run": run["run_id"], "experiment": run["experiment"], "loss": ax.get("loss", ""),
            "dataset": ax.get("dataset", ""), "seed": ax.get("seed", ""), "lr": lr,
            "attempt": last["attempt"] if last else 0, "state": run["state"], "job": run["job_id"] or "",
            "test_job": run.get("test_job_id") or "", "progress": progress,
            "loss_val": loss_val, "elapsed": _fmt_elapsed(elapsed), "elapsed_s": elapsed, "note": note,
            "axes": ax, "attempts": run["attempts"],
            "log_tail": ((last or {}).get("outcome") or {}).get("log_tail") if run["state"] == "failed" else None,
        })
    return out


def _rows(items):
    rows = []
    for it in items:
        lv = it["loss_val"]
        lr = it["lr"]
        rows.append([it["run"], str(it["loss"]), str(it["dataset"]), str(it["seed"]),
                     f"{lr:g}" if isinstance(lr, (int, float)) else str(lr or ""), str(it["attempt"] or ""),
                     it["state"], it["job"], it["progress"],
                     f"{lv:.4f}" if isinstance(lv, (int, float)) else ("" if lv is None else str(lv)),
                     it["elapsed"], it["note"]])
    return rows


def main(workspace, experiment: Optional[str] = None, as_json: bool = False, watch: bool = False,
         interval: float = 5.0) -> List[Dict[str, Any]]:
    reg = _ws_registry(workspace)
    try:
        items = view(reg, workspace, experiment)
        if as_json:
            sys.stdout.write(json.dumps([{k: v for k, v in it.items()} for it in items], indent=2, default=str) + "\n")
            return items
        title = f"ssflctl status ({experiment or 'all experiments'})"
        if not watch:
            print_table(title, HEADERS, _rows(items), styles=[STATE_STYLE.get(i["state"]) for i in items])
            _failures(items)
            _summary(items)
            return items
        from rich.console import Console
        from rich.live import Live

        console = Console()
        if not console.is_terminal:  # piped: a plain table per refresh until every run has ended
            while True:
                print_table(title, HEADERS, _rows(items), console=console)
                if not any(i["state"] in ("queued", "running", "submitting") for i in items):
                    break
                time.sleep(max(0.5, interval))
                items = view(reg, workspace, experiment)
            _summary(items)
            return items
        with Live(_rich_table(title, HEADERS, _rows(items), [STATE_STYLE.get(i["state"]) for i in items]),
                  console=console, refresh_per_second=1, auto_refresh=False) as live:
            while any(i["state"] in ("queued", "running", "submitting") for i in items):
                time.sleep(max(0.5, interval))
                items = view(reg, workspace, experiment)
                live.update(_rich_table(f"{title} · {time.strftime('%H:%M:%S')}", HEADERS, _rows(items),
                                        [STATE_STYLE.get(i["state"]) for i in items]), refresh=True)
        _summary(items)
        return items
    finally:
        reg.close()


def _failures(items, lines: int = 5) -> None:
    """Failed runs: the reason and the last lines of the attempt's log (stderr; stdout is the table)."""
    for i in items:
        if i["state"] == "failed" and i.get("log_tail"):
            tail = [ln for ln in i["log_tail"].splitlines() if ln.strip()][-lines:]
            sys.stderr.write(f"{i['run']} failed: {i['note']}\n" + "".join(f"  | {ln}\n" for ln in tail))


def _summary(items) -> None:
    from collections import Counter

    from rich.console import Console

    c = Counter(i["state"] for i in items)
    Console(highlight=False, soft_wrap=True, stderr=True).print(
        f"{len(items)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())), markup=False)


# ------------------------------------------------------------------------------------------
# cancel
# ------------------------------------------------------------------------------------------

def cancel(reg, ws, target: str) -> List[str]:
    """Cancel the active runs of an experiment or a run; returns the run ids cancelled."""
    from ssflctl.control.reconcile import reconcile

    rows = reg.find_runs(target)
    if not rows:
        raise UserError(f"cancel: no experiment or run matching {target!r} in {ws}; see `ssflctl status`")
    exps = {r["experiment"] for r in rows}
    if len(rows) > 1 and target not in exps and not all(r["name"] == target for r in rows):
        raise UserError(f"cancel: {target!r} matches {len(rows)} runs ({', '.join(r['run_id'] for r in rows[:3])}...); "
                        "give the full run id or the experiment name")
    for e in exps:
        reconcile(reg, ws, e)
    rows = [reg.get_run(r["run_id"]) for r in rows]
    active = [r for r in rows if r["state"] in ("queued", "running", "submitting", "unknown") and r["job_id"]]
    slurm_ids = [i for r in active if r["backend"] == "slurm" for i in (r["job_id"], r["test_job_id"]) if i]
    if slurm_ids:
        from ssflctl.backends import slurm

        slurm.cancel(slurm_ids)
    for r in active:
        if r["backend"] == "local":
            from ssflctl.backends import local

            sub = reg.submission(r["submission_id"]) if r["submission_id"] else None
            parsed = local.parse_job_id(r["job_id"])
            if sub and parsed:
                local.cancel(Path(sub["folder"]), parsed[1])
        reg.update_run(r["run_id"], state="cancelled", reason="cancelled by user", event="cancel")
        if r["attempt"]:
            reg.upsert_attempt(r["run_id"], r["attempt"], state="cancelled", reason="cancelled by user")
    return [r["run_id"] for r in active]


def cancel_main(workspace, target: str) -> List[str]:
    from rich.console import Console

    reg = _ws_registry(workspace)
    try:
        done = cancel(reg, workspace, target)
    finally:
        reg.close()
    Console(highlight=False, soft_wrap=True).print(
        f"cancelled {len(done)} run{'s' if len(done) != 1 else ''}" + (": " + ", ".join(done) if done else
                                                                       " (nothing queued or running)"), markup=False)
    return done


# ------------------------------------------------------------------------------------------
# logs
# ------------------------------------------------------------------------------------------

def find_logs(ws, run_id: str, attempt: Optional[int] = None) -> List[Path]:
    """The mmengine text logs of the run's attempt (latest by default), oldest first: the training
    log, then the test step's. Raises UserError if the run has no attempt (or not that one)."""
    from ssflctl.control.reconcile import attempt_dirs, attempt_no, run_dir

    rdir = run_dir(ws, run_id)
    dirs = attempt_dirs(rdir)
    if not dirs:
        raise UserError(f"logs: run {run_id} has no attempts yet (nothing rendered in {rdir})")
    if attempt is not None:
        dirs = [d for d in dirs if attempt_no(d) == attempt]
        if not dirs:
            raise UserError(f"logs: run {run_id} has no attempt {attempt}")
    adir = dirs[-1]
    # mmengine: <work_dir>/<YYYYmmdd_HHMMSS>/<YYYYmmdd_HHMMSS>.log, one per Runner (train, test)
    return sorted((p for p in adir.glob("*/*.log") if p.stem == p.parent.name), key=lambda p: p.parent.name)


def _job_output(reg, row) -> Optional[Path]:
    """The scheduler's stdout/stderr file for the run's train job, when the mmengine log is absent."""
    sub = reg.submission(row["submission_id"]) if row["submission_id"] else None
    if not sub or not row["job_id"]:
        return None
    folder = Path(sub["folder"])
    if row["backend"] == "local":
        from ssflctl.backends.local import parse_job_id

        parsed = parse_job_id(row["job_id"])
        return folder / f"{parsed[1]}.log" if parsed else None
    for cand in folder.rglob(f"{row['job_id']}_0_log.err"):
        return cand
    return None


def logs_main(workspace, run: str, follow: bool = False, attempt: Optional[int] = None) -> List[Path]:
    reg = _ws_registry(workspace)
    try:
        run_id = runref.resolve(workspace, run, "logs").name
        row = reg.get_run(run_id)
        if row is None:
            raise UserError(f"logs: run {run_id} is not in this workspace's registry; see `ssflctl status`")
        paths = find_logs(workspace, row["run_id"], attempt)
        if not paths:
            alt = _job_output(reg, row)
            if alt is not None and alt.exists():
                paths = [alt]
    finally:
        reg.close()
    if not paths and not follow:
        raise UserError(f"logs: no training log yet for {row['run_id']}; the job may still be queued — "
                        "try `ssflctl logs -f`")
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
            fresh = find_logs(workspace, row["run_id"], attempt)
        except UserError:
            fresh = []
        paths = fresh or paths
