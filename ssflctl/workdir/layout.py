"""The run directory: the only code that knows its layout and opens its files by name.

::

    <ws>/runs/<run_id>/                     RunDir
      run.json                              RunRecord (ssflctl submit)
      jobs.json                             each submission's job ids (submit; registry.rebuild reads it)
      test_jobs.json                        each submission's test-cell jobs (submit, reconcile; registry.rebuild)
      attempt-<n>/                          AttemptDir = mmengine work_dir of attempt n
        attempt.json  config.py  provenance.json    (the renderer)
        progress.json outcome.json nan.json recovery.json   (the job; rank 0)
        metrics.json  detections.bbox.json  detections.gt.json   (the test step)
        tests/<test_id>/                    TestDir: one test cell of the experiment's test_matrix on
          metrics.json detections.bbox.json detections.gt.json   this attempt (+ mmengine's test logs)
      tests/<test_id>.json                  TestCellRecord body: the cell's axes and test-time overrides (submit)
        <timestamp>/<timestamp>.log, vis_data/scalars.json, epoch_N.pth, last_checkpoint  (mmengine)
        ranks/<timestamp>.rank<K>.log       (ranks K > 0 of a multi-GPU job: their own logs)

Each file is read at most once per object (properties are cached; make a new object to re-read)
and every write is atomic (``ssflctl.atomic``). Used on both sides: the login node reads, the
node writes; neither needs anything heavier than the standard library. :class:`RunDirCache` keeps
RunDir objects between reads of the same workspace (``status --watch``): a run whose directory,
attempt directories and the files the login node reads are unchanged (stat: inode, size, mtime)
is not read again.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ssflctl import atomic
from ssflctl.workdir import checkpoints
from ssflctl.workdir.records import (AttemptInfo, EffectiveLr, NanRecord, Outcome, Progress, Recovery,
                                     RunRecord, fmt_lr, recovery_list)

PathLike = Union[str, "os.PathLike[str]"]

RUN_JSON = "run.json"
ATTEMPT_JSON = "attempt.json"
CONFIG = "config.py"
PROVENANCE = "provenance.json"
PROGRESS = "progress.json"
OUTCOME = "outcome.json"
NAN = "nan.json"
RECOVERY = "recovery.json"
METRICS = "metrics.json"
DETECTIONS = "detections.bbox.json"
DETECTIONS_GT = "detections.gt.json"
TESTS = "tests"              # run/tests/<test_id>.json (cell definitions), attempt-N/tests/<test_id>/ (results)
RANKS = "ranks"
JOBS = "jobs.json"
TEST_JOBS = "test_jobs.json"
SUBMISSION = "submission.json"
_PREFIX = "attempt-"
#: what the renderer writes in an attempt dir before its job exists; anything else is the job's
RENDERED_FILES = frozenset({ATTEMPT_JSON, CONFIG, PROVENANCE})


def _read(path: PathLike) -> Any:
    try:
        return atomic.read_json(path, default=None)
    except (ValueError, OSError):
        return None


def runs_root(ws: PathLike) -> Path:
    return Path(ws) / "runs"


def _dict_or_none(body: Any) -> Optional[Dict[str, Any]]:
    return body if isinstance(body, dict) else None


class _JsonFile:
    """A JSON file of the directory as an attribute: read on first access, ``parse`` turns its body
    (None when missing or unreadable) into the value, which is kept in the object (each file is read
    at most once per object; a write pops it, see :meth:`_WorkDir._write`)."""

    def __init__(self, filename: str, parse, doc: Optional[str] = None):
        self.filename, self.parse, self.__doc__ = filename, parse, doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.parse(_read(obj._dir + self.filename))
        return value


class _WorkDir:
    """What an attempt dir and a test cell's dir share: an mmengine work_dir whose test step writes
    metrics.json, detections.bbox.json and detections.gt.json."""

    def __init__(self, path: PathLike):
        self._str = os.fspath(path)
        self._dir = self._str + os.sep  # file names are joined as strings (no Path per read)

    @cached_property
    def path(self) -> Path:
        return Path(self._str)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    metrics = _JsonFile(METRICS, _dict_or_none)

    @property
    def has_metrics(self) -> bool:
        return os.path.isfile(self._dir + METRICS)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def detections_path(self) -> Path:
        return self.path / DETECTIONS

    @property
    def gt_path(self) -> Path:
        return self.path / DETECTIONS_GT

    def _write(self, filename: str, body: Any, *cached: str) -> None:
        """Write one file (atomic) and forget the ``cached`` attributes read from it."""
        atomic.write_json(self.path / filename, body)
        for name in cached:
            self.__dict__.pop(name, None)

    def write_metrics(self, body: Dict[str, Any]) -> None:
        self._write(METRICS, body, "metrics")


class AttemptDir(_WorkDir):
    """``attempt-<n>/``: one try of a run, an mmengine work_dir."""

    def __init__(self, path: PathLike, n: Optional[int] = None):
        super().__init__(path)
        if n is None:
            name = os.path.basename(self._str)
            suffix = name[len(_PREFIX):] if name.startswith(_PREFIX) else ""
            n = int(suffix) if suffix.isdigit() else 0
        self.n = int(n)

    def __fspath__(self) -> str:
        return self._str

    # ------------------------------------------------------------------ files (read once)
    info = _JsonFile(ATTEMPT_JSON, lambda body: AttemptInfo.from_json(body) or AttemptInfo(),
                     "attempt.json (an empty AttemptInfo when missing or unreadable)")
    progress = _JsonFile(PROGRESS, Progress.from_json)
    outcome = _JsonFile(OUTCOME, Outcome.from_json)
    recovery = _JsonFile(RECOVERY, recovery_list)

    @property
    def rendered(self) -> bool:
        return os.path.isfile(self._dir + ATTEMPT_JSON)

    @cached_property
    def nan(self) -> Optional[NanRecord]:
        """The guard's nan.json, else outcome.json's ``nan``."""
        rec = NanRecord.from_json(_read(self._dir + NAN))
        if rec is None and self.outcome is not None:
            rec = self.outcome.nan
        return rec

    @property
    def has_detections(self) -> bool:
        return os.path.isfile(self._dir + DETECTIONS)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def lr(self) -> Optional[float]:
        """The config's lr of this attempt (attempt.json: the one a NaN retry lowers), else the NaN
        record's. What the optimizer really trained at is :attr:`effective_lr`."""
        if self.info.lr is not None:
            return self.info.lr
        return self.nan.lr if self.nan is not None else None

    @property
    def effective_lr(self) -> Optional[EffectiveLr]:
        """The base lr the job measured once the optimizer was built (after mmengine's
        auto_scale_lr and any resume): progress.json's, else outcome.json's; None before the job's
        first logging point or outcome, or from an ssflctl that did not record it."""
        prog = self.progress
        if prog is not None and prog.effective_lr is not None:
            return prog.effective_lr
        return self.outcome.effective_lr if self.outcome is not None else None

    def lr_text(self, paren: bool = True) -> str:
        """This attempt's lr for a text view: ``0.01``, or ``0.01→0.00125 (auto_scale_lr)`` when the
        optimizer trained at another base lr (:func:`~ssflctl.workdir.records.fmt_lr_trained`)."""
        eff = self.effective_lr
        if eff is None:
            return fmt_lr(self.lr)
        return eff.text(self.lr, paren=paren)

    # ------------------------------------------------------------------ derived facts
    @property
    def started(self) -> bool:
        """Whether a job ever touched this attempt: anything in it besides what the renderer wrote
        (progress, an outcome, a log, a checkpoint, the light job's env.json)."""
        try:
            with os.scandir(self.path) as it:
                return any(e.name not in RENDERED_FILES and not e.name.startswith(".") for e in it)
        except (FileNotFoundError, NotADirectoryError):
            return False

    @property
    def interrupted(self) -> bool:
        """Ran before (progress or a checkpoint) and has no outcome: requeued, timed out, stopped."""
        return self.outcome is None and (self.progress is not None or self.latest_checkpoint() is not None)

    def resumes(self) -> List[Recovery]:
        return [r for r in self.recovery if r.kind == "resumed"]

    def last_interruption(self) -> Optional[Recovery]:
        """The newest recovery entry when it is an interruption the job did not come back from."""
        return self.recovery[-1] if self.recovery and self.recovery[-1].kind == "interrupted" else None

    def latest_checkpoint(self) -> Optional[str]:
        """See :func:`ssflctl.workdir.checkpoints.latest_checkpoint` (where to continue)."""
        return checkpoints.latest_checkpoint(self.path)

    def last_clean_checkpoint(self, nan_iter: Optional[int]) -> Optional[str]:
        """See :func:`ssflctl.workdir.checkpoints.last_clean_checkpoint` (where to restart after a NaN)."""
        return checkpoints.last_clean_checkpoint(self.path, nan_iter, start_from=self.info.resume_from)

    def text_logs(self) -> List[Path]:
        """mmengine's text logs ``<ts>/<ts>.log``, oldest first (the training log, then the test step's)."""
        return sorted((p for p in self.path.glob("*/*.log") if p.stem == p.parent.name),
                      key=lambda p: p.parent.name)

    def rank_log_path(self, stamp: str, rank: int) -> Path:
        """Where rank ``rank`` (> 0) of a multi-GPU job logs the mmengine start ``stamp``."""
        return self.path / RANKS / f"{stamp}.rank{int(rank)}.log"

    def rank_logs(self, rank: int) -> List[Path]:
        """Rank ``rank``'s text logs, oldest first (rank 0's are :meth:`text_logs`)."""
        if int(rank) == 0:
            return self.text_logs()
        return sorted((self.path / RANKS).glob(f"*.rank{int(rank)}.log"))

    def log_tail(self, lines: int = 40) -> str:
        logs = sorted((p for p in self.path.glob("*/*.log") if p.parent.name != RANKS),
                      key=lambda p: p.stat().st_mtime)
        if not logs:
            return ""
        with open(logs[-1], encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])

    def append_text_log(self, text: str, rank: int = 0, stamp: Optional[str] = None) -> Path:
        """Append ``text`` to rank ``rank``'s newest text log (rank 0: mmengine's ``<ts>/<ts>.log``),
        so ``ssflctl logs`` ends with it; when the job died before mmengine made one, a new
        ``<stamp>/<stamp>.log`` (rank K > 0: ``ranks/<stamp>.rankK.log``) holds it. Returns the file."""
        logs = self.rank_logs(rank)
        if logs:
            path = logs[-1]
        else:
            import time

            stamp = stamp or time.strftime("%Y%m%d_%H%M%S")
            path = self.rank_log_path(stamp, rank) if int(rank) else self.path / stamp / f"{stamp}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
        return path

    # ------------------------------------------------------------------ writes (atomic)
    def write_info(self, info: AttemptInfo) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._write(ATTEMPT_JSON, info.to_json(), "info")

    def write_provenance(self, body: Dict[str, Any]) -> None:
        self._write(PROVENANCE, body)

    def write_progress(self, progress: Progress) -> None:
        self._write(PROGRESS, progress.to_json(), "progress")

    def write_outcome(self, outcome: Outcome) -> None:
        self._write(OUTCOME, outcome.to_json(), "outcome", "nan")

    def write_nan(self, body: Dict[str, Any]) -> None:
        self._write(NAN, body, "nan")

    def append_recovery(self, entry: Recovery) -> None:
        items = [r.to_json() for r in recovery_list(_read(self._dir + RECOVERY))]
        items.append(entry.to_json())
        self._write(RECOVERY, items, "recovery")

    # ------------------------------------------------------------------ test cells (test_matrix)
    def test(self, test_id: str) -> "TestDir":
        """``tests/<test_id>/``: where test cell ``test_id`` of this attempt writes its results."""
        return TestDir(self.path / TESTS / test_id)


