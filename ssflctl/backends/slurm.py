"""Slurm backend (submitit): one job array for the train jobs of a submission (one sbatch call per
resource group, optional %N throttle) and one test array whose task i starts after train task i
succeeded (``aftercorr``; ``afterok`` for a single job). Nothing waits on the login node.

Also: sacct/squeue queries (`job_states`) and scancel.
"""
from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import submitit
import submitit.helpers

from ssflctl.atomic import read_json, write_json
from ssflctl.backends.base import TEST_FN, THREAD_VARS, TRAIN_FN, Backend, JobKind, JobStatus, Task
from ssflctl.errors import UserError


def _resolve(fn: str):
    mod, _, name = fn.partition(":")
    return getattr(importlib.import_module(mod), name)


class TrainTask(submitit.helpers.Checkpointable):
    """The train job. On preemption/timeout submitit calls `checkpoint()`, which (inherited)
    requeues the same call; `job.train_run` resumes the run dir from its last checkpoint.

    ``timeout_min`` (the job's --time) lets the note tell a time limit from a preemption by
    submitit's own rule (``SignalHandler.has_timed_out``: the job ran at least
    min(80% of its limit, limit - 10 min)), the rule by which submitit counts ``max_num_timeout``.
    """

    def __init__(self, fn: str = TRAIN_FN, timeout_min: Optional[float] = None):
        self.fn = fn
        self.timeout_min = timeout_min
        self._started: Optional[float] = None

    def __call__(self, run_dir: str):
        self._started = time.time()
        return _resolve(self.fn)(run_dir)

    def cause(self, now: Optional[float] = None) -> str:
        if not self.timeout_min or self._started is None:
            return "SIGUSR2 (time limit or preemption)"
        ran = ((now or time.time()) - self._started) / 60.0
        limit = float(self.timeout_min)
        if ran >= min(0.8 * limit, limit - 10):
            return f"SIGUSR2, a time limit by submitit's rule (ran {ran:.1f} of {limit:g} min)"
        return f"SIGUSR2, a preemption by submitit's rule (ran {ran:.1f} of {limit:g} min)"

    def checkpoint(self, run_dir: str, *args, **kwargs):
        """SIGUSR2 (time limit or preemption): note it in the attempt dir, then requeue the same call."""
        try:
            from ssflctl.node.job import note_interrupted

            note_interrupted(run_dir, self.cause())
        except Exception:  # noqa: BLE001 - the requeue matters more than the note
            pass
        return super().checkpoint(run_dir, *args, **kwargs)


def run_test(run_dir: str, fn: str = TEST_FN):
    """The test job (imports the heavy job module only on the node)."""
    return _resolve(fn)(run_dir)


def _params(res: Dict[str, Any], opts: Dict[str, Any], name: str) -> Dict[str, Any]:
    p: Dict[str, Any] = {
        "job_name": name,
        "time": int(res.get("time_min", 60)),
        "cpus_per_task": int(res.get("cpus", 1)),
        "mem": f"{max(1, int(round(float(res.get('mem_gb', 8)) * 1024)))}M",
        "ntasks_per_node": 1,
        "nodes": 1,
        "signal_delay_s": int(opts.get("signal_delay_s") or (60 if int(res.get("time_min", 60)) > 5 else 10)),
    }
    for k in ("partition", "qos", "account", "constraint"):
        if opts.get(k):
            p[k] = opts[k]
    gpus = int(res.get("gpus", 0))
    if opts.get("gres"):
        p["gres"] = opts["gres"]
    elif gpus > 0:
        p["gres"] = f"gpu:{gpus}"
    if opts.get("array_parallelism"):
        p["array_parallelism"] = int(opts["array_parallelism"])
    # a run's threads are its cpus-per-task, whatever the submitting shell had (torch would otherwise
    # start one thread per core of the node: measured here, two 1-CPU jobs on a 2-core node without
    # CPU binding ran 10x slower); the user's own setup lines come after and may change it
    p["setup"] = [f"export {var}=${{SLURM_CPUS_PER_TASK:-{int(res.get('cpus', 1))}}}"
                  for var in THREAD_VARS] + list(opts.get("setup") or [])
    extra = dict(opts.get("sbatch") or {})
    if extra:
        p["additional_parameters"] = extra
    return p


def make_executor(folder: Path, res: Dict[str, Any], opts: Dict[str, Any], name: str = "ssflctl"):
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=int(opts.get("max_num_timeout", 3)))
    ex.update_parameters(**_params(res, opts, name))
    return ex


