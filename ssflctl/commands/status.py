"""`ssflctl status`: reconcile, then show one row per run (rich on a terminal, plain when piped)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssflctl.commands.table import AlignedRows, print_table
from ssflctl.errors import UserError
from ssflctl.workdir.records import ACTIVE, fmt_lr_trained

COLUMNS = ["run", "loss", "dataset", "seed", "lr", "attempt", "state", "job", "gpus", "progress", "loss_val",
           "elapsed", "note"]
HEADERS = ["run", "loss", "dataset", "seed", "lr", "attempt", "state", "job id", "gpus", "progress", "last loss",
           "elapsed", "note"]
STATE_STYLE = {"done": "green", "running": "cyan", "queued": "blue", "failed": "red", "cancelled": "yellow",
               "unknown": "magenta", "submitting": "blue", "pending": "dim"}


READ_ONLY_NOTE = ("note: {path} is read-only for you: showing the last recorded states with what the files say "
                  "now; nothing is written\n")


def read_only_note(ws) -> None:
    """The one line a read-only command prints when this user cannot write the workspace's registry."""
    from ssflctl.registry.store import Registry

    path = Path(ws) / "registry.sqlite"
    if path.exists() and not Registry.writable(ws):
        sys.stderr.write(READ_ONLY_NOTE.format(path=path))


def open_registry(ws, read: bool = True):
    """The workspace's registry (read-only when this user cannot write it: said once on stderr)."""
    from ssflctl.registry.store import Registry

    from ssflctl.workdir.layout import run_dirs

    ws = Path(ws)
    if not (ws / "registry.sqlite").exists() and not (run_dirs(ws) and Registry.writable(ws)):
        # (a workspace whose registry was lost but whose run directories are there is rebuilt)
        raise UserError(f"{ws}: no ssflctl workspace here (no registry.sqlite); submit an experiment first or "
                        "pass --workspace / set SSFLCTL_WORKSPACE")
    reg = Registry.for_reading(ws) if read else Registry(ws)
    if reg.read_only:
        sys.stderr.write(READ_ONLY_NOTE.format(path=ws / "registry.sqlite"))
    return reg


def _fmt_elapsed(seconds: Optional[float]) -> str:
    if seconds is None or seconds < 0:
        return ""
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


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


def lineage(attempt, max_attempts: Optional[int]) -> str:
    """'attempt 2/3 · lr 0.001 · after NaN in loss_cls at epoch 3 iter 1234 (lr 0.01)'; the lr is
    the config's, with the one the optimizer trained at when it differs
    ('lr 0.001→0.000125 (auto_scale_lr)', ``AttemptDir.lr_text``)."""
    bits = [f"attempt {attempt.n}/{max_attempts}" if max_attempts else f"attempt {attempt.n}"]
    if attempt.info.lr is not None:
        bits.append(f"lr {attempt.lr_text()}")
    reason = attempt.info.reason
    if reason and reason != "first attempt":
        bits.append(str(reason))
    return " · ".join(bits)


def _elapsed(run, train, state: str) -> Optional[float]:
    if train is not None and train.elapsed:
        try:
            return _sacct_elapsed(train.elapsed)
        except ValueError:
            pass
    from ssflctl.control.reconcile import ts

    attempts = run.attempts()
    starts = [ts(a.info.started) for a in attempts if a.info.started]
    starts = [t for t in starts if t is not None]
    if not starts:
        return None
    t0 = min(starts)
    end = attempts[-1].outcome.finished_at if attempts and attempts[-1].outcome else None
    t1 = ts(end)
    if t1 is None and state in ("running", "queued"):
        t1 = time.time()
    return (t1 - t0) if t1 else None


def gpus_text(res: Dict[str, Any]) -> str:
    """``2 GPU × 1 node`` (``CPU × 1 node`` without GPUs)."""
    gpus, nodes = int(res.get("gpus", 0) or 0), int(res.get("nodes", 1) or 1)
    return f"{gpus} GPU × {nodes} node" if gpus else f"CPU × {nodes} node"


