"""squeue / sacct queries and their parsers, with every answer classified by slurm_states.

Behaviour checked on Slurm 22.05.8 (tests/test_slurm_states.py captures the formats from the
real cluster of scripts/slurm-cluster.sh):

* A query that FAILS (non-zero exit, timeout, the command missing, slurmctld/slurmdbd not reachable:
  e.g. ``sacct: error: Problem talking to the database: Connection refused``) gives a
  :class:`QueryFailed` ("unknown: <command>: <message>"), never an empty answer. The one non-zero
  exit that is an answer: ``squeue -j ID`` of a single id the controller has forgotten prints
  ``slurm_load_jobs error: Invalid job id specified`` (exit 1), i.e. "not in the queue".
* squeue is asked with ``-t all`` (without it squeue hides jobs that ended, for MinJobAge seconds
  still known to the controller) and ``--array`` (one line per array task). The controller is the
  source of truth: sacct lags it by seconds (a running job can still be PENDING in sacct, a new job
  absent), so a job squeue knows takes its state from squeue; sacct adds ExitCode/MaxRSS, and the
  jobs the controller has forgotten.
* sacct is asked WITHOUT ``-X``: MaxRSS is only on the step records (``12.batch``, ``12.0``); they
  are folded into their job. ``--noconvert`` makes MaxRSS plain bytes (units K/M/G… are parsed too).
  sacct's Reason is the last pending reason and is kept only for a PENDING record.
* Arrays: a range record (``5_[0-3%2]``, pending tasks not yet split off) stands for each of its
  tasks only until the task's own record (``5_0``) is seen: the task's own record always wins,
  whatever the order.
* ExitCode ``rc:sig`` (sacct): ``0:9`` is killed by signal 9, named SIGKILL. A process that
  ``srun`` started and a signal killed shows on its step (``32.0 CANCELLED 0:9``) while the job
  says ``FAILED 9:0`` (srun's exit): the step's signal is the job's when the job has none.
"""
from __future__ import annotations

import dataclasses
import re
import signal as _signal
import subprocess
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

from ssflctl.backends.slurm_states import ACTIVE_KINDS, Kind, State, UnmappedState, base_state, classify

DEFAULT_TIMEOUT_S = 30.0

SQUEUE_FORMAT = "%i|%T|%r|%M|%j"  # name last: it may contain '|'
SACCT_FIELDS = "JobID,State,ExitCode,Reason,MaxRSS,Elapsed,JobName"  # name last


@dataclass(frozen=True)
class QueryFailed:
    """A scheduler query that did not answer. ``str()`` is 'unknown: <command>: <message>'."""
    command: str
    message: str

    def __str__(self) -> str:
        return f"unknown: {self.command}: {self.message}"


@dataclass
class JobRecord:
    job_id: str                          # '12', '12_3'
    state: str                           # Slurm's state name ('CANCELLED'), see slurm_states.STATES
    state_text: str                      # as printed ('CANCELLED by 0')
    kind: Kind
    reason: str = ""                     # pending reason (squeue %r; sacct Reason for PENDING only)
    exit_code: Optional[int] = None      # sacct ExitCode 'rc:sig' -> rc
    signal: Optional[int] = None         # -> sig (None when 0)
    elapsed: str = ""
    max_rss_bytes: Optional[int] = None  # max over the job's steps (sacct)
    name: str = ""
    source: str = ""                     # 'squeue' or 'sacct'
    from_range: bool = False             # taken from an array range record (5_[0-3])
    steps: Dict[str, str] = field(default_factory=dict)  # sacct step id -> state text
    step_signal: Optional[int] = None    # a step's signal when the job's ExitCode has none (srun'd process killed)
    partial: str = ""                    # the other query failed: 'unknown: <command>: <message>'

    @property
    def killed_by(self) -> Optional[int]:
        """The signal that ended the job: its own, else one of its steps'."""
        return self.signal or self.step_signal

    @property
    def signal_name(self) -> str:
        return signal_name(self.killed_by) if self.killed_by else ""

    @property
    def exit_text(self) -> str:
        """'exit 3', 'killed by SIGKILL (signal 9)', 'exit 0' or '' when unknown."""
        if self.killed_by:
            return f"killed by {self.signal_name} (signal {self.killed_by})"
        return "" if self.exit_code is None else f"exit {self.exit_code}"

    def verdict(self):
        return classify(self.state, self.reason)

    def legacy(self) -> Dict[str, str]:
        """The dict ssflctl.launch.slurm.job_states returned (state/exit_code/elapsed/name), plus
        kind, reason, signal, signal_name, max_rss_bytes, source."""
        ec = "" if self.exit_code is None else f"{self.exit_code}:{self.signal or 0}"
        return {"state": self.state, "exit_code": ec, "elapsed": self.elapsed, "name": self.name,
                "kind": self.kind.value, "reason": self.reason, "signal": str(self.signal or ""),
                "signal_name": self.signal_name,
                "max_rss_bytes": "" if self.max_rss_bytes is None else str(self.max_rss_bytes),
                "source": self.source, "state_text": self.state_text}