def _sbatch_error(exc: Exception) -> UserError:
    msg = " ".join(str(exc).split())
    if "Unable to contact slurm controller" in msg or "Socket timed out" in msg:
        return UserError(f"sbatch: the Slurm controller is not reachable ({msg[-200:]}); nothing was submitted; "
                         "try again when `sinfo` answers")
    return UserError(f"sbatch refused the submission: {msg[-400:]}; check partition/qos/account/resources in "
                     "the experiment file")


def launch(tasks: List[Dict[str, Any]], folder: Path, options: Dict[str, Any],
           fns: Optional[Dict[str, str]] = None) -> Dict[str, Dict[str, Any]]:
    fns = fns or {}
    train_fn = fns.get("train", TRAIN_FN)
    test_fn = fns.get("test", TEST_FN)
    exp = options.get("experiment", "ssflctl")
    out: Dict[str, Dict[str, Any]] = {}
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for t in tasks:  # one array per distinct resource request (usually exactly one)
        groups.setdefault(json.dumps(t["resources"], sort_keys=True), []).append(t)
    sid = Path(folder).name
    manifest = {"groups": [{"train_name": f"train-{exp}-{sid}-{gi}", "test_name": f"test-{exp}-{sid}-{gi}",
                            "run_ids": [t["run_id"] for t in group]} for gi, group in enumerate(groups.values())]}
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json(Path(folder) / "manifest.json", manifest)  # before sbatch: lets `recover` find the jobs
    for gi, (_, group) in enumerate(groups.items()):
        res = group[0]["resources"]
        sub = Path(folder) / (f"group{gi}" if len(groups) > 1 else "")
        ex = make_executor(sub / "train", res, options, name=manifest["groups"][gi]["train_name"])
        try:
            with ex.batch():
                train_jobs = [ex.submit(TrainTask(train_fn, int(res.get("time_min", 60))), str(t["run_dir"]))
                              for t in group]
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as exc:
            _cancel_quietly(out)
            raise _sbatch_error(exc)
        for t, j in zip(group, train_jobs):
            out[t["run_id"]] = {"job_id": str(j.job_id), "test_job_id": None}
        testing = [(t, j) for t, j in zip(group, train_jobs) if t.get("test", True)]
        if not testing:
            continue
        ids = [str(j.job_id) for _, j in testing]
        if len(testing) == len(train_jobs) and len(train_jobs) > 1:
            dependency = f"aftercorr:{ids[0].split('_')[0]}"
        else:
            dependency = ",".join(f"afterok:{i}" for i in ids) if len(testing) == 1 else None
        test_res = dict(res)
        test_res["time_min"] = max(10, min(int(res.get("time_min", 60)), 240))
        tex = make_executor(sub / "test", test_res, options, name=manifest["groups"][gi]["test_name"])
        extra = dict(options.get("sbatch") or {})
        extra["kill_on_invalid_dep"] = "yes"
        try:
            if dependency is not None:
                tex.update_parameters(dependency=dependency, additional_parameters=extra)
                with tex.batch():
                    test_jobs = [tex.submit(run_test, str(t["run_dir"]), test_fn) for t, _ in testing]
            else:  # a subset is tested: one job each, afterok on its own train task
                test_jobs = []
                for t, j in testing:
                    tex.update_parameters(dependency=f"afterok:{j.job_id}", additional_parameters=extra)
                    test_jobs.append(tex.submit(run_test, str(t["run_dir"]), test_fn))
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as exc:
            # do not leave train jobs running whose runs will be recorded as failed
            _cancel_quietly(out)
            raise _sbatch_error(exc)
        for (t, _), j in zip(testing, test_jobs):
            out[t["run_id"]]["test_job_id"] = str(j.job_id)
    return out


# ------------------------------------------------------------------------------------------
# scheduler state
# ------------------------------------------------------------------------------------------

def _expand_ids(jobid: str) -> List[str]:
    """'12_[0-3,5%2]' -> ['12_0', '12_1', '12_2', '12_3', '12_5']; other ids unchanged."""
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


