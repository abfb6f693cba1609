"""Reconcile the registry with the scheduler and the run directories.

The run dir is the truth for what happened on the node (attempt-*/attempt.json, progress.json,
outcome.json, metrics.json); the scheduler (sacct/squeue, or the local runner's task files) says
whether a job is queued, running or gone. A job the scheduler has lost is `unknown`, never `done`.
Every state change goes to the events table (`Registry.update_run`).
"""
from __future__ import annotations

import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssflctl.atomic import read_json
from ssflctl.registry.store import Registry, hostname

STALE_CLAIM_S = 600          # a claim from another host older than this is treated as abandoned
SACCT_GRACE_S = 120          # sacct may not know a job for a moment after sbatch
SLURM_QUEUED = {"PENDING", "REQUEUED", "CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                "PREEMPTED", "STOPPED", "SIGNALING", "STAGE_OUT", "REVOKED", "SPECIAL_EXIT"}
SLURM_RUNNING = {"RUNNING", "COMPLETING"}
SLURM_FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _ts(iso: Optional[str]) -> Optional[float]:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def run_dir(ws, run_id: str) -> Path:
    return Path(ws) / "runs" / run_id


def attempt_dirs(rdir: Path) -> List[Path]:
    out = []
    for p in Path(rdir).glob("attempt-*"):
        m = re.fullmatch(r"attempt-(\d+)", p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def attempt_no(p: Path) -> int:
    return int(p.name.split("-")[1])


def read_attempt(p: Path) -> Dict[str, Any]:
    """Everything the job left in one attempt dir (missing files -> None)."""
    def rj(name):
        try:
            return read_json(p / name, default=None)
        except (ValueError, OSError):
            return None
    return {"dir": p, "attempt": attempt_no(p), "info": rj("attempt.json") or {}, "progress": rj("progress.json"),
            "outcome": rj("outcome.json"), "metrics": rj("metrics.json"), "recovery": rj("recovery.json") or []}


def _attempt_state(a: Dict[str, Any], test: bool) -> str:
    out = a["outcome"]
    if out:
        o = out.get("outcome", "failed")
        if o == "done":
            return "done" if (a["metrics"] is not None or not test) else "running"
        return o if o in ("nan", "failed", "preempted", "timeout") else "failed"
    return "running" if a["progress"] else "queued"


def _scheduler_states(reg: Registry, rows) -> Dict[str, Dict[str, str]]:
    ids = []
    for r in rows:
        if r["backend"] == "slurm":
            ids += [r["job_id"], r["test_job_id"]]
    ids = [i for i in ids if i]
    if not ids:
        return {}
    from ssflctl.backends import slurm  # imports submitit: only when there are Slurm jobs

    return slurm.job_states(ids)


def _local_state(reg: Registry, r) -> Dict[str, Any]:
    from ssflctl.backends import local

    sub = reg.submission(r["submission_id"]) if r["submission_id"] else None
    parsed = local.parse_job_id(r["job_id"] or "")
    if sub is None or parsed is None:
        return {"state": "missing"}
    return local.task_state(Path(sub["folder"]), parsed[1])


def _claim_abandoned(r) -> bool:
    if r["claim_host"] == hostname():
        if r["claim_pid"] == os.getpid():
            return False
        from ssflctl.backends.local import pid_alive

        return not pid_alive(r["claim_pid"])
    t = _ts(r["claimed_at"])
    return t is None or time.time() - t > STALE_CLAIM_S


def _recover(registry: Registry, r) -> Optional[Dict[str, Any]]:
    """Job ids of an interrupted submit that did launch (see launch.*.recover)."""
    sub = registry.submission(r["submission_id"]) if r["submission_id"] else None
    if sub is None:
        return None
    folder = Path(sub["folder"])
    try:
        if sub["backend"] == "local":
            from ssflctl.backends import local

            return local.recover(folder).get(r["run_id"])
        if sub["backend"] == "slurm" and (folder / "manifest.json").exists():
            from ssflctl.backends import slurm

            return slurm.recover(folder).get(r["run_id"])
    except (OSError, ValueError):
        return None
    return None


def _failure_reason(attempts: List[Dict[str, Any]], fallback: str) -> str:
    if attempts and attempts[-1]["outcome"]:
        out = attempts[-1]["outcome"]
        reason = out.get("reason") or out.get("outcome")
        return f"attempt {attempts[-1]['attempt']}: {reason}"
    rec = attempts[-1]["recovery"] if attempts and isinstance(attempts[-1]["recovery"], list) else []
    if rec and isinstance(rec[-1], dict) and rec[-1].get("kind") == "interrupted":
        # the scheduler's signal came and the job did not come back: the requeues are spent
        n = sum(1 for x in rec if isinstance(x, dict) and x.get("kind") == "resumed")
        from ssflctl.node.job import last_checkpoint  # what is on disk now (the job may have gone on after the note)

        path = last_checkpoint(attempts[-1]["dir"]) if attempts[-1].get("dir") else None
        ck = Path(path).name if path else rec[-1].get("checkpoint")
        return (f"{fallback}: stopped by {str(rec[-1].get('message', 'a signal')).split(' at iter')[0]} after "
                f"{n} requeue{'s' if n != 1 else ''}; raise resources.time or executor.slurm.max_num_timeout"
                + (f", then `ssflctl submit` again: it continues from {ck}" if ck else ""))
    return fallback


def decide(r, attempts: List[Dict[str, Any]], test: bool, sched: Dict[str, Dict[str, str]],
           local_state: Optional[Dict[str, Any]] = None) -> tuple:
    """(state, reason) for a submitted run, from its files and the scheduler."""
    last = attempts[-1] if attempts else None
    submitted = [a for a in attempts if a["attempt"] >= (r["attempt"] or 0)]
    if last and last["outcome"] and last["outcome"].get("outcome") == "done" and (last["metrics"] is not None or not test):
        return "done", None
    if r["backend"] == "local":
        st = (local_state or {}).get("state", "missing")
        if st == "pending":
            return "queued", None
        if st == "running":
            return "running", None
        if st == "cancelled":
            return "cancelled", "cancelled"
        if st == "done":
            what = "metrics.json" if test else "a 'done' outcome.json"
            return "failed", _failure_reason(submitted, f"the job exited 0 but wrote no {what}")
        if st == "failed":
            rc = (local_state or {}).get("returncode")
            return "failed", _failure_reason(submitted, f"the job exited with code {rc}; see `ssflctl logs`")
        if st == "lost":
            return "unknown", "the local runner process is gone (killed or machine restarted)"
        return "unknown", "no record of the local job"
    # slurm; a record whose job name lacks our submission id is another job with a reused id
    # (slurmctld state wiped): for us the job is lost
    def mine(rec):
        return rec if rec and (not rec.get("name") or not r["submission_id"] or r["submission_id"] in rec["name"]) \
            else None

    sched = {r["job_id"]: mine(sched.get(r["job_id"] or "")), r["test_job_id"]: mine(sched.get(r["test_job_id"] or ""))}
    sched = {k: v for k, v in sched.items() if k and v}
    tj = sched.get(r["job_id"] or "")
    if tj is None:
        t = _ts(r["submitted_at"])
        if t is not None and time.time() - t < SACCT_GRACE_S:
            return "queued", None
        return "unknown", f"the scheduler has no record of job {r['job_id']}"
    s = tj["state"]
    if s in SLURM_QUEUED:
        return "queued", None
    if s in SLURM_RUNNING:
        return "running", None
    if s == "CANCELLED":
        return "cancelled", f"train job {r['job_id']} cancelled"
    if s in SLURM_FAILED:
        return "failed", _failure_reason(submitted, f"train job {r['job_id']} {s} (exit {tj.get('exit_code')})")
    if s != "COMPLETED":
        return "unknown", f"train job {r['job_id']} in state {s}"
    if not test:
        return "failed", _failure_reason(submitted, "train job completed but wrote no 'done' outcome.json")
    if not r["test_job_id"]:
        return "failed", "trained, but no test job was submitted"
    sj = sched.get(r["test_job_id"])
    if sj is None:
        return "unknown", f"the scheduler has no record of test job {r['test_job_id']}"
    s = sj["state"]
    if s in SLURM_QUEUED or s in SLURM_RUNNING:
        return "running", "testing"
    if s == "CANCELLED":
        return "cancelled", f"test job {r['test_job_id']} cancelled"
    if s == "COMPLETED":
        return "failed", "test job completed but wrote no metrics.json"
    return "failed", f"test job {r['test_job_id']} {s} (exit {sj.get('exit_code')}); see `ssflctl logs`"


def reconcile(registry: Registry, ws, experiment: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """Fold attempt files and scheduler state into the registry. Returns per-run details
    (attempt files, scheduler record) for display."""
    ws = Path(ws)
    rows = registry.run_rows(experiment)
    active = [r for r in rows if r["state"] in ("queued", "running", "unknown", "failed")]
    sched = _scheduler_states(registry, active)
    details: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        rdir = run_dir(ws, r["run_id"])
        attempts = [read_attempt(p) for p in attempt_dirs(rdir)]
        run_json = read_json(rdir / "run.json", default={}) or {}
        test = bool(run_json.get("test", True))
        local_state = None
        # attempts -> registry; every change of an attempt and every node-side recovery step
        # (interrupted, resumed: attempt-N/recovery.json) is an event
        known = {a["attempt"]: a for a in registry.attempts(r["run_id"])} if attempts else {}
        logged = {(e["kind"], e["message"]) for e in registry.events(r["run_id"])} if attempts else set()
        for a in attempts:
            info = a["info"]
            n = a["attempt"]
            fields = {
                "lr": info.get("lr"),
                "state": _attempt_state(a, test),
                "reason": info.get("reason"),
            }
            if a["outcome"] and a["outcome"].get("reason") and fields["state"] != "done":
                fields["reason"] = f"{info.get('reason') or ''} → {a['outcome']['reason']}".strip(" →")
            if n >= (r["attempt"] or 0) and r["job_id"]:
                fields["job_id"] = r["job_id"]
            prog = a["progress"] or {}
            started = info.get("created_at") or info.get("rendered_at")
            if started:
                fields["started_at"] = started
            if a["outcome"] and a["outcome"].get("finished_at"):
                fields["ended_at"] = a["outcome"]["finished_at"]
            elif prog.get("updated_at") and fields["state"] in ("done", "failed", "nan"):
                fields["ended_at"] = prog["updated_at"]
            if r["state"] in ("cancelled",) and fields["state"] in ("queued", "running"):
                fields["state"] = "cancelled"
            registry.upsert_attempt(r["run_id"], n, **fields)
            before = known.get(n)
            if before is None or before["state"] != fields["state"]:
                lr = fields["lr"]
                registry.event("attempt", run_id=r["run_id"], experiment=r["experiment"],
                               old_state=before["state"] if before is not None else None, new_state=fields["state"],
                               message=f"attempt {n}" + (f" · lr {lr:g}" if isinstance(lr, (int, float)) else "")
                               + (f" · {fields['reason']}" if fields["reason"] else ""))
            for rec in a["recovery"] if isinstance(a["recovery"], list) else []:
                if not isinstance(rec, dict) or not rec.get("kind"):
                    continue
                msg = f"attempt {n}: {rec.get('message', '')} ({rec.get('at', '')})"
                if (rec["kind"], msg) not in logged:
                    registry.event(str(rec["kind"]), run_id=r["run_id"], experiment=r["experiment"], message=msg)
                    logged.add((rec["kind"], msg))
        # run state
        state, reason = r["state"], r["reason"]
        if r["state"] == "submitting" and _claim_abandoned(r):
            got = _recover(registry, r)
            if got:  # the jobs went out before the submit died: adopt them
                n = attempts[-1]["attempt"] if attempts else 1
                registry.update_run(r["run_id"], event="recovered", job_id=got["job_id"],
                                    test_job_id=got.get("test_job_id"), submitted_at=r["claimed_at"], attempt=n,
                                    claim_pid=None)
                registry.upsert_attempt(r["run_id"], n, state="queued", job_id=got["job_id"],
                                        lr=(attempts[-1]["info"].get("lr") if attempts else None),
                                        submission_id=r["submission_id"])
                state, reason = "queued", "recovered the jobs of an interrupted submit"
            else:
                state, reason = "failed", "a submit was interrupted before the job was launched; submit again"
        elif r["state"] == "done":  # results must still be there (deleted/corrupted -> resubmittable)
            last = attempts[-1] if attempts else None
            ok = last is not None and (last["outcome"] or {}).get("outcome") == "done" and (
                last["metrics"] is not None or not test)
            if not ok:
                what = "metrics.json" if last is not None and (last["outcome"] or {}).get("outcome") == "done" \
                    else "outcome.json"
                state, reason = "failed", f"results missing: no {what} in {last['dir'] if last else rdir}"
        elif r["state"] in ("queued", "running", "unknown", "failed") and r["job_id"]:
            if r["backend"] == "local":
                local_state = _local_state(registry, r)
            new_state, new_reason = decide(r, attempts, test, sched, local_state)
            if not (r["state"] == "failed" and new_state == "unknown"):
                state, reason = new_state, new_reason
        if state != r["state"] or (reason != r["reason"] and reason is not None):
            registry.update_run(r["run_id"], state=state, reason=reason or "")
        # a run killed before its attempt ran: the registry's attempt row follows the run
        if state in ("failed", "cancelled", "unknown") and r["attempt"]:
            row = [a for a in registry.attempts(r["run_id"]) if a["attempt"] == r["attempt"]]
            if row and row[0]["state"] in ("queued", "pending", "running"):
                registry.upsert_attempt(r["run_id"], r["attempt"], state=state, reason=reason)
        details[r["run_id"]] = {"attempts": attempts, "run_json": run_json, "sched": sched.get(r["job_id"] or ""),
                                "test_sched": sched.get(r["test_job_id"] or ""), "local": local_state}
    return details
