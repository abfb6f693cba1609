"""`ssflctl submit`: print the plan or the submission (the work is ssflctl.control.submit)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ssflctl import backends
from ssflctl.control.submit import SubmitResult, submit
from ssflctl.errors import UserError
from ssflctl.plan import batch as batch_mod


def fmt_time(minutes: int) -> str:
    d, rem = divmod(int(minutes), 1440)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


def fmt_resources(res: Dict[str, Any]) -> str:
    mem = res.get("mem_gb", 0)
    mem_s = f"{mem:g}G" if mem >= 1 else f"{int(mem * 1024)}M"
    nodes = int(res.get("nodes", 1) or 1)
    where = f"{res.get('gpus', 0)} GPU × {nodes} node" if nodes > 1 else f"{res.get('gpus', 0)} GPU"
    return f"{where}, {res.get('cpus', 1)} CPU, {mem_s}, {fmt_time(res.get('time_min', 60))}"


def batch_warnings(result: SubmitResult) -> List[str]:
    """One line per distinct lr-vs-batch mismatch (runs with the same numbers share a line)."""
    by_msg: Dict[str, List[str]] = {}
    for p in result.plan:
        b = batch_mod.of_run(p.run)
        msg = b.warning("{who}") if b is not None else None
        if msg:
            by_msg.setdefault(msg, []).append(p.run.run_id)
    out = []
    for msg, ids in by_msg.items():
        who = ids[0] if len(ids) == 1 else f"{len(ids)} runs ({', '.join(ids[:3])}{', …' if len(ids) > 3 else ''})"
        out.append(msg.replace("{who}", who, 1))
    return out


def plan_rows(result: SubmitResult) -> List[List[str]]:
    where = backends.get(result.kind).describe_where(result.experiment.executor.get(result.kind) or {})
    rows = []
    for p in result.plan:
        ax = p.run.axes
        b = batch_mod.of_run(p.run)
        rows.append([p.run.run_id, str(ax.get("loss", "")), str(ax.get("dataset", "")), str(ax.get("seed", "")),
                     f"{p.run.params.get('lr', '')}", b.column() if b is not None else "?",
                     fmt_resources(p.run.resources), where.strip(), p.action, p.why, p.job_id or ""])
        for t in (t for t in result.tests if t.run.run_id == p.run.run_id):  # its test cells (test_matrix)
            rows.append([f"  └ test {t.test.name}", "", "", "", "", "", "", "", t.action,
                         t.why + (f"; after {t.after}" if t.action == "submit" and t.after else ""), t.job_id or ""])
    return rows


PLAN_COLUMNS = ["run", "loss", "dataset", "seed", "lr", "batch", "resources", "executor", "action", "why", "job"]


def main(experiment, workspace, dry_run: bool = False, executor: Optional[str] = None) -> SubmitResult:
    from rich.console import Console
    from rich.text import Text

    from ssflctl.commands.table import print_table

    result = submit(experiment, workspace, dry_run=dry_run, executor=executor)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for w in list(result.warnings) + batch_warnings(result):
        err.print(f"[yellow]warning:[/] {w}", markup=True)
    cols = PLAN_COLUMNS if not dry_run else PLAN_COLUMNS[:-1]
    rows = [r[: len(cols)] for r in plan_rows(result)]
    title = f"{result.experiment.name}: {'plan (dry run)' if dry_run else 'submission ' + (result.submission_id or '-')}"
    print_table(title, cols, rows)
    n = len(result.submitted)
    skipped = len(result.plan) - n
    verb = "would submit" if dry_run else "submitted"
    summary = f"{verb} {n} run{'s' if n != 1 else ''}, skipped {skipped} ({result.kind})"
    if result.tests:
        nt = len(result.tests_submitted)
        summary += f"; {nt} test job{'s' if nt != 1 else ''} of {len(result.tests)} test cells"
    if not dry_run and (n or result.tests_submitted):
        summary += "; follow with: ssflctl status " + result.experiment.name
    if result.arrays and len(result.arrays) > 1:
        summary += f"; {len(result.arrays)} train arrays ({', '.join(map(str, result.arrays))} tasks)"
    Console(highlight=False, soft_wrap=True).print(summary, markup=False)
    if result.problems:
        for p in result.problems:
            err.print(Text.assemble(("error: ", "bold red"), p))
        raise UserError(f"submit would refuse this plan: {len(result.problems)} problem(s) above; nothing was "
                        "submitted")
    return result
