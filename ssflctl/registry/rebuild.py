"""A damaged registry: detected on open, kept aside, rebuilt from the run directories.

The run directories are the truth for what ran: ``run.json`` (the run as submitted),
``jobs.json`` (each submission's job ids, written right after the scheduler took them),
``attempt-<n>/`` (folded back by reconcile) and ``<ws>/submissions/<id>/submission.json`` (which
backend, which runs). :func:`problem` is SQLite's own check (``PRAGMA quick_check``) plus a
missing schema; :func:`import_runs` writes the registry rows those files imply. A run whose last
submission reached the scheduler comes back ``queued`` with its job ids (the next reconcile asks
the scheduler what became of them); one whose submit died before it recorded any job comes back
``submitting`` with no live claim, so reconcile adopts its jobs by name or makes it resubmittable:
a rebuilt registry never sends a run that has a live job again.

Test cells (``test_matrix``) come back from ``tests/<test_id>.json`` (the cell) and
``test_jobs.json`` (each submission's claim of the cell and, once the scheduler took it, its job):
a cell whose last job is recorded comes back ``queued`` with that job (the next reconcile asks the
scheduler, through :func:`ssflctl.control.state.decide_test`, before any submit may send it again);
one whose last submit claimed it and died before recording a job comes back ``submitting`` with
that submit's claim (reconcile adopts the job the backend finds, or cancels it, once the claim is
abandoned); each submission's ``test_jobs`` (what ``cancel`` reaches) is restored from the same
records.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssflctl.workdir import versions
from ssflctl.workdir.layout import RunDir, run_dirs, submission_record

TABLES = ("experiments", "runs", "attempts", "submissions", "events")
#: SQLite's words for a file that is not (or no longer) a sound database
DAMAGE_WORDS = ("not a database", "malformed", "disk image", "file is encrypted", "database corrupt")


def is_damage(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and any(w in str(exc).lower() for w in DAMAGE_WORDS)


def problem(conn: sqlite3.Connection, existed: bool) -> Optional[str]:
    """Why this database is not a sound registry (None: it is). ``existed``: the file was there
    with content before this open (a fresh file has no schema yet, and that is fine)."""
    try:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
        if rows != ["ok"]:
            return "SQLite's quick_check: " + "; ".join(str(r) for r in rows)[:200]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            raise
        return str(exc)
    missing = [t for t in TABLES if t not in tables]
    if existed and missing:
        return f"no {', '.join(missing)} table{'s' if len(missing) > 1 else ''} (schema missing)"
    return None


def missing_runs(reg, ws) -> List[RunDir]:
    """Run directories (with run.json) the registry has no row for."""
    known = {r[0] for r in reg.conn.execute("SELECT run_id FROM runs")}
    return [rd for rd in run_dirs(ws) if rd.run_id not in known and rd.run.experiment]


def import_runs(reg, ws, runs: List[RunDir]) -> int:
    """Registry rows for these run directories (and their experiments and submissions), from the
    files alone. Returns how many runs were added."""
    from ssflctl.registry.store import now

    ws = Path(ws)
    subs = _submissions(ws)
    added = 0
    with reg.transaction() as c:
        for rd in runs:
            if c.execute("SELECT 1 FROM runs WHERE run_id=?", (rd.run_id,)).fetchone() is not None:
                continue  # another command added it meanwhile
            rec = rd.run
            exp = rec.experiment
            if c.execute("SELECT 1 FROM experiments WHERE name=?", (exp,)).fetchone() is None:
                spec = (versions.current(ws, exp) or {}).get("spec") or ""
                c.execute("INSERT INTO experiments(name, spec_path, description, created_at, updated_at) "
                          "VALUES (?,?,?,?,?)", (exp, spec, "", now(), now()))
            jobs = rd.jobs()
            sid = rec.submission_id
            last = jobs[-1] if jobs else None
            fields: Dict[str, Any] = {"state": "pending", "reason": "rebuilt from the run directory"}
            if sid and sid in subs and (last is None or last.get("submission_id") != sid):
                # its submit died before recording jobs: no live claim, so reconcile adopts or fails it
                fields.update(state="submitting", backend=subs[sid]["backend"], submission_id=sid,
                              reason="rebuilt: its submit was interrupted",
                              attempt=int(last.get("attempt") or 0) if last else 0)
            elif last is not None:  # the scheduler (asked by the next reconcile) says what became of it
                fields.update(state="queued", backend=last.get("backend"), job_id=last.get("job_id"),
                              test_job_id=last.get("test_job_id"), submission_id=last.get("submission_id"),
                              attempt=int(last.get("attempt") or 1), submitted_at=last.get("submitted_at"))
            elif rd.attempts():
                fields.update(state="unknown", reason="rebuilt from the run directory: no job id recorded")
            t = now()
            cols = {"run_id": rd.run_id, "experiment": exp, "name": rec.name or rd.run_id,
                    "axes": json.dumps(rec.axes, sort_keys=True), "resources": json.dumps(rec.resources or {}),
                    "created_at": t, "updated_at": t, **fields}
            c.execute(f"INSERT INTO runs({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                      tuple(cols.values()))
            reg.event("rebuilt", run_id=rd.run_id, experiment=exp, new_state=fields["state"],
                      message="registry row rebuilt from the run directory")
            added += 1
            _import_tests(reg, rd, exp, subs, t)
            for j in jobs:
                s = j.get("submission_id")
                if s and s not in subs:
                    subs[s] = {"id": s, "experiment": exp, "backend": j.get("backend") or "",
                               "folder": str(ws / "submissions" / s), "created_at": j.get("submitted_at") or t}
            for j in rd.test_jobs():
                s = j["submission_id"]
                if s not in subs:
                    subs[s] = {"id": s, "experiment": exp, "backend": j.get("backend") or "",
                               "folder": str(ws / "submissions" / s),
                               "created_at": j.get("submitted_at") or j.get("claimed_at") or t}
        for s in subs.values():
            if c.execute("SELECT 1 FROM submissions WHERE id=?", (s["id"],)).fetchone() is None:
                jobs = {rd.run_id: [j.get("job_id"), j.get("test_job_id")] for rd in runs for j in rd.jobs()
                        if j.get("submission_id") == s["id"]}
                info: Dict[str, Any] = {"jobs": jobs, "rebuilt": True}
                test_jobs = {j["test_id"]: j["job_id"] for rd in runs for j in rd.test_jobs()
                             if j["submission_id"] == s["id"] and j.get("job_id")}
                if test_jobs:  # every test job it sent: what cancel reaches
                    info["test_jobs"] = test_jobs
                c.execute("INSERT INTO submissions(id, experiment, backend, folder, n_runs, info, created_at) "
                          "VALUES (?,?,?,?,?,?,?)",
                          (s["id"], s.get("experiment") or "", s.get("backend") or "", s["folder"],
                           len(s.get("run_ids") or jobs), json.dumps(info), s.get("created_at") or now()))
    return added


def _import_tests(reg, rd: RunDir, exp: str, subs: Dict[str, Dict[str, Any]], t: str) -> int:
    """The run's test-cell rows, from its cell definitions and test_jobs.json (in the caller's
    transaction). Returns how many were added."""
    c = reg.conn
    cells = rd.test_cells()
    last: Dict[str, Dict[str, Any]] = {}
    for j in rd.test_jobs():  # oldest first: the last entry of a cell is its current submission
        last[j["test_id"]] = j
    added = 0
    for tid in sorted(set(cells) | set(last)):
        if c.execute("SELECT 1 FROM tests WHERE test_id=?", (tid,)).fetchone() is not None:
            continue
        cell = cells.get(tid) or {}
        j = last.get(tid)
        fields: Dict[str, Any]
        if j is None:  # a cell written by an ssflctl that did not record its jobs: nothing to ask about
            fields = {"state": "unknown", "reason": "rebuilt from the run directory: no test job recorded"}
        else:
            backend = j.get("backend") or (subs.get(j["submission_id"]) or {}).get("backend")
            fields = {"backend": backend, "submission_id": j["submission_id"], "after_job_id": j.get("after")}
            if j.get("job_id"):  # the scheduler took it: the next reconcile asks what became of it
                fields.update(state="queued", reason="rebuilt from the run directory", job_id=str(j["job_id"]),
                              submitted_at=j.get("submitted_at"))
            else:  # its submit died before recording a job: adopted or failed by reconcile, once abandoned
                fields.update(state="submitting", reason="rebuilt: its submit was interrupted",
                              claim_pid=j.get("claim_pid"), claim_host=j.get("claim_host"),
                              claimed_at=j.get("claimed_at"))
        cols = {"test_id": tid, "run_id": rd.run_id, "experiment": exp, "name": cell.get("name") or tid,
                "axes": json.dumps(cell.get("axes") or {}, sort_keys=True), "created_at": t, "updated_at": t,
                **fields}
        c.execute(f"INSERT INTO tests({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                  tuple(cols.values()))
        reg.event("rebuilt", run_id=rd.run_id, experiment=exp, new_state=fields["state"],
                  message=f"test {tid}: registry row rebuilt from the run directory")
        added += 1
    return added


def _submissions(ws: Path) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    root = ws / "submissions"
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        rec = submission_record(folder)
        if rec and rec.get("backend"):
            out[folder.name] = {"id": folder.name, "experiment": rec.get("experiment") or "",
                                "backend": rec["backend"], "folder": str(folder.resolve()),
                                "run_ids": rec.get("run_ids") or [], "created_at": rec.get("created_at")}
    return out