class TestDir(_WorkDir):
    """``attempt-<n>/tests/<test_id>/``: one test cell (test_matrix) run on attempt n's checkpoint; the
    mmengine work_dir of that test, with the same result files as the attempt's own test step."""

    @property
    def test_id(self) -> str:
        return self.path.name

    def text_logs(self) -> List[Path]:
        """mmengine's text logs of this test (``<ts>/<ts>.log``), oldest first."""
        return sorted((p for p in self.path.glob("*/*.log") if p.stem == p.parent.name),
                      key=lambda p: p.parent.name)

    def write_metrics(self, body: Dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)  # the cell's directory comes with its first result
        super().write_metrics(body)


class RunDir:
    """``<ws>/runs/<run_id>/``: a run and its attempts."""

    def __init__(self, path: PathLike):
        self._str = os.fspath(path)

    @cached_property
    def path(self) -> Path:
        return Path(self._str)

    @classmethod
    def of(cls, ws: PathLike, run_id: str) -> "RunDir":
        return cls(os.path.join(os.fspath(ws), "runs", run_id))

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return self._str

    @property
    def run_id(self) -> str:
        return os.path.basename(self._str)

    @property
    def run_json_path(self) -> Path:
        return self.path / RUN_JSON

    @property
    def exists(self) -> bool:
        return self.run_json_path.is_file()

    @cached_property
    def _run_body(self) -> Optional[Dict[str, Any]]:
        body = _read(os.path.join(self._str, RUN_JSON))
        return body if isinstance(body, dict) else None

    @cached_property
    def run(self) -> RunRecord:
        """run.json (an empty record when missing or unreadable)."""
        return RunRecord.from_json(self._run_body) or RunRecord(run_id=self.run_id)

    def raw_run(self) -> Optional[Dict[str, Any]]:
        """run.json's body as written (None when missing or unreadable); read once per object like
        every file here (the report reads it for the run, its test cells and the state rule). The
        dict is this object's: change it only to pass it to :meth:`write_run`."""
        return self._run_body

    def write_run(self, body: Dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.path / RUN_JSON, body)
        self.__dict__.pop("run", None)
        self.__dict__.pop("_run_body", None)

    def attempt(self, n: int) -> AttemptDir:
        return AttemptDir(self.path / f"{_PREFIX}{int(n)}", int(n))

    def discard_unstarted(self, above: int = 0) -> List[int]:
        """Remove the trailing attempt dirs numbered above ``above`` that no job ever touched
        (rendered by a submit that was killed, refused or cancelled before its job ran): they are no
        attempt of the retry budget, and the next attempt takes their number. Only for a run known
        to have no job that may still start. Returns the numbers removed, newest first."""
        import shutil

        gone = []
        for a in reversed(self._attempts):
            if a.n <= above or a.started:
                break
            shutil.rmtree(a.path, ignore_errors=True)
            if a.path.exists():
                break
            gone.append(a.n)
        if gone:
            self.__dict__.pop("_attempts", None)
        return gone

    # ------------------------------------------------------------------ jobs.json (what the scheduler got)
    def jobs(self) -> List[Dict[str, Any]]:
        """jobs.json: every submission that reached the scheduler for this run, oldest first:
        ``{"submission_id", "backend", "job_id", "test_job_id", "attempt", "submitted_at"}``. The
        registry can be rebuilt from it (registry.rebuild)."""
        body = _read(self.path / JOBS)
        return [j for j in body if isinstance(j, dict) and j.get("job_id")] if isinstance(body, list) else []

    def record_jobs(self, entry: Dict[str, Any]) -> None:
        """Add (or update, by submission id) one submission's jobs in jobs.json (atomic)."""
        items = [j for j in self.jobs() if j.get("submission_id") != entry.get("submission_id")]
        items.append(dict(entry))
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.path / JOBS, items)

    # ------------------------------------------------------------------ test_jobs.json (the test cells' jobs)
    def test_jobs(self) -> List[Dict[str, Any]]:
        """test_jobs.json: each test cell of this run a submission sent (or was about to send), oldest
        first: ``{"submission_id", "backend", "test_id", "job_id", "after", "submitted_at"}``, plus
        ``claim_pid``, ``claim_host``, ``claimed_at`` of the submit. An entry is written with ``job_id``
        None just before the backend is asked (a submit that died after it left this claim) and gets
        its job id once the scheduler took it. The registry's test cells are rebuilt from it."""
        body = _read(self.path / TEST_JOBS)
        return [j for j in body if isinstance(j, dict) and j.get("test_id") and j.get("submission_id")] \
            if isinstance(body, list) else []

    def record_test_jobs(self, entries: List[Dict[str, Any]]) -> None:
        """Add (or update, by submission and test id: merged, moved last) test-cell entries (atomic)."""
        if not entries:
            return
        items = self.test_jobs()
        for entry in entries:
            key = (entry.get("submission_id"), entry.get("test_id"))
            old = [j for j in items if (j.get("submission_id"), j.get("test_id")) == key]
            items = [j for j in items if (j.get("submission_id"), j.get("test_id")) != key]
            items.append(dict(old[-1], **entry) if old else dict(entry))
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.path / TEST_JOBS, items)

    @cached_property
    def _attempts(self) -> List[AttemptDir]:
        out = []
        try:
            with os.scandir(self._str) as it:
                for e in it:
                    name = e.name
                    if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit() and e.is_dir():
                        out.append(AttemptDir(e.path, int(name[len(_PREFIX):])))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(out, key=lambda a: a.n)

    def attempts(self, rendered_only: bool = False) -> List[AttemptDir]:
        """Attempt dirs in order (``rendered_only``: those with attempt.json)."""
        return [a for a in self._attempts if a.rendered] if rendered_only else list(self._attempts)

    def latest(self) -> Optional[AttemptDir]:
        a = self._attempts
        return a[-1] if a else None

    def next_attempt_number(self) -> int:
        a = self._attempts
        return a[-1].n + 1 if a else 1

    def finished(self) -> Optional[AttemptDir]:
        """The newest attempt whose outcome is ``done`` (what the test step tests)."""
        for a in reversed(self.attempts(rendered_only=True)):
            if a.outcome is not None and a.outcome.done:
                return a
        return None

    def tested(self) -> Optional[AttemptDir]:
        """The newest attempt with metrics.json."""
        for a in reversed(self._attempts):
            if a.has_metrics:
                return a
        return None

    # ------------------------------------------------------------------ test cells (test_matrix)
    def test_cell_path(self, test_id: str) -> Path:
        """``tests/<test_id>.json``: the test cell's definition (its axes and test-time overrides)."""
        return self.path / TESTS / f"{test_id}.json"

    def write_test_cell(self, body: Dict[str, Any]) -> Path:
        path = self.test_cell_path(body["test_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, body)
        return path

    def test_cell(self, test_id: str) -> Optional[Dict[str, Any]]:
        body = _read(self.test_cell_path(test_id))
        return body if isinstance(body, dict) else None

    def test_cells(self) -> Dict[str, Dict[str, Any]]:
        """Every test cell written for this run, by test id (sorted)."""
        out: Dict[str, Dict[str, Any]] = {}
        folder = os.path.join(self._str, TESTS)
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
        except (FileNotFoundError, NotADirectoryError):  # most runs: no test_matrix
            return out
        for n in names:
            body = _read(os.path.join(folder, n))
            if isinstance(body, dict):
                out[n[:-len(".json")]] = body
        return out

    def tested_cell(self, test_id: str) -> Optional["TestDir"]:
        """The test cell's results on the run's finished attempt (None: not tested on it)."""
        fin = self.finished()
        if fin is None:
            return None
        t = fin.test(test_id)
        return t if t.has_metrics else None

    def refresh(self) -> "RunDir":
        """A fresh object (files re-read on next access)."""
        return RunDir(self.path)


def submission_record(folder: PathLike) -> Optional[Dict[str, Any]]:
    """``<ws>/submissions/<id>/submission.json`` (written when a submit claims its runs): id,
    experiment, backend, run ids; None when missing or unreadable."""
    body = _read(Path(folder) / SUBMISSION)
    return body if isinstance(body, dict) else None


def write_submission_record(folder: PathLike, body: Dict[str, Any]) -> None:
    atomic.write_json(Path(folder) / SUBMISSION, body)


def run_dirs(ws: PathLike) -> List[RunDir]:
    """Every run directory of a workspace (those holding run.json), sorted by run id."""
    root = os.fspath(runs_root(ws))
    try:
        with os.scandir(root) as it:
            names = sorted(e.name for e in it if e.is_dir())
    except FileNotFoundError:
        return []
    join, isfile = os.path.join, os.path.isfile  # strings, not a Path per check (5000 runs: 0.15 s)
    return [RunDir(join(root, n)) for n in names if isfile(join(root, n, RUN_JSON))]


# ---------------------------------------------------------------------- re-reading only what changed

#: what the login node reads in an attempt directory (with mmengine's checkpoint pointer): a change to
#: any of them, or to a directory (a file or attempt added, removed or replaced), re-reads the run
WATCHED = frozenset({ATTEMPT_JSON, PROGRESS, OUTCOME, NAN, RECOVERY, METRICS, DETECTIONS, checkpoints.POINTER})


def _stat_key(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _watched_files(path: str) -> tuple:
    with os.scandir(path) as it:
        return tuple(sorted((e.name, _stat_key(e.stat())) for e in it if e.name in WATCHED))


def signature(path: PathLike) -> Optional[tuple]:
    """A run directory as stat sees it: the directory, run.json, each ``attempt-<n>/`` and the
    :data:`WATCHED` files in it (inode, size, mtime in ns); ``("missing",)`` when there is no
    directory, None when it cannot be read (never equal: read again). Every file here is written
    atomically (a rename: a new inode, and the directory's mtime moves), so an equal signature
    means the files a reader of the run looks at are the ones it read before."""
    p = os.fspath(path)
    try:
        sig: List[Any] = [_stat_key(os.stat(p))]
        with os.scandir(p) as it:
            entries = sorted(((e.name, e) for e in it), key=lambda t: t[0])
        for name, e in entries:
            if name == RUN_JSON:
                sig.append((name, _stat_key(e.stat())))
            elif name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit() and e.is_dir():
                sig.append((name, _stat_key(e.stat()), _watched_files(e.path)))
    except (FileNotFoundError, NotADirectoryError):
        return ("missing",)
    except OSError:
        return None
    return tuple(sig)


class RunDirCache:
    """RunDir objects kept between reads of one workspace (``status --watch``, reconcile): :meth:`get`
    returns the object read before (its files already parsed) while the run's :func:`signature` is
    unchanged, else a new one. ``memo`` holds a caller's own per-run results for unchanged runs
    (reconcile: what it last folded into the registry)."""

    def __init__(self) -> None:
        self._runs: Dict[str, Tuple[Optional[tuple], "RunDir"]] = {}
        self.memo: Dict[Any, Any] = {}
        self.hits = 0
        self.misses = 0

    def get(self, ws: PathLike, run_id: str) -> Tuple["RunDir", bool]:
        """(RunDir, fresh): ``fresh`` is True when the run is read anew (first time, or changed)."""
        key = os.path.join(os.fspath(ws), "runs", run_id)
        sig = signature(key)
        hit = self._runs.get(key)
        if hit is not None and sig is not None and hit[0] == sig:
            self.hits += 1
            return hit[1], False
        self.misses += 1
        run = RunDir(key)
        self._runs[key] = (sig, run)
        return run, True
