"""The workspace registry: SQLite (WAL, busy timeout, IMMEDIATE transactions).

Tables: experiments, runs, attempts, submissions, events. Only login-node commands write it;
jobs write JSON files in their run dirs and `supervise.reconcile` folds them in.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

RUN_STATES = ("pending", "submitting", "queued", "running", "done", "failed", "cancelled", "unknown")
ACTIVE_STATES = ("submitting", "queued", "running")
ATTEMPT_STATES = RUN_STATES + ("nan", "preempted", "timeout")

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY,
    spec_path TEXT,
    description TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    experiment TEXT NOT NULL REFERENCES experiments(name),
    name TEXT NOT NULL,
    axes TEXT NOT NULL,
    resources TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'pending',
    reason TEXT,
    backend TEXT,
    job_id TEXT,
    test_job_id TEXT,
    submission_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    claim_pid INTEGER,
    claim_host TEXT,
    claimed_at TEXT,
    submitted_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_experiment ON runs(experiment);
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    attempt INTEGER NOT NULL,
    lr REAL,
    state TEXT NOT NULL,
    reason TEXT,
    job_id TEXT,
    submission_id TEXT,
    started_at TEXT,
    ended_at TEXT,
    PRIMARY KEY (run_id, attempt)
);
CREATE TABLE IF NOT EXISTS submissions (
    id TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    backend TEXT NOT NULL,
    folder TEXT NOT NULL,
    pid INTEGER,
    host TEXT,
    n_runs INTEGER,
    info TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    experiment TEXT,
    run_id TEXT,
    kind TEXT NOT NULL,
    old_state TEXT,
    new_state TEXT,
    message TEXT
);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id);
CREATE TABLE IF NOT EXISTS tests (
    test_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    experiment TEXT NOT NULL,
    name TEXT NOT NULL,
    axes TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    reason TEXT,
    backend TEXT,
    job_id TEXT,
    after_job_id TEXT,
    submission_id TEXT,
    claim_pid INTEGER,
    claim_host TEXT,
    claimed_at TEXT,
    submitted_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tests_run ON tests(run_id);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def hostname() -> str:
    return socket.gethostname()


class Registry:
    """`Registry(ws)` opens (and creates) ``<ws>/registry.sqlite``."""

    def __init__(self, ws, timeout_s: float = 60.0, read_only: bool = False):
        from ssflctl.errors import UserError
        from ssflctl.registry import rebuild

        self.ws = Path(ws)
        self.path = self.ws / "registry.sqlite"
        self.read_only = read_only
        self.timeout_s = timeout_s
        if read_only:
            # a colleague's workspace we may read but not write: no WAL switch, no schema, no writes
            if not self.path.exists():
                raise UserError(f"{self.path}: no registry here; submit an experiment first")
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout_s,
                                        isolation_level=None)
            try:
                self.conn.execute("SELECT 1 FROM runs LIMIT 1")
            except sqlite3.DatabaseError:
                # a WAL database in a directory we cannot write: SQLite cannot make its -shm file;
                # read it as an immutable snapshot instead (documented URI parameter, SQLite >= 3.8)
                self.conn.close()
                self.conn = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True,
                                            timeout=timeout_s, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            why = rebuild.problem(self.conn, existed=True)
            if why:
                self.conn.close()
                raise UserError(f"{self.path} is damaged ({why}); it cannot be rebuilt by a user who may not write "
                                "the workspace: its owner's next ssflctl command keeps it aside and rebuilds it from "
                                "the run directories")
            return
        try:
            self.ws.mkdir(parents=True, exist_ok=True)
            if not self.ws.is_dir():
                raise NotADirectoryError(20, "not a directory", str(self.ws))
        except OSError as exc:
            raise UserError(f"{self.ws}: cannot create the workspace here ({exc.strerror or exc}); pass another "
                            "--workspace (or set SSFLCTL_WORKSPACE), or ask for write access") from None
        try:
            existed = self.path.exists() and self.path.stat().st_size > 0
            try:
                self._connect()
                why = rebuild.problem(self.conn, existed)
            except sqlite3.DatabaseError as exc:
                if not rebuild.is_damage(exc):
                    raise
                why = str(exc)
            if why:
                self._repair(why)
            else:
                self._schema()
                missing = rebuild.missing_runs(self, self.ws)
                if missing:
                    n = rebuild.import_runs(self, self.ws, missing)
                    self._note(f"{self.path}: {n} run{'s' if n != 1 else ''} with a run directory had no registry row "
                               "(a truncated or replaced registry?); added from the run directories")
        except (sqlite3.OperationalError, PermissionError) as exc:
            if isinstance(exc, sqlite3.OperationalError) and not any(
                    m in str(exc) for m in ("readonly", "read-only", "unable to open", "disk I/O")):
                raise
            raise UserError(f"{self.path}: cannot write the registry ({exc}); this command changes the "
                            "workspace: run it as a user who may write it (read-only commands such as "
                            "`ssflctl status` work without)") from None

    def _connect(self) -> None:
        self.conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
        self._retry(lambda: self.conn.execute("PRAGMA journal_mode = WAL"))
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("PRAGMA foreign_keys = ON")

    def _schema(self) -> None:
        with self.transaction() as c:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)

    @staticmethod
    def _note(line: str) -> None:
        import sys

        sys.stderr.write(f"note: {line}\n")

    def _repair(self, why: str) -> None:
        """The registry file is damaged: keep it aside (renamed, with its -wal/-shm) and rebuild a new
        one from the run directories. Under a lock file, so two commands opening it at once repair it
        once (the second finds the new file sound)."""
        import fcntl

        from ssflctl.registry import rebuild

        with contextlib.suppress(Exception):
            self.conn.close()
        with open(self.ws / ".registry.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._connect()
                still = rebuild.problem(self.conn, self.path.exists() and self.path.stat().st_size > 0)
            except sqlite3.DatabaseError as exc:
                if not rebuild.is_damage(exc):
                    raise
                still = str(exc)
            if not still:  # another command repaired it meanwhile
                self._schema()
                return
            with contextlib.suppress(Exception):
                self.conn.close()
            aside = self.path.with_name(f"registry.sqlite.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            self._connect()
            self._schema()
            n = rebuild.import_runs(self, self.ws, rebuild.missing_runs(self, self.ws))
        self._note(f"{self.path} was damaged ({why}); kept it as {aside.name}; rebuilt the registry from {n} run "
                   f"director{'ies' if n != 1 else 'y'}")

    @classmethod
    def for_reading(cls, ws) -> "Registry":
        """Open for a command that only reads (status, report, logs): read-only when the workspace
        or its database cannot be written by this user (reconcile then computes without writing)."""
        return cls(ws, read_only=not cls.writable(ws))

    @staticmethod
    def writable(ws) -> bool:
        """Whether this user may write the workspace's registry (the directory and the database)."""
        ws = Path(ws)
        path = ws / "registry.sqlite"
        return os.access(ws, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))

    @staticmethod
    def _retry(fn, tries: int = 50):
        for i in range(tries):
            try:
                return fn()
            except sqlite3.OperationalError as exc:  # journal_mode switch can race with another opener
                if "locked" not in str(exc) or i == tries - 1:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error). Nested calls join the outer one."""
        if self.conn.in_transaction:
            yield self.conn
            return
        self._retry(lambda: self.conn.execute("BEGIN IMMEDIATE"))
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # ---------------------------------------------------------------- experiments
    def upsert_experiment(self, name: str, spec_path: str = "", description: str = "") -> None:
        with self.transaction() as c:
            t = now()
            c.execute(
                "INSERT INTO experiments(name, spec_path, description, created_at, updated_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET spec_path=excluded.spec_path, description=excluded.description, "
                "updated_at=excluded.updated_at",
                (name, spec_path, description, t, t),
            )

    def experiments(self) -> List[str]:
        return [r["name"] for r in self.conn.execute("SELECT name FROM experiments ORDER BY name")]

    # ---------------------------------------------------------------- runs
    def ensure_run(self, run_id: str, experiment: str, name: str, axes: Dict[str, Any],
                   resources: Optional[Dict[str, Any]] = None) -> sqlite3.Row:
        with self.transaction() as c:
            row = c.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                t = now()
                c.execute(
                    "INSERT INTO runs(run_id, experiment, name, axes, resources, state, created_at, updated_at) "
                    "VALUES (?,?,?,?,?, 'pending', ?, ?)",
                    (run_id, experiment, name, json.dumps(axes, sort_keys=True), json.dumps(resources or {}), t, t),
                )
                self.event("registered", run_id=run_id, experiment=experiment, new_state="pending")
                row = c.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
            elif resources is not None:
                c.execute("UPDATE runs SET resources=? WHERE run_id=?", (json.dumps(resources), run_id))
            return row

    def get_run(self, run_id: str) -> Optional[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()

    def run_rows(self, experiment: Optional[str] = None) -> List[sqlite3.Row]:
        if experiment:
            return list(self.conn.execute("SELECT * FROM runs WHERE experiment=? ORDER BY created_at, run_id",
                                          (experiment,)))
        return list(self.conn.execute("SELECT * FROM runs ORDER BY experiment, created_at, run_id"))

    def update_run(self, run_id: str, state: Optional[str] = None, reason: Optional[str] = None,
                   event: Optional[str] = None, **fields: Any) -> bool:
        """Update a run; a state change is written to the events table. Returns True if it changed."""
        if state is not None and state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}")
        with self.transaction():
            row = self._update_row("runs", "run_id", run_id, state, reason, {
                k: json.dumps(val) if isinstance(val, (dict, list)) else val for k, val in fields.items()})
            changed = state is not None and state != row["state"]
            if changed or event:
                self.event(event or "state", run_id=run_id, experiment=row["experiment"],
                           old_state=row["state"], new_state=state or row["state"], message=reason)
            return changed

    def _update_row(self, table: str, key: str, value: str, state: Optional[str], reason: Optional[str],
                    fields: Dict[str, Any]) -> sqlite3.Row:
        """The UPDATE of update_run and update_test, in the caller's transaction: ``updated_at``, then
        ``state`` and ``reason`` when given, then ``fields`` as they are, on the row of ``table`` whose
        ``key`` is ``value``. Returns its state, run_id and experiment as they were (KeyError: no row)."""
        row = self.conn.execute(f"SELECT state, run_id, experiment FROM {table} WHERE {key}=?", (value,)).fetchone()
        if row is None:
            raise KeyError(value)
        given = {k: v for k, v in (("state", state), ("reason", reason)) if v is not None}
        sets = ", ".join(f"{k}=?" for k in ("updated_at", *given, *fields))
        self.conn.execute(f"UPDATE {table} SET {sets} WHERE {key}=?", (now(), *given.values(), *fields.values(), value))
        return row

    def find_runs(self, target: str) -> List[sqlite3.Row]:
        """An experiment name, a run id, a run name, or a unique run-id prefix."""
        rows = self.run_rows(target) if target in self.experiments() else []
        if rows:
            return rows
        exact = self.get_run(target)
        if exact is not None:
            return [exact]
        named = list(self.conn.execute("SELECT * FROM runs WHERE name=? ORDER BY created_at", (target,)))
        if named:
            return named
        esc = target.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return list(self.conn.execute("SELECT * FROM runs WHERE run_id LIKE ? ESCAPE '\\' ORDER BY run_id",
                                      (esc + "%",)))

    # ---------------------------------------------------------------- test cells (test_matrix)
    def ensure_test(self, test_id: str, run_id: str, experiment: str, name: str,
                    axes: Dict[str, Any]) -> sqlite3.Row:
        with self.transaction() as c:
            row = c.execute("SELECT * FROM tests WHERE test_id=?", (test_id,)).fetchone()
            if row is None:
                t = now()
                c.execute("INSERT INTO tests(test_id, run_id, experiment, name, axes, state, created_at, updated_at) "
                          "VALUES (?,?,?,?,?, 'pending', ?, ?)",
                          (test_id, run_id, experiment, name, json.dumps(axes, sort_keys=True), t, t))
                row = c.execute("SELECT * FROM tests WHERE test_id=?", (test_id,)).fetchone()
            return row

    def get_test(self, test_id: str) -> Optional[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM tests WHERE test_id=?", (test_id,)).fetchone()

    def test_rows(self, experiment: Optional[str] = None, run_id: Optional[str] = None) -> List[sqlite3.Row]:
        if run_id:
            return list(self.conn.execute("SELECT * FROM tests WHERE run_id=? ORDER BY created_at, test_id",
                                          (run_id,)))
        if experiment:
            return list(self.conn.execute("SELECT * FROM tests WHERE experiment=? ORDER BY created_at, test_id",
                                          (experiment,)))
        return list(self.conn.execute("SELECT * FROM tests ORDER BY experiment, created_at, test_id"))

    def update_test(self, test_id: str, state: Optional[str] = None, reason: Optional[str] = None,
                    event: Optional[str] = None, **fields: Any) -> bool:
        """Update a test cell; a state change is an event of its run (message ``test <id>: ...``)."""
        if state is not None and state not in RUN_STATES:
            raise ValueError(f"unknown test state {state!r}")
        with self.transaction():
            row = self._update_row("tests", "test_id", test_id, state, reason, fields)
            changed = state is not None and state != row["state"]
            if changed or event:
                self.event(event or "test", run_id=row["run_id"], experiment=row["experiment"],
                           old_state=row["state"], new_state=state or row["state"],
                           message=f"test {test_id}" + (f": {reason}" if reason else ""))
            return changed

    def test_job_ids_ever(self, run_id: str) -> List[tuple]:
        """Every (test id, job id, submission id, backend) the run's test cells ever had, oldest
        first: each submission's ``test_jobs`` (recorded when the scheduler took them, or when a
        reconcile adopted them) and each cell's current job."""
        rows = {r["test_id"]: r for r in self.test_rows(run_id=run_id)}
        if not rows:
            return []
        seen: Dict[str, tuple] = {}
        for sub in self.conn.execute("SELECT id, backend, info FROM submissions ORDER BY created_at"):
            got = json.loads(sub["info"] or "{}").get("test_jobs") or {}
            for tid, jid in got.items():
                if tid in rows and jid and str(jid) not in seen:
                    seen[str(jid)] = (tid, str(jid), sub["id"], sub["backend"])
        for tid, r in rows.items():
            if r["job_id"] and str(r["job_id"]) not in seen:
                seen[str(r["job_id"])] = (tid, str(r["job_id"]), r["submission_id"], r["backend"])
        return list(seen.values())

    def list_tests(self, experiment: Optional[str] = None) -> List[Dict[str, Any]]:
        return [dict(r, axes=json.loads(r["axes"])) for r in self.test_rows(experiment)]

    # ---------------------------------------------------------------- attempts
    def upsert_attempt(self, run_id: str, attempt: int, **fields: Any) -> None:
        with self.transaction() as c:
            row = c.execute("SELECT * FROM attempts WHERE run_id=? AND attempt=?", (run_id, attempt)).fetchone()
            if row is None:
                fields.setdefault("state", "pending")
                cols = ["run_id", "attempt", *fields]
                c.execute(f"INSERT INTO attempts({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                          (run_id, attempt, *fields.values()))
            elif fields:
                fields = {k: v for k, v in fields.items() if row[k] != v}
                if fields:
                    c.execute(f"UPDATE attempts SET {', '.join(f'{k}=?' for k in fields)} WHERE run_id=? AND attempt=?",
                              (*fields.values(), run_id, attempt))

    def close_attempt(self, run_id: str, attempt: int, state: str, reason: str) -> bool:
        """Close the attempt's row if it is still open (pending, queued, running): an attempt that
        will not run or go on (its job never reached the scheduler, was cancelled, or is gone).
        Returns True if a row was closed (the events table says why)."""
        with self.transaction() as c:
            row = c.execute("SELECT a.state, r.experiment FROM attempts a JOIN runs r USING(run_id) "
                            "WHERE a.run_id=? AND a.attempt=?", (run_id, attempt)).fetchone()
            if row is None or row["state"] not in ("pending", "queued", "running", "submitting"):
                return False
            c.execute("UPDATE attempts SET state=?, reason=?, ended_at=COALESCE(ended_at, ?) "
                      "WHERE run_id=? AND attempt=?", (state, reason, now(), run_id, attempt))
            self.event("attempt", run_id=run_id, experiment=row["experiment"], old_state=row["state"],
                       new_state=state, message=f"attempt {attempt} · {reason}")
            return True

    def attempts(self, run_id: str) -> List[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM attempts WHERE run_id=? ORDER BY attempt", (run_id,)))

    def attempts_by_run(self, experiment: Optional[str] = None) -> Dict[str, List[sqlite3.Row]]:
        """{run id: its attempts in order} of every run (of ``experiment``) in one query."""
        q = "SELECT * FROM attempts"
        if experiment:
            q += " WHERE run_id IN (SELECT run_id FROM runs WHERE experiment=?)"
        out: Dict[str, List[sqlite3.Row]] = {}
        for a in self.conn.execute(q + " ORDER BY run_id, attempt", (experiment,) if experiment else ()):
            out.setdefault(a["run_id"], []).append(a)
        return out

    def job_ids_ever(self, run_id: str) -> List[tuple]:
        """Every (job id, submission id, backend) the run ever had, oldest first: its attempts'
        train jobs, every submission's train and test job for it, and its current ones."""
        seen: Dict[str, tuple] = {}

        def add(jid, sid, backend):
            if jid and (str(jid) not in seen or (sid and not seen[str(jid)][1])):
                seen[str(jid)] = (str(jid), sid, backend)

        row = self.get_run(run_id)
        subs = {r["id"]: r for r in self.conn.execute(
            "SELECT id, backend, info FROM submissions ORDER BY created_at")}
        for a in self.attempts(run_id):
            add(a["job_id"], a["submission_id"], subs[a["submission_id"]]["backend"]
                if a["submission_id"] in subs else (row["backend"] if row is not None else None))
        for sid, sub in subs.items():
            got = (json.loads(sub["info"] or "{}").get("jobs") or {}).get(run_id) or []
            for jid in got:
                add(jid, sid, sub["backend"])
        if row is not None:
            add(row["job_id"], row["submission_id"], row["backend"])
            add(row["test_job_id"], row["submission_id"], row["backend"])
        return list(seen.values())

    # ---------------------------------------------------------------- submissions / events
    def add_submission(self, sid: str, experiment: str, backend: str, folder: str, n_runs: int,
                       info: Optional[Dict[str, Any]] = None) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO submissions(id, experiment, backend, folder, pid, host, n_runs, info, created_at) "
                      "VALUES (?,?,?,?,?,?,?,?,?)",
                      (sid, experiment, backend, folder, os.getpid(), hostname(), n_runs, json.dumps(info or {}), now()))

    def update_submission(self, sid: str, info: Dict[str, Any]) -> None:
        with self.transaction() as c:
            row = c.execute("SELECT info FROM submissions WHERE id=?", (sid,)).fetchone()
            merged = dict(json.loads(row["info"]) if row else {})
            merged.update(info)
            c.execute("UPDATE submissions SET info=? WHERE id=?", (json.dumps(merged), sid))

    def add_test_jobs(self, sid: str, jobs: Dict[str, str]) -> None:
        """Add ``{test id: job id}`` to the submission's ``test_jobs`` (every test job it sent)."""
        with self.transaction() as c:
            row = c.execute("SELECT info FROM submissions WHERE id=?", (sid,)).fetchone()
            if row is None:
                return
            info = json.loads(row["info"] or "{}")
            info["test_jobs"] = dict(info.get("test_jobs") or {}, **{k: v for k, v in jobs.items() if v})
            c.execute("UPDATE submissions SET info=? WHERE id=?", (json.dumps(info), sid))

    def submission(self, sid: str) -> Optional[Dict[str, Any]]:
        row = self.conn.execute("SELECT * FROM submissions WHERE id=?", (sid,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["info"] = json.loads(out["info"] or "{}")
        return out

    def submissions(self, experiment: Optional[str] = None) -> List[Dict[str, Any]]:
        q = "SELECT id FROM submissions" + (" WHERE experiment=?" if experiment else "") + " ORDER BY created_at"
        return [self.submission(r["id"]) for r in self.conn.execute(q, (experiment,) if experiment else ())]

    def event(self, kind: str, run_id: Optional[str] = None, experiment: Optional[str] = None,
              old_state: Optional[str] = None, new_state: Optional[str] = None, message: Optional[str] = None) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO events(at, experiment, run_id, kind, old_state, new_state, message) "
                      "VALUES (?,?,?,?,?,?,?)", (now(), experiment, run_id, kind, old_state, new_state, message))

    def events(self, run_id: Optional[str] = None) -> List[Dict[str, Any]]:
        if run_id:
            rows = self.conn.execute("SELECT * FROM events WHERE run_id=? ORDER BY id", (run_id,))
        else:
            rows = self.conn.execute("SELECT * FROM events ORDER BY id")
        return [dict(r) for r in rows]

    # ---------------------------------------------------------------- the report's view
    def list_runs(self, experiment: Optional[str] = None) -> List[Dict[str, Any]]:
        """Every run as in docs/design.md: run_id, experiment, name, axes, state, reason, job_id, attempts."""
        out = []
        attempts = self.attempts_by_run(experiment)  # one query, not one per run
        for r in self.run_rows(experiment):
            out.append({
                "run_id": r["run_id"], "experiment": r["experiment"], "name": r["name"],
                "axes": json.loads(r["axes"]), "state": r["state"], "reason": r["reason"], "job_id": r["job_id"],
                "test_job_id": r["test_job_id"], "backend": r["backend"],
                "resources": json.loads(r["resources"] or "{}"),
                "attempts": [
                    {"attempt": a["attempt"], "lr": a["lr"], "state": a["state"], "reason": a["reason"],
                     "job_id": a["job_id"], "started_at": a["started_at"], "ended_at": a["ended_at"]}
                    for a in attempts.get(r["run_id"], ())
                ],
            })
        return out
