"""An in-memory scheduler for tests of the plan and reconcile logic (like dora's fake shepherd).

Jobs live in a dict of this process; a test moves them between states with :meth:`FakeBackend.set`
and plays the node by writing run-directory files through :mod:`ssflctl.workdir`. ``fail_queries``
makes every query answer UNKNOWN (a scheduler that does not answer); ``refuse`` makes submit fail
as sbatch does when it refuses, ``refuse_cancel`` makes cancel fail as scancel does; ``scheduler_limits``
(a `Limits`) is what the scheduler allows, so a test can plan a submission that exceeds it (split into
arrays, or refused at plan time). :meth:`FakeBackend.recover_tests` finds the test jobs a submit sent
from a folder (as Slurm finds them by name); ``unrunnable`` ({job id: why}) makes one of them a job
that cannot run.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional

from ssflctl.backends.base import Backend, JobKind, JobStatus, Limits
from ssflctl.errors import UserError


class FakeBackend(Backend):
    name = "fake"

    def __init__(self):
        self.jobs: Dict[str, JobStatus] = {}
        self.submitted: List[Dict[str, object]] = []   # one entry per submit call
        self.tests_submitted: List[Dict[str, object]] = []  # one entry per submit_tests call
        self.cancelled: List[str] = []
        self.fail_queries: Optional[str] = None
        self.refuse: Optional[str] = None
        self.refuse_cancel: Optional[str] = None
        self.unrunnable: Dict[str, str] = {}
        self.scheduler_limits = Limits()
        self._ids = itertools.count(100)

    def reset(self) -> None:
        self.__init__()

    def limits(self, options):
        return self.scheduler_limits

    def submit(self, tasks, folder, options, fns=None):
        if self.refuse:
            raise UserError(f"sbatch refused the submission: {self.refuse}")
        tasks = list(tasks)
        if any(t.array is None for t in tasks):
            self.plan_arrays(tasks, options)
        out = {}
        arrays = []
        for a in sorted({t.array for t in tasks}):
            base, test_base = str(next(self._ids)), str(next(self._ids))
            members = [t for t in tasks if t.array == a]
            arrays.append([t.run_id for t in members])
            for i, t in enumerate(members):
                jid, tid = f"{base}_{i}", (f"{test_base}_{i}" if t.test else None)
                self.jobs[jid] = JobStatus(jid, JobKind.QUEUED, raw="PENDING")
                if tid:
                    self.jobs[tid] = JobStatus(tid, JobKind.QUEUED, raw="PENDING", reason="Dependency")
                out[t.run_id] = {"job_id": jid, "test_job_id": tid}
        self.submitted.append({"folder": str(folder), "run_ids": [t.run_id for t in tasks], "ids": out,
                               "arrays": arrays})
        return out

    def submit_tests(self, tests, folder, options, fns=None):
        """One array for the test cells; ``tests_submitted`` keeps each call's cells and waits."""
        if self.refuse:
            raise UserError(f"sbatch refused the submission: {self.refuse}")
        base = str(next(self._ids))
        out = {}
        for i, t in enumerate(tests):
            jid = f"{base}_{i}"
            self.jobs[jid] = JobStatus(jid, JobKind.QUEUED, raw="PENDING", reason="Dependency" if t.after else "")
            out[t.test_id] = jid
        self.tests_submitted.append({"folder": str(folder), "test_ids": [t.test_id for t in tests],
                                     "after": {t.test_id: t.after for t in tests}, "ids": out})
        return out

    def set(self, job_id: str, kind: JobKind, raw: str = "", **kw) -> None:
        self.jobs[job_id] = JobStatus(job_id, kind, raw=raw or kind.value.upper(), **kw)

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def query(self, jobs):
        out = {}
        for j in jobs:
            if self.fail_queries:
                out[j.job_id] = JobStatus(j.job_id, JobKind.UNKNOWN, error=self.fail_queries)
            else:
                out[j.job_id] = self.jobs.get(j.job_id) or JobStatus(j.job_id, JobKind.GONE)
        return out

    def recover_tests(self, folder) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for sent in self.tests_submitted:
            if sent["folder"] == str(folder):
                for tid, jid in sent["ids"].items():
                    out[tid] = {"job_id": jid, "after": sent["after"][tid],
                                "problems": [self.unrunnable[jid]] if jid in self.unrunnable else []}
        return out

    def cancel(self, jobs):
        jobs = list(jobs)
        if self.refuse_cancel and jobs:
            raise UserError(f"scancel {' '.join(j.job_id for j in jobs)} failed: {self.refuse_cancel}")
        for j in jobs:
            self.cancelled.append(j.job_id)
            st = self.jobs.get(j.job_id)
            if st is not None and st.kind in (JobKind.QUEUED, JobKind.HELD, JobKind.RUNNING):
                self.jobs[j.job_id] = JobStatus(j.job_id, JobKind.CANCELLED, raw="CANCELLED")

    def alive(self) -> List[str]:
        return [j for j, s in self.jobs.items() if s.kind in (JobKind.QUEUED, JobKind.HELD, JobKind.RUNNING)]