def _sched_json(st) -> Optional[Dict[str, Any]]:
    """The scheduler's answer for --json: its own state word and reason, and ``known: false`` with
    the failing query when it could not be asked."""
    if st is None:
        return None
    return {"job_id": st.job_id, "state": st.raw, "kind": st.kind.value, "reason": st.reason, "hint": st.hint,
            "exit_code": st.exit_code, "known": st.kind.value != "unknown", "error": st.error or None,
            "source": st.extra.get("source") or None, "max_rss_bytes": st.extra.get("max_rss_bytes"),
            "signal": st.extra.get("signal") or None}


def _job_log_tail(reg, run_id: str, max_bytes: int = 4096) -> Optional[str]:
    """The end of the current train job's own output (stderr), for a job killed before it could
    write an outcome (a signal, the OOM killer): the scheduler's and the kernel's last words."""
    from ssflctl import backends
    from ssflctl.control.reconcile import job_refs

    r = reg.get_run(run_id)
    if r is None or not r["backend"] or not r["job_id"]:
        return None
    try:
        path = backends.get(r["backend"]).job_output(job_refs(reg, r)[0])
        if path is None:
            return None
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except (OSError, IndexError, ValueError):
        return None


def query_failures(items) -> List[str]:
    """The distinct failing scheduler queries behind ``items`` ('<command>: <message>')."""
    out: List[str] = []
    for it in items:
        for s in (it.get("scheduler"), it.get("test_scheduler")):
            err = (s or {}).get("error")
            if err:
                err = err[len("unknown: "):] if err.startswith("unknown: ") else err
                if err not in out:
                    out.append(err)
    return out


def _query_note(items) -> None:
    """Once, on stderr: the scheduler could not be asked (which command, its message)."""
    errs = query_failures(items)
    if not errs:
        return
    unknown = sum(1 for it in items for s in (it.get("scheduler"), it.get("test_scheduler"))
                  if s and not s.get("known"))
    more = f" (and {len(errs) - 1} other failing quer{'ies' if len(errs) > 2 else 'y'})" if len(errs) > 1 else ""
    kept = (f"; {unknown} job{'s' if unknown != 1 else ''} not known: their runs keep the last known state"
            if unknown else "; the other query answered")
    sys.stderr.write(f"note: the scheduler could not be asked: {errs[0]}{more}{kept}\n")


def view(reg, ws, experiment: Optional[str] = None, cache=None) -> List[Dict[str, Any]]:
    """Reconcile, then one dict per run with everything the table shows (``--json`` prints them):
    ``lr`` is the latest attempt's config lr (attempt.json), ``lr_effective`` the base lr its
    optimizer trains at as the job measured it (None before the job's first logging point or when
    not recorded) and ``lr_scale`` mmengine's auto_scale_lr factor (None when off). ``cache``: a
    :class:`~ssflctl.workdir.layout.RunDirCache` kept between calls (``--watch``): unchanged run
    directories are not read again. The cyclic garbage collector is paused while the run
    directories are read (ssflctl.gcpause; piped status of 5000 runs, A/B on 2 cores: 1.6-2.0 s -> 1.4-1.65 s)."""
    from ssflctl import gcpause

    with gcpause.paused():
        return _view(reg, ws, experiment, cache)