def signal_name(num: Optional[int]) -> str:
    if not num:
        return ""
    try:
        return _signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def parse_exit_code(text: str) -> Tuple[Optional[int], Optional[int]]:
    """sacct ExitCode 'rc:sig' -> (rc, sig or None); '' -> (None, None)."""
    m = re.fullmatch(r"\s*(\d+):(\d+)\s*", text or "")
    if not m:
        return None, None
    rc, sig = int(m.group(1)), int(m.group(2))
    return rc, (sig or None)


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4, "P": 1024 ** 5}


def parse_bytes(text: str) -> Optional[int]:
    """sacct MaxRSS: '329973760' (--noconvert) -> bytes, '322240K', '314.69M', '1.5G' -> bytes; '' -> None."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGTP]?)\s*", (text or "").upper())
    if not m:
        return None
    return int(round(float(m.group(1)) * _UNITS[m.group(2)]))


def expand_ids(jobid: str) -> List[str]:
    """'12_[0-3,5%2]' -> ['12_0', '12_1', '12_2', '12_3', '12_5']; other ids unchanged
    (ssflctl.launch.slurm._expand_ids)."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", jobid)
    if not m:
        return [jobid]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out += [f"{base}_{i}" for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(f"{base}_{part}")
    return out


def _put(out: Dict[str, JobRecord], rec: JobRecord) -> None:
    """A task's own record beats a range record; otherwise the later line wins."""
    cur = out.get(rec.job_id)
    if cur is not None and rec.from_range and not cur.from_range:
        return
    out[rec.job_id] = rec


def _record(jid: str, state_text: str, source: str, from_range: bool, **kw) -> JobRecord:
    st = base_state(state_text)
    kind = classify(st, kw.get("reason", "")).kind  # raises UnmappedState
    return JobRecord(job_id=jid, state=st, state_text=state_text.strip(), kind=kind, source=source,
                     from_range=from_range, **kw)


def parse_squeue(text: str) -> Dict[str, JobRecord]:
    """Parse ``squeue -h -o '%i|%T|%r|%M|%j'`` (also the older '%i|%T|%M|%j' of launch.slurm when the
    third field is a time). Raises UnmappedState for a state not in slurm_states."""
    out: Dict[str, JobRecord] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        reason, rest = "", parts[2:]
        if rest and not re.fullmatch(r"[\d:-]+|INVALID|UNLIMITED|NOT_SET", rest[0]):
            reason, rest = rest[0], rest[1:]
        elapsed = rest[0] if rest else ""
        name = "|".join(rest[1:])
        ids = expand_ids(parts[0])
        for j in ids:
            _put(out, _record(j, parts[1], "squeue", len(ids) > 1 or j != parts[0], reason=reason,
                              elapsed=elapsed, name=name))
    return out


def parse_sacct(text: str, fields: str = SACCT_FIELDS) -> Dict[str, JobRecord]:
    """Parse ``sacct -P -n --format <fields>`` (default SACCT_FIELDS; the legacy
    'JobID,State,ExitCode,Elapsed,JobName' of launch.slurm works too). Step lines (12.batch) are
    folded into their job: MaxRSS is the max over them, their states go to ``steps``. Raises
    UnmappedState for a state not in slurm_states."""
    names = [f.split("%")[0].lower() for f in fields.split(",")]
    out: Dict[str, JobRecord] = {}
    steps: List[Tuple[str, Dict[str, str]]] = []
    for line in text.splitlines():
        parts = line.rstrip("\n").split("|")
        if len(parts) < 2 or not parts[0].strip():
            continue
        if len(parts) > len(names) and names[-1] == "jobname":
            parts = parts[:len(names) - 1] + ["|".join(parts[len(names) - 1:])]
        row = dict(zip(names, parts))
        jid = row.get("jobid", "").strip()
        if "." in jid:
            steps.append((jid, row))
            continue
        rc, sig = parse_exit_code(row.get("exitcode", ""))
        state_text = row.get("state", "")
        reason = row.get("reason", "") if base_state(state_text) == "PENDING" else ""
        ids = expand_ids(jid)
        for j in ids:
            _put(out, _record(j, state_text, "sacct", len(ids) > 1 or j != jid, reason=reason, exit_code=rc,
                              signal=sig, elapsed=row.get("elapsed", ""),
                              max_rss_bytes=parse_bytes(row.get("maxrss", "")), name=row.get("jobname", "")))
    for sid, row in steps:
        rec = out.get(sid.split(".")[0])
        if rec is None:
            continue
        rec.steps[sid] = row.get("state", "")
        _, step_sig = parse_exit_code(row.get("exitcode", ""))
        if step_sig and not rec.step_signal and not sid.endswith(".extern"):
            # `srun` of a process killed by a signal: the job says 9:0 (srun's exit), the step 0:9
            rec.step_signal = step_sig
        rss = parse_bytes(row.get("maxrss", ""))
        if rss is not None and (rec.max_rss_bytes is None or rss > rec.max_rss_bytes):
            rec.max_rss_bytes = rss
    return out


def _run(cmd: List[str], timeout: float) -> Union[subprocess.CompletedProcess, QueryFailed]:
    shown = " ".join(cmd)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return QueryFailed(shown, f"no answer in {timeout:g} s")
    except OSError as exc:
        return QueryFailed(shown, f"could not run: {exc}")


def _message(proc: subprocess.CompletedProcess) -> str:
    text = " ".join((proc.stderr or proc.stdout or "").split())
    return f"exit {proc.returncode}: {text[-400:]}" if text else f"exit {proc.returncode}, no message"


def _bases(job_ids: Iterable[str]) -> List[str]:
    return sorted({str(j).split("_")[0].split(".")[0] for j in job_ids if j}, key=lambda s: (len(s), s))


def query_squeue(job_ids: Iterable[str], timeout: float = DEFAULT_TIMEOUT_S
                 ) -> Union[Dict[str, JobRecord], QueryFailed]:
    """The controller's records of these jobs (and of every task of their arrays), ended ones
    included while the controller keeps them (MinJobAge). {} when it knows none of them."""
    bases = _bases(job_ids)
    if not bases:
        return {}
    cmd = ["squeue", "-h", "--array", "-t", "all", "-j", ",".join(bases), "-o", SQUEUE_FORMAT]
    proc = _run(cmd, timeout)
    if isinstance(proc, QueryFailed):
        return proc
    if proc.returncode != 0:
        if "Invalid job id specified" in (proc.stderr or ""):
            return {}  # the controller has forgotten it: an answer, not a failure
        return QueryFailed(" ".join(cmd), _message(proc))
    try:
        return parse_squeue(proc.stdout)
    except UnmappedState as exc:
        return QueryFailed(" ".join(cmd), str(exc))


def query_sacct(job_ids: Iterable[str], timeout: float = DEFAULT_TIMEOUT_S
                ) -> Union[Dict[str, JobRecord], QueryFailed]:
    """Accounting records of these jobs (latest incarnation of a requeued job), with MaxRSS from
    their steps. {} when slurmdbd has none (yet: it lags the controller)."""
    bases = _bases(job_ids)
    if not bases:
        return {}
    cmd = ["sacct", "-P", "-n", "--noconvert", "-j", ",".join(bases), "--format", SACCT_FIELDS]
    proc = _run(cmd, timeout)
    if isinstance(proc, QueryFailed):
        return proc
    if proc.returncode != 0:
        return QueryFailed(" ".join(cmd), _message(proc))
    try:
        return parse_sacct(proc.stdout)
    except UnmappedState as exc:
        return QueryFailed(" ".join(cmd), str(exc))


def _task_record(records: Dict[str, JobRecord], job_id: str) -> Optional[JobRecord]:
    """The record of ``job_id``; for an array task without one of its own, the whole array's: a
    pending array cancelled before any task was split off is one record, ``5`` (squeue and sacct)."""
    rec = records.get(job_id)
    if rec is None and "_" in job_id:
        whole = records.get(job_id.split("_")[0])
        if whole is not None:
            rec = dataclasses.replace(whole, job_id=job_id, from_range=True)
    return rec


def merge(squeue: Union[Dict[str, JobRecord], QueryFailed], sacct: Union[Dict[str, JobRecord], QueryFailed],
          job_ids: Iterable[str]) -> Dict[str, Union[JobRecord, QueryFailed]]:
    """One answer per requested id: the controller's record (with sacct's exit code and MaxRSS when
    sacct agrees on the state), else sacct's; when neither has it and a query failed, that failure
    (both, joined); when both answered without it, the id is absent (no record anywhere).

    With the controller not answering, sacct's record stands only when it is final (a terminal
    state): its PENDING or RUNNING lags the controller and may be stale, so the job is "don't know"
    (the squeue failure, saying what sacct had). A record that stands while the other query failed
    carries that failure in :attr:`JobRecord.partial`."""
    ids = [str(j) for j in job_ids if j]
    sq = squeue if isinstance(squeue, dict) else {}
    sa = sacct if isinstance(sacct, dict) else {}
    fails = [f for f in (squeue, sacct) if isinstance(f, QueryFailed)]
    out: Dict[str, Union[JobRecord, QueryFailed]] = {}
    for j in ids:
        a, b = _task_record(sq, j), _task_record(sa, j)
        if a is not None:
            if b is not None:
                if b.state == a.state:
                    a.exit_code, a.signal = b.exit_code, b.signal
                a.max_rss_bytes, a.steps, a.step_signal = b.max_rss_bytes, b.steps, b.step_signal
                a.name = a.name or b.name
            if isinstance(sacct, QueryFailed):
                a.partial = str(sacct)
            out[j] = a
        elif b is not None:
            if isinstance(squeue, QueryFailed):
                if b.kind in ACTIVE_KINDS:
                    out[j] = QueryFailed(squeue.command, f"{squeue.message} (sacct's {b.state} may be stale)")
                    continue
                b.partial = str(squeue)
            out[j] = b
        elif fails:
            out[j] = fails[0] if len(fails) == 1 else QueryFailed(
                "; ".join(f.command for f in fails), "; ".join(f.message for f in fails))
    return out


def query(job_ids: Iterable[str], timeout: float = DEFAULT_TIMEOUT_S) -> Dict[str, Union[JobRecord, QueryFailed]]:
    """squeue then sacct for these ids, merged (see merge)."""
    ids = [str(j) for j in job_ids if j]
    if not ids:
        return {}
    return merge(query_squeue(ids, timeout), query_sacct(ids, timeout), ids)


def job_states(job_ids: Iterable[str], timeout: float = DEFAULT_TIMEOUT_S) -> Dict[str, Dict[str, str]]:
    """Drop-in for ssflctl.launch.slurm.job_states: {id: {state, exit_code, elapsed, name, + kind, reason,
    signal, signal_name, max_rss_bytes, source, state_text}}. An id whose queries failed is NOT left out:
    it gets {'state': 'UNKNOWN', 'kind': 'unknown', 'error': 'unknown: <command>: <message>'}."""
    out: Dict[str, Dict[str, str]] = {}
    for j, rec in query(job_ids, timeout).items():
        if isinstance(rec, QueryFailed):
            out[j] = {"state": "UNKNOWN", "exit_code": "", "elapsed": "", "name": "", "kind": Kind.UNKNOWN.value,
                      "reason": "", "signal": "", "signal_name": "", "max_rss_bytes": "", "source": "",
                      "state_text": "", "error": str(rec)}
        else:
            out[j] = rec.legacy()
    return out


__all__ = ["DEFAULT_TIMEOUT_S", "JobRecord", "QueryFailed", "State", "expand_ids", "job_states", "merge",
           "parse_bytes", "parse_exit_code", "parse_sacct", "parse_squeue", "query", "query_sacct",
           "query_squeue", "signal_name"]