def _parse(text: str, fields) -> Dict[str, Dict[str, str]]:
    """``|``-separated lines → per job id; a task's own record wins over an array range record
    (sacct keeps a ``5_[0-1%2] CANCELLED`` record of the not-yet-started range beside ``5_0 RUNNING``)."""
    own: Dict[str, Dict[str, str]] = {}
    ranged: Dict[str, Dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        rec = {f: (parts[i] if i < len(parts) else "") for i, f in enumerate(fields)}
        rec["state"] = rec["state"].split()[0] if rec.get("state") else "UNKNOWN"  # "CANCELLED by 0"
        ids = _expand_ids(parts[0])
        target = ranged if ids != [parts[0]] else own
        for j in ids:
            target.setdefault(j, rec)
    return {**ranged, **own}


def parse_sacct(text: str) -> Dict[str, Dict[str, str]]:
    """Parse ``sacct -X -n -P -o JobID,State,ExitCode,Elapsed[,JobName]`` output."""
    out = _parse(text, ("id", "state", "exit_code", "elapsed", "name"))
    for rec in out.values():
        rec.pop("id", None)
        if not rec.get("name"):
            rec.pop("name", None)
    return out


def parse_squeue(text: str) -> Dict[str, Dict[str, str]]:
    """Parse ``squeue -h -o %i|%T|%M|%j|%r`` output."""
    out = _parse(text, ("id", "state", "elapsed", "name", "reason"))
    for rec in out.values():
        rec.pop("id", None)
        rec["exit_code"] = ""
        if not rec.get("name"):
            rec.pop("name", None)
    return out


class QueryFailed(Exception):
    """A scheduler command that did not answer (non-zero exit, timeout, not found)."""


def _run(cmd: List[str], timeout: float = 60, empty_if: str = "") -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise QueryFailed(f"`{cmd[0]}` timed out after {timeout:g} s") from None
    except OSError as exc:
        raise QueryFailed(f"`{cmd[0]}` could not run: {exc}") from None
    if proc.returncode != 0:
        if empty_if and empty_if in (proc.stderr or ""):
            return ""
        msg = " ".join((proc.stderr or proc.stdout or "").split())[-300:] or f"exit {proc.returncode}"
        raise QueryFailed(f"`{cmd[0]}` failed: {msg}")
    return proc.stdout


def job_states(job_ids: Iterable[str], timeout: float = 60) -> Dict[str, Dict[str, str]]:
    """State per job id from sacct and squeue (squeue wins for what is still queued or running).

    A job neither command could be asked about gets ``{"state": "QUERY_FAILED", "error": ...}``;
    a job that both answered without is left out (the scheduler has no record of it).
    """
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    bases = sorted({j.split("_")[0] for j in ids})
    states: Dict[str, Dict[str, str]] = {}
    errors = []
    try:
        states.update(parse_sacct(_run(["sacct", "-j", ",".join(bases), "-X", "-n", "-P", "-o",
                                        "JobID,State,ExitCode,Elapsed,JobName%200"], timeout)))
    except QueryFailed as exc:
        errors.append(str(exc))
    squeue_ok = True
    try:  # authoritative for what is still queued/running (sacct may lag); %r is the pending reason
        for j, st in parse_squeue(_run(["squeue", "-h", "-j", ",".join(bases), "-o", "%i|%T|%M|%j|%r"],
                                       timeout, empty_if="Invalid job id")).items():
            if j not in states or states[j]["state"] in ("PENDING", "RUNNING", "REQUEUED", "UNKNOWN"):
                states[j] = st
    except QueryFailed as exc:
        squeue_ok = False
        errors.append(str(exc))
    out = {j: states[j] for j in ids if j in states}
    if errors:
        for j in ids:
            # sacct failed: a job squeue does not list may have ended; squeue failed: a job sacct
            # has as pending/running may have moved on. Either way: don't know, never "gone".
            if j not in out or (not squeue_ok and out[j]["state"] in ("PENDING", "RUNNING", "REQUEUED")):
                out[j] = {"state": "QUERY_FAILED", "error": "; ".join(errors)}
    return out


def _cancel_quietly(out: Dict[str, Dict[str, Any]]) -> None:
    try:
        cancel([v["job_id"] for v in out.values()] + [v["test_job_id"] for v in out.values()])
    except UserError:
        pass


def cancel(job_ids: Iterable[str]) -> None:
    ids = [str(j) for j in job_ids if j]
    if not ids:
        return
    try:
        proc = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise UserError(f"scancel failed: {exc}; is Slurm available here?")
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise UserError(f"scancel {' '.join(ids)} failed: {proc.stderr.strip()}")


def recover(folder: Path) -> Dict[str, Dict[str, Any]]:
    """Job ids of a submission whose submit process died between sbatch and recording them: the
    job names in manifest.json (written before sbatch) are looked up in sacct/squeue."""
    manifest = read_json(Path(folder) / "manifest.json", default=None)
    if not manifest:
        return {}
    names = {}
    for g in manifest["groups"]:
        names[g["train_name"]] = (g, "job_id")
        names[g["test_name"]] = (g, "test_job_id")
    found: Dict[str, str] = {}
    cmds = [["sacct", "-X", "-n", "-P", "-S", "now-14days", "--name", ",".join(names), "-o", "JobID,JobName"],
            ["squeue", "-h", "-n", ",".join(names), "-o", "%i|%j"]]
    for cmd in cmds:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2 and parts[1] in names:
                found.setdefault(parts[1], parts[0].split("_")[0])
    out: Dict[str, Dict[str, Any]] = {}
    for name, base in found.items():
        g, key = names[name]
        single = len(g["run_ids"]) == 1
        for i, rid in enumerate(g["run_ids"]):
            out.setdefault(rid, {"job_id": None, "test_job_id": None})[key] = base if single else f"{base}_{i}"
    return {rid: v for rid, v in out.items() if v["job_id"]}


# ------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------
#: Slurm job states (``squeue --helpstate``/``sacct --helpstate``, Slurm 22.05+) → JobKind
STATE_KINDS: Dict[str, JobKind] = {
    "PENDING": JobKind.QUEUED, "REQUEUED": JobKind.QUEUED, "CONFIGURING": JobKind.QUEUED,
    "REQUEUE_FED": JobKind.QUEUED, "RESIZING": JobKind.QUEUED,
    "REQUEUE_HOLD": JobKind.HELD, "SPECIAL_EXIT": JobKind.HELD, "RESV_DEL_HOLD": JobKind.HELD,
    "RUNNING": JobKind.RUNNING, "COMPLETING": JobKind.RUNNING, "SIGNALING": JobKind.RUNNING,
    "STAGE_OUT": JobKind.RUNNING, "SUSPENDED": JobKind.RUNNING, "STOPPED": JobKind.RUNNING,
    "COMPLETED": JobKind.COMPLETED,
    "FAILED": JobKind.FAILED, "TIMEOUT": JobKind.FAILED, "NODE_FAIL": JobKind.FAILED,
    "OUT_OF_MEMORY": JobKind.FAILED, "BOOT_FAIL": JobKind.FAILED, "DEADLINE": JobKind.FAILED,
    "PREEMPTED": JobKind.FAILED, "REVOKED": JobKind.FAILED,
    "CANCELLED": JobKind.CANCELLED,
}


def to_status(job_id: str, rec: Optional[Dict[str, str]], name_hint: str = "") -> JobStatus:
    """One job's record from :func:`job_states` as a JobStatus (no record: GONE)."""
    if rec is None:
        return JobStatus(job_id, JobKind.GONE)
    raw = rec.get("state", "")
    if raw == "QUERY_FAILED":
        return JobStatus(job_id, JobKind.UNKNOWN, raw="", error=rec.get("error", ""))
    # a record whose job name lacks our submission id is another job with a reused id
    # (slurmctld's state was wiped): for us, ours is gone
    if name_hint and rec.get("name") and name_hint not in rec["name"]:
        return JobStatus(job_id, JobKind.GONE, reason=f"job id {job_id} now belongs to another job "
                         f"({rec['name']}); the scheduler has no record of ours")
    kind = STATE_KINDS.get(raw)
    if kind is None:
        return JobStatus(job_id, JobKind.UNKNOWN, raw=raw, error=f"unmapped Slurm state {raw!r}")
    reason = rec.get("reason", "") if kind in (JobKind.QUEUED, JobKind.HELD) else ""
    if reason in ("None", "(null)"):
        reason = ""
    return JobStatus(job_id, kind, raw=raw, reason=reason, exit_code=rec.get("exit_code", ""),
                     elapsed=rec.get("elapsed", ""), name=rec.get("name", ""))


class SlurmBackend(Backend):
    """Slurm through submitit: one train array + one dependent test array per submission."""

    name = "slurm"

    def check_available(self, where: str = "") -> None:
        if not shutil.which("sbatch"):
            raise UserError(f"{where}executor: slurm, but sbatch is not on PATH; submit from the cluster's "
                            "login node or pass --executor local")

    def submit(self, tasks, folder, options, fns=None):
        self.check_available()
        return launch([t.__dict__ if isinstance(t, Task) else t for t in tasks], folder, options, fns=fns)

    def query(self, jobs):
        jobs = [j for j in jobs if j.job_id]
        raw = job_states([j.job_id for j in jobs])
        return {j.job_id: to_status(j.job_id, raw.get(j.job_id), j.name_hint) for j in jobs}

    def cancel(self, jobs):
        cancel([j.job_id for j in jobs])

    def recover(self, folder):
        if not (Path(folder) / "manifest.json").exists():
            return {}
        return recover(folder)

    def job_output(self, job):
        if job.folder is None:
            return None
        for cand in Path(job.folder).rglob(f"{job.job_id}_0_log.err"):
            return cand
        return None

    def describe_where(self, options):
        bits = [f"partition={options['partition']}" if options.get("partition") else "",
                f"qos={options['qos']}" if options.get("qos") else "",
                f"account={options['account']}" if options.get("account") else "",
                f"%{options['array_parallelism']}" if options.get("array_parallelism") else ""]
        return ("slurm " + " ".join(b for b in bits if b)).strip()
