"""The backend interface: what ssflctl asks of a scheduler, and the registry of backends by name.

A backend sends a submission's runs out (train jobs, then test jobs that wait for them), says
what became of its jobs, cancels them, and finds the jobs of a submit that was killed before it
recorded their ids. ``slurm`` and ``local`` are registered here by name, the way submitit keeps
one ``Executor`` abstraction with its backends registered by name (submitit 1.5,
``submitit/auto/auto.py``); ``fake`` (tests) registers itself. No code outside ``backends/``
names a backend.

Job states are reduced to :class:`JobKind`; the scheduler's own words stay in
:attr:`JobStatus.raw` and :attr:`JobStatus.reason`. A query that failed is never an empty answer:
every job asked about comes back :attr:`JobKind.UNKNOWN` with ``error`` saying which command
failed and how.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from ssflctl.errors import UserError

#: the variables that set a run's BLAS/OpenMP threads to its cpus, on every backend
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

#: the job callables (``module:function``) run on the node
TRAIN_FN = "ssflctl.node.job:train_run"
TEST_FN = "ssflctl.node.job:test_run"
TRAIN_AND_TEST_FN = "ssflctl.node.job:train_and_test"
#: a test cell's job (test_matrix): tests the run's finished attempt under the cell's settings
TEST_CELL_FN = "ssflctl.node.job:test_cell_run"


class JobKind(str, Enum):
    QUEUED = "queued"        # waiting (pending, requeued, configuring)
    HELD = "held"            # waiting and will not start by waiting (a hold, a reason that never clears)
    RUNNING = "running"
    COMPLETED = "completed"  # ended with exit code 0
    FAILED = "failed"        # ended otherwise (error, time limit, node failure, out of memory, preempted)
    CANCELLED = "cancelled"
    GONE = "gone"            # the scheduler answered and has no record of the job
    UNKNOWN = "unknown"      # the scheduler could not be asked (``error`` says why)

    def __str__(self) -> str:
        return self.value


WAITING = (JobKind.QUEUED, JobKind.HELD)
ALIVE = (JobKind.QUEUED, JobKind.HELD, JobKind.RUNNING, JobKind.UNKNOWN)


@dataclass
class JobStatus:
    """What the scheduler says of one job."""
    job_id: str
    kind: JobKind
    raw: str = ""                    # the scheduler's own state word (PENDING, TIMEOUT, lost, ...)
    reason: str = ""                 # a pending reason or the scheduler's note
    hint: str = ""                   # what the user can do, when waiting will not help
    exit_code: str = ""
    elapsed: str = ""                # [D-]HH:MM:SS as sacct prints it
    name: str = ""
    error: str = ""                  # UNKNOWN: the failing query and its message
    extra: Dict[str, Any] = field(default_factory=dict)

    def describe(self, what: str = "job") -> str:
        """``train job 77 TIMEOUT (exit 0:15)``."""
        bits = f"{what} {self.job_id} {self.raw or self.kind.value}"
        if self.exit_code and self.kind in (JobKind.FAILED, JobKind.COMPLETED, JobKind.CANCELLED):
            bits += f" (exit {self.exit_code})"
        if self.reason:
            bits += f": {self.reason}"
        return bits


@dataclass
class JobRef:
    """A job as the registry remembers it: its id and the submission folder it was sent from."""
    job_id: str
    folder: Optional[Path] = None
    name_hint: str = ""              # the submission id its scheduler name must contain


@dataclass
class Task:
    """One run to send out: ``{"run_id", "run_dir", "resources", "test"}``."""
    run_id: str
    run_dir: str
    resources: Dict[str, Any]
    test: bool = True
    array: Optional[int] = None      # which of the submission's arrays (Backend.plan_arrays); None: not planned


@dataclass
class Limits:
    """What a scheduler lets one submission send (None: no limit known). Slurm: ``MaxArraySize``
    (tasks per array, indices 0..N-1) and ``MaxJobCount`` (jobs slurmctld holds) from ``scontrol
    show config``; the user's ``MaxSubmitJobs`` (association MaxSubmit, QOS MaxSubmitJobsPerUser)
    from ``sacctmgr`` where readable, against the user's jobs already in the queue."""
    max_array_size: Optional[int] = None
    max_job_count: Optional[int] = None
    jobs_in_system: Optional[int] = None     # all jobs slurmctld holds now (count against max_job_count)
    max_submit_jobs: Optional[int] = None
    submit_source: str = ""                  # where max_submit_jobs comes from ("QOS gpulab02 MaxSubmitPU")
    jobs_queued: Optional[int] = None        # the user's jobs in the queue now (count against max_submit_jobs)
    notes: List[str] = field(default_factory=list)  # limits that could not be read, and why


def split_tasks(tasks: List[Any], key, size: Optional[int]) -> List[List[Any]]:
    """The arrays of a submission: tasks grouped by ``key(task)`` (one array per resource request),
    each group cut into arrays of at most ``size`` tasks (None: no limit), in submission order."""
    groups: Dict[str, List[Any]] = {}
    for t in tasks:
        groups.setdefault(key(t), []).append(t)
    out: List[List[Any]] = []
    for group in groups.values():
        step = max(1, int(size)) if size else len(group) or 1
        out.extend(group[i:i + step] for i in range(0, len(group), step))
    return out