def _view(reg, ws, experiment: Optional[str], cache) -> List[Dict[str, Any]]:
    from ssflctl.control.reconcile import reconcile

    if experiment and experiment not in reg.experiments():
        known = reg.experiments()
        import difflib

        hint = difflib.get_close_matches(experiment, known, n=1)
        raise UserError(f"status: no experiment {experiment!r} in {ws}"
                        + (f"; did you mean '{hint[0]}'?" if hint else f" (known: {', '.join(known) or 'none'})"))
    details = reconcile(reg, ws, experiment, cache=cache)
    out = []
    for row in reg.list_runs(experiment):
        d = details.get(row["run_id"], {})
        run = d.get("run")
        verdict = d.get("verdict")
        state = verdict.state.value if verdict is not None else row["state"]
        reason = verdict.reason if verdict is not None else (row["reason"] or "")
        last = run.latest() if run is not None else None
        prog = last.progress if last is not None else None
        max_attempts = run.run.max_attempts if run is not None and run.exists else None
        note = reason
        if last is not None and last.n > 1:
            note = lineage(last, max_attempts) + (f" — {note}" if note and state != "done" else "")
        resumes = last.resumes() if last is not None else []
        if resumes:  # requeue / time limit / preemption: resumed in place at the same lr
            note = (f"{note} · " if note else "") + f"resumed {len(resumes)}× (last from {resumes[-1].checkpoint})"
        ax = row["axes"]
        lr = last.info.lr if last is not None else None
        if lr is None and run is not None:
            lr = run.run.params.get("lr", ax.get("lr"))
        eff = last.effective_lr if last is not None else None
        train, test = d.get("train"), d.get("test")
        elapsed = _elapsed(run, train, state) if run is not None else None
        out.append({
            "run": row["run_id"], "experiment": row["experiment"], "loss": ax.get("loss", ""),
            "dataset": ax.get("dataset", ""), "seed": ax.get("seed", ""), "lr": lr,
            "lr_effective": eff.effective if eff is not None else None,
            "lr_scale": eff.scale if eff is not None else None,
            "attempt": last.n if last is not None else 0, "state": state, "job": row["job_id"] or "",
            "gpus": gpus_text(row.get("resources") or {}),
            "test_job": row.get("test_job_id") or "", "progress": prog.describe() if prog is not None else "",
            "loss_val": prog.loss if prog is not None else None, "elapsed": _fmt_elapsed(elapsed),
            "elapsed_s": elapsed, "note": note, "axes": ax, "attempts": row["attempts"],
            "scheduler": _sched_json(train), "test_scheduler": _sched_json(test),
            "resumes": len(resumes),
            "job_ids": sorted({j for j in [*(a.get("job_id") for a in row["attempts"]), row["job_id"],
                                           row.get("test_job_id")] if j}),
            # a failed run: the exception's own traceback when one ended the attempt (outcome.json
            # ``traceback``), else the end of its log, else the job's output
            "log_tail": ((last.outcome.tail if last is not None and last.outcome is not None else None)
                         or _job_log_tail(reg, row["run_id"])) if state == "failed" else None,
            "traceback": bool(last is not None and last.outcome is not None and last.outcome.traceback
                              and state == "failed"),
            "tests": _test_items(d.get("tests") or {}),
        })
    return out


