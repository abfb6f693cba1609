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

    def recover(self, folder: Path) -> Dict[str, Dict[str, Optional[str]]]:
        """Job ids of a submission whose submit process died between sending and recording them."""
        return {}

    def job_output(self, job: JobRef) -> Optional[Path]:
        """The job's stdout/stderr file (for ``ssflctl logs`` before mmengine's log exists)."""
        return None

    def describe_where(self, options: Dict[str, Any]) -> str:
        """One phrase for the plan's executor column."""
        return self.name


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