def capacity_problem(n_train: int, n_test: int, limits: Limits) -> Optional[str]:
    """Why the scheduler cannot take ``n_train`` train + ``n_test`` test jobs now (None: it can).
    Every array task is one job for MaxSubmitJobs and MaxJobCount."""
    n = n_train + n_test
    what = f"{n_train} train + {n_test} test jobs" if n_test else f"{n_train} train jobs"
    if limits.max_submit_jobs is not None:
        queued = limits.jobs_queued or 0
        room = limits.max_submit_jobs - queued
        if n > room:
            return (f"this submission needs {n} jobs ({what}) but {limits.submit_source or 'MaxSubmitJobs'} allows "
                    f"{limits.max_submit_jobs} per user and {queued} of yours are in the queue (room for {max(0, room)}); "
                    "submit fewer runs at once (e.g. part of the seeds; `submit` skips runs already queued or done), "
                    "or wait for jobs to end")
    if limits.max_job_count is not None:
        held = limits.jobs_in_system or 0
        room = limits.max_job_count - held
        if n > room:
            return (f"this submission needs {n} jobs ({what}) but the cluster's MaxJobCount is {limits.max_job_count} "
                    f"and it holds {held} jobs now (room for {max(0, room)}); submit fewer runs at once or wait")
    return None


@dataclass
class TestTask:
    """One test cell to send out (test_matrix): its definition file ``cell`` (in the run dir), and
    the train job it waits for (``after``, None when the run is trained; ``after_folder``: the
    submission folder that job was sent from)."""
    test_id: str
    run_id: str
    run_dir: str
    cell: str
    resources: Dict[str, Any]
    after: Optional[str] = None
    after_folder: Optional[str] = None


TestTask.__test__ = False  # not a pytest class


class Backend:
    """One scheduler. Subclasses set :attr:`name` and implement the methods."""

    name = ""
    #: the test step runs in the train job's own process (no separate test job)
    test_in_train_job = False

    def check_available(self, where: str = "") -> None:
        """Raise UserError when this backend cannot submit from here (e.g. no sbatch on PATH)."""

    def submit(self, tasks: List[Task], folder: Path, options: Dict[str, Any],
               fns: Optional[Dict[str, str]] = None) -> Dict[str, Dict[str, Optional[str]]]:
        """Send the tasks out; per run id ``{"job_id", "test_job_id"}``. UserError when refused."""
        raise NotImplementedError

    def submit_tests(self, tests: List[TestTask], folder: Path, options: Dict[str, Any],
                     fns: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Send the test cells' jobs out, each after its ``after`` job succeeded; per test id its job
        id. UserError when refused."""
        raise UserError(f"executor {self.name}: test_matrix is not supported by this backend")

    def query(self, jobs: Iterable[JobRef]) -> Dict[str, JobStatus]:
        """Status of each job id. Never raises for a scheduler failure: UNKNOWN with ``error``."""
        raise NotImplementedError

    def cancel(self, jobs: Iterable[JobRef]) -> None:
        """Cancel the jobs (already ended ones are fine). UserError when the scheduler refuses."""
        raise NotImplementedError

    def recover(self, folder: Path) -> Dict[str, Dict[str, Any]]:
        """Job ids of a submission whose submit process died between sending and recording them:
        per run id ``{"job_id", "test_job_id", "problems"}``, ``problems`` (optional) saying why a job
        found cannot run (e.g. the files the scheduler's job reads were never written)."""
        return {}

    def recover_tests(self, folder: Path) -> Dict[str, Dict[str, Any]]:
        """The test-cell jobs of a submission whose submit process died between sending and recording
        them (``folder``: the submission's test folder, where :meth:`submit_tests` sent them): per test
        id ``{"job_id", "after", "problems"}``; ``after`` is the train job it waits for (None: none),
        ``problems`` (optional) why the job cannot run."""
        return {}

    def job_output(self, job: JobRef) -> Optional[Path]:
        """The job's stdout/stderr file (for ``ssflctl logs`` before mmengine's log exists)."""
        return None

    def describe_where(self, options: Dict[str, Any]) -> str:
        """One phrase for the plan's executor column."""
        return self.name

    def limits(self, options: Dict[str, Any]) -> Limits:
        """What the scheduler allows one submission (read when a submission is planned)."""
        return Limits()

    def plan_arrays(self, tasks: List[Task], options: Dict[str, Any],
                    limits: Optional[Limits] = None) -> List[List[Task]]:
        """The train arrays ``submit`` sends (each within the scheduler's array size; the test arrays
        match them task for task). UserError, before anything is rendered or sent, when the
        submission needs more jobs than the scheduler takes now: the number and the limit."""
        limits = self.limits(options) if limits is None else limits
        problem = capacity_problem(len(tasks), sum(1 for t in tasks if t.test and not self.test_in_train_job), limits)
        if problem:
            raise UserError(f"{self.name}: {problem}")
        import json

        arrays = split_tasks(list(tasks), lambda t: json.dumps(t.resources, sort_keys=True), limits.max_array_size)
        for i, arr in enumerate(arrays):
            for t in arr:
                t.array = i
        return arrays


_REGISTRY: Dict[str, str] = {
    "slurm": "ssflctl.backends.slurm:SlurmBackend",
    "local": "ssflctl.backends.local:LocalBackend",
    "fake": "ssflctl.backends.fake:FakeBackend",
}
_INSTANCES: Dict[str, Backend] = {}


def register(name: str, target: str) -> None:
    """Register a backend class (``module:Class``) under ``name``."""
    _REGISTRY[name] = target
    _INSTANCES.pop(name, None)


def names() -> List[str]:
    return [n for n in _REGISTRY if n != "fake"]


def get(name: Optional[str]) -> Backend:
    """The backend registered as ``name`` (imported on first use: slurm imports submitit)."""
    if name not in _REGISTRY:
        raise UserError(f"executor: expected one of {', '.join(names())}, got {name!r}")
    if name not in _INSTANCES:
        mod, _, cls = _REGISTRY[name].partition(":")
        _INSTANCES[name] = getattr(importlib.import_module(mod), cls)()
    return _INSTANCES[name]