def _test_items(cells: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The run's test cells (test_matrix), each with its own state, job and note."""
    import json as _json

    out = []
    for tid, c in cells.items():
        row, verdict = c["row"], c["verdict"]
        out.append({"test": tid, "name": row["name"], "axes": _json.loads(row["axes"]), "state": verdict.state.value,
                    "job": row["job_id"] or "", "after": row["after_job_id"] or "", "note": verdict.reason,
                    "scheduler": _sched_json(c.get("job"))})
    return out


def lr_cell(it: Dict[str, Any]) -> str:
    """The lr column: the config's lr (``0.01``), or with the base lr the optimizer trains at when
    the job measured another one (``0.01→0.00125 (auto_scale_lr)``); empty when unknown."""
    lr = it["lr"]
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        return str(lr or "")
    why = "auto_scale_lr" if it.get("lr_scale") is not None else "optimizer"
    return fmt_lr_trained(lr, it.get("lr_effective"), why)


def _rows(items):
    rows = []
    for it in items:
        lv = it["loss_val"]
        rows.append([it["run"], str(it["loss"]), str(it["dataset"]), str(it["seed"]),
                     lr_cell(it), str(it["attempt"] or ""),
                     it["state"], it["job"], it["gpus"], it["progress"],
                     f"{lv:.4f}" if isinstance(lv, (int, float)) else ("" if lv is None else str(lv)),
                     it["elapsed"], it["note"]])
        for t in it.get("tests") or []:  # test cells under their run
            rows.append([f"  └ test {t['name']}", "", "", "", "", "", t["state"], t["job"], "", "", "", "",
                         t["note"] or (f"after {t['after']}" if t["state"] == "queued" and t["after"] else "")])
    return rows


def _styles(items) -> List[Optional[str]]:
    out = []
    for i in items:
        out.append(STATE_STYLE.get(i["state"]))
        out.extend(STATE_STYLE.get(t["state"]) for t in i.get("tests") or [])
    return out


# ---------------------------------------------------------------------- the terminal view

#: state columns of the terminal's summary, in this order (others follow)
STATE_ORDER = ("done", "running", "queued", "failed", "unknown", "cancelled", "submitting", "pending")
#: order of the listed rows within an experiment: what needs a look first
LIST_ORDER = {"failed": 0, "unknown": 1, "queued": 2, "submitting": 3, "running": 4, "done": 5, "cancelled": 6,
              "pending": 7}


def why_listed(it: Dict[str, Any]) -> Optional[str]:
    """Why the terminal view lists this run in full (None: only counted): it failed, its state is
    unknown, it is running or being submitted, it was retried (a later attempt, or resumed after
    a requeue), or it is queued with a problem: held or stuck (a pending reason that does not clear
    by waiting; Slurm's hint says what to do) or the scheduler not answering about it."""
    st = it["state"]
    if st in ("failed", "unknown", "running", "submitting"):
        return st
    if (it.get("attempt") or 0) > 1 or it.get("resumes"):
        return "retried"
    if st == "queued":
        for s in (it.get("scheduler"), it.get("test_scheduler")):
            if s and not s.get("known"):
                return "not known"
            if s and (s.get("kind") == "held" or s.get("hint")):
                return "held"
    return None


def _state_order(states) -> List[str]:
    return sorted(set(states), key=lambda s: (STATE_ORDER.index(s) if s in STATE_ORDER else len(STATE_ORDER), s))


def summary_table(title: str, items: List[Dict[str, Any]]):
    """One row per experiment: its runs by state, how many were retried and how many are listed."""
    from rich.table import Table

    states = _state_order(i["state"] for i in items)
    per: Dict[str, Dict[str, int]] = {}
    for it in items:
        c = per.setdefault(it["experiment"], {})
        c[it["state"]] = c.get(it["state"], 0) + 1
        c["runs"] = c.get("runs", 0) + 1
        why = why_listed(it)
        c["retried"] = c.get("retried", 0) + (1 if (it.get("attempt") or 0) > 1 or it.get("resumes") else 0)
        c["listed"] = c.get("listed", 0) + (1 if why else 0)
    cols = ["runs", *states, "retried", "listed"]
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("experiment")
    for k in cols:
        table.add_column(k, justify="right", style=STATE_STYLE.get(k))
    rows = sorted(per.items())
    if len(rows) > 1:
        total = {k: sum(c.get(k, 0) for _, c in rows) for k in cols}
        rows.append(("all", total))
    for i, (exp, c) in enumerate(rows):
        table.add_row(exp, *[str(c.get(k, 0) or "") for k in cols],
                      end_section=(len(rows) > 1 and i == len(rows) - 2))
    return table


def terminal_view(title: str, items: List[Dict[str, Any]], show_all: bool = False):
    """What a terminal shows (a rich renderable, for print and for ``Live``): the summary by
    experiment and state, then every run that needs a look (:func:`why_listed`; ``show_all``:
    every run) as aligned rows grouped by experiment, failed first, and a line saying what was
    left out. Costs microseconds a row (5000 runs: well under a second)."""
    from rich.console import Group
    from rich.text import Text

    listed = [it for it in items if show_all or why_listed(it)]
    exp_pos: Dict[str, int] = {}
    for it in items:
        exp_pos.setdefault(it["experiment"], len(exp_pos))
    order = sorted(range(len(listed)), key=lambda k: (exp_pos[listed[k]["experiment"]],
                                                      LIST_ORDER.get(listed[k]["state"], 99), k))
    listed = [listed[k] for k in order]
    headings: Dict[int, str] = {}
    if len(exp_pos) > 1:
        for k, it in enumerate(listed):
            if k == 0 or listed[k - 1]["experiment"] != it["experiment"]:
                headings[k] = f"── {it['experiment']}"
    parts: List[Any] = [summary_table(title, items)]
    if listed:
        parts.append(AlignedRows(HEADERS, _rows(listed), _styles(listed), headings))
    left = len(items) - len(listed)
    if left:
        from collections import Counter

        c = Counter(it["state"] for it in items if not (show_all or why_listed(it)))
        what = ", ".join(f"{c[s]} {s}" for s in _state_order(c))
        head = (f"Listed: the {len(listed)} runs that need a look (failed, unknown, running, retried, held or not "
                f"known to the scheduler); " if listed else "No run needs a look; ")
        parts.append(Text(f"{head}{left} more ({what}) are counted above. `ssflctl status --all` lists every run "
                          "(piped output always does).", style="dim"))
    return Group(*parts)


#: the run states ``--watch`` keeps refreshing for (a job may still change them); every other one
#: (done, failed, cancelled, unknown, pending) has ended or never began
WATCH_STATES = tuple(s.value for s in ACTIVE)


def any_active(items) -> bool:
    """Whether ``--watch`` goes on: some run is submitting, queued or running."""
    return any(i["state"] in WATCH_STATES for i in items)


def main(workspace, experiment: Optional[str] = None, as_json: bool = False, watch: bool = False,
         interval: float = 5.0, show_all: bool = False) -> List[Dict[str, Any]]:
    """Piped: every run as tab-separated text. A terminal: :func:`terminal_view` (``show_all``:
    every row); ``watch``: redrawn in place every ``interval`` seconds from a RunDirCache (run
    directories that did not change are not read again) until no run is queued or running."""
    from ssflctl.workdir.layout import RunDirCache

    reg = open_registry(workspace)
    cache = RunDirCache() if watch else None
    try:
        items = view(reg, workspace, experiment, cache=cache)
        _query_note(items)
        if as_json:
            sys.stdout.write(json.dumps([{k: v for k, v in it.items()} for it in items], indent=2, default=str) + "\n")
            return items
        title = f"ssflctl status ({experiment or 'all experiments'})"
        from rich.console import Console

        console = Console(highlight=False, soft_wrap=False)
        if not watch:
            if console.is_terminal:
                console.print(terminal_view(title, items, show_all))
            else:
                print_table(title, HEADERS, _rows(items), console=console)
            _failures(items, limit=FAILURE_TAILS if console.is_terminal and not show_all else None)
            _summary(items)
            return items
        from rich.live import Live

        if not console.is_terminal:  # piped: a plain table per refresh until every run has ended
            while True:
                print_table(title, HEADERS, _rows(items), console=console)
                if not any_active(items):  # checked before any wait: an ended workspace returns at once
                    break
                time.sleep(max(0.5, interval))
                items = view(reg, workspace, experiment, cache=cache)
            _failures(items)
            _summary(items)
            return items
        with Live(terminal_view(title, items, show_all), console=console, refresh_per_second=1,
                  auto_refresh=False) as live:
            while any_active(items):
                time.sleep(max(0.5, interval))
                items = view(reg, workspace, experiment, cache=cache)
                live.update(terminal_view(f"{title} · {time.strftime('%H:%M:%S')}", items, show_all), refresh=True)
        _failures(items, limit=None if show_all else FAILURE_TAILS)
        _summary(items)
        return items
    finally:
        reg.close()


#: log tails of failed runs a terminal shows under the view (the rest: `ssflctl logs RUN`, --all)
FAILURE_TAILS = 10


#: lines of a failed run's traceback shown under the view (outcome.json keeps about this many)
TRACEBACK_TAIL = 15


def _failures(items, lines: int = 5, limit: Optional[int] = None) -> None:
    """Failed runs: the reason and the last lines of the attempt's log, or the exception's traceback
    (up to :data:`TRACEBACK_TAIL` lines) when one ended it (stderr; stdout is the table);
    ``limit``: at most this many runs, then one line saying how many more and how to see them."""
    failed = [i for i in items if i["state"] == "failed" and i.get("log_tail")]
    for i in failed[:limit]:
        keep = TRACEBACK_TAIL if i.get("traceback") else lines
        tail = [ln for ln in i["log_tail"].splitlines() if ln.strip()][-keep:]
        sys.stderr.write(f"{i['run']} failed: {i['note']}\n" + "".join(f"  | {ln}\n" for ln in tail))
    if limit is not None and len(failed) > limit:
        sys.stderr.write(f"... and {len(failed) - limit} more failed runs with a log tail: `ssflctl logs RUN` shows "
                         "one, `ssflctl status --all` shows every tail\n")


def _summary(items) -> None:
    from collections import Counter

    from rich.console import Console

    c = Counter(i["state"] for i in items)
    tc = Counter(t["state"] for i in items for t in i.get("tests") or [])
    tests = (f"; {sum(tc.values())} test cells: " + ", ".join(f"{v} {k}" for k, v in sorted(tc.items()))) if tc else ""
    Console(highlight=False, soft_wrap=True, stderr=True).print(
        f"{len(items)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())) + tests, markup=False)


