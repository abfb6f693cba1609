"""Slurm backend (submitit): one job array for the train jobs of a submission (one sbatch call per
resource group, optional %N throttle) and one test array whose task i starts after train task i
succeeded (``aftercorr``; ``afterok`` for a single job). Nothing waits on the login node.

Queries: ``slurm_query`` (sacct/squeue) and ``slurm_states`` (every state and pending reason); scancel here.
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
from ssflctl.backends import slurm_limits, slurm_query, slurm_states
from ssflctl.backends.base import (TEST_CELL_FN, TEST_FN, THREAD_VARS, TRAIN_FN, Backend, JobKind, JobStatus, Task,
                                   TestTask, split_tasks)
from ssflctl.errors import UserError


#: the node's note of an interruption (called in the job when submitit's checkpoint signal arrives)
NOTE_FN = "ssflctl.node.job:note_interrupted"


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
        """SIGUSR2 (time limit or preemption): note it in the attempt dir, then requeue the same call.

        With several tasks Slurm signals every task, but submitit 1.5's handler
        (``SignalHandler.checkpoint_and_try_requeue``) returns at once on a task whose
        ``SLURM_PROCID`` is not 0: only rank 0 gets here, notes the interruption and requeues
        (one ``scontrol requeue``); nothing is saved (every rank resumes mmengine's last
        checkpoint, which rank 0 wrote, at the attempt's lr)."""
        try:
            _resolve(NOTE_FN)(run_dir, self.cause())  # node code, by name: not imported on the login node
        except Exception:  # noqa: BLE001 - the requeue matters more than the note
            pass
        return super().checkpoint(run_dir, *args, **kwargs)


def run_test(run_dir: str, fn: str = TEST_FN):
    """The test job (imports the heavy job module only on the node)."""
    return _resolve(fn)(run_dir)


def run_test_cell(cell: str, fn: str = TEST_CELL_FN):
    """A test cell's job (test_matrix): ``cell`` is the cell's definition file in the run dir."""
    return _resolve(fn)(cell)


_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,:=+%*|&()\[\]/@-]+")
_SAFE_KEY = re.compile(r"[a-z][a-z0-9_-]*")


def check_options(opts: Dict[str, Any], name: str) -> None:
    """Refuse (UserError, one line) anything that would not stay one ``#SBATCH`` value in the
    script submitit writes: a newline in a partition or an sbatch option starts a new script line.
    Setup lines are shell commands by design, but each must be one line."""
    for key in ("partition", "qos", "account", "constraint", "gres"):
        v = opts.get(key)
        if v is not None and not _SAFE_VALUE.fullmatch(str(v)):
            raise UserError(f"executor.slurm.{key}: {str(v)!r} is not a Slurm {key} name (letters, digits and "
                            "_.,:=+%*|&()[]/@- only); fix the experiment file")
    for k, v in (opts.get("sbatch") or {}).items():
        if not _SAFE_KEY.fullmatch(str(k)) or any(c in str(v) for c in "\n\r\0"):
            raise UserError(f"executor.slurm.sbatch.{k}: an sbatch option must be a lower-case name with a one-line "
                            "value; fix the experiment file")
    for i, line in enumerate(opts.get("setup") or []):
        if any(c in str(line) for c in "\n\r\0"):
            raise UserError(f"executor.slurm.setup[{i}]: one shell line per entry (no newline); split it into entries")
    if not _SAFE_VALUE.fullmatch(name):
        raise UserError(f"job name {name!r}: letters, digits and _.- only; rename the experiment")


def tasks_per_node(res: Dict[str, Any]) -> int:
    """One task per GPU (at least one task)."""
    return max(1, int(res.get("gpus", 0) or 0))


def _params(res: Dict[str, Any], opts: Dict[str, Any], name: str) -> Dict[str, Any]:
    """submitit's parameters for one job of ``res`` (``gpus`` and ``cpus`` per node, ``nodes``).

    ``nodes × gpus`` tasks, one per GPU, started by submitit's ``srun`` (``--ntasks-per-node=gpus``,
    ``--nodes``). GPUs: ``--gres=gpu:<gpus>`` per node, every task of a node sees all of them and
    takes the one of its ``SLURM_LOCALID`` (mmengine's slurm launcher: ``set_device(local rank)``);
    not ``--gpus-per-task=1``, under which each task sees one device as cuda:0 and mmengine's
    ``set_device(SLURM_LOCALID)`` fails on every rank but the first. CPUs: ``cpus`` is the node's
    share, so ``--cpus-per-task = cpus // gpus`` (at least 1); ``--mem`` is per node.
    """
    ntasks = tasks_per_node(res)
    cpus_per_task = max(1, int(res.get("cpus", 1)) // ntasks)
    p: Dict[str, Any] = {
        "job_name": name,
        "time": int(res.get("time_min", 60)),
        "cpus_per_task": cpus_per_task,
        "mem": f"{max(1, int(round(float(res.get('mem_gb', 8)) * 1024)))}M",
        "ntasks_per_node": ntasks,
        "nodes": max(1, int(res.get("nodes", 1) or 1)),
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
    p["setup"] = [f"export {var}=${{SLURM_CPUS_PER_TASK:-{cpus_per_task}}}"
                  for var in THREAD_VARS] + list(opts.get("setup") or [])
    extra = dict(opts.get("sbatch") or {})
    if extra:
        p["additional_parameters"] = extra
    return p


def make_executor(folder: Path, res: Dict[str, Any], opts: Dict[str, Any], name: str = "ssflctl"):
    check_options(opts, name)
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


def arrays_of(tasks: List[Dict[str, Any]], max_array_size: Optional[int] = None) -> List[List[Dict[str, Any]]]:
    """The train arrays: as planned (each task's ``array``, see Backend.plan_arrays), else one per
    distinct resource request (usually exactly one) cut at ``max_array_size`` tasks."""
    if tasks and all(t.get("array") is not None for t in tasks):
        planned: Dict[int, List[Dict[str, Any]]] = {}
        for t in tasks:
            planned.setdefault(int(t["array"]), []).append(t)
        arrays = [planned[k] for k in sorted(planned)]
        for arr in arrays:
            if len({json.dumps(t["resources"], sort_keys=True) for t in arr}) > 1:
                raise ValueError("an array's tasks must request the same resources")
            if max_array_size and len(arr) > max_array_size:
                raise ValueError(f"an array of {len(arr)} tasks exceeds MaxArraySize {max_array_size}")
        return arrays
    return split_tasks(list(tasks), lambda t: json.dumps(t["resources"], sort_keys=True), max_array_size)


def launch(tasks: List[Dict[str, Any]], folder: Path, options: Dict[str, Any],
           fns: Optional[Dict[str, str]] = None, max_array_size: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """One sbatch call per train array (see :func:`arrays_of`) and one per test array, whose task i
    starts after task i of its own train array succeeded."""
    fns = fns or {}
    train_fn = fns.get("train", TRAIN_FN)
    test_fn = fns.get("test", TEST_FN)
    exp = options.get("experiment", "ssflctl")
    out: Dict[str, Dict[str, Any]] = {}
    groups = arrays_of(tasks, max_array_size)
    sid = Path(folder).name
    manifest = {"groups": [{"train_name": f"train-{exp}-{sid}-{gi}", "test_name": f"test-{exp}-{sid}-{gi}",
                            "run_ids": [t["run_id"] for t in group]} for gi, group in enumerate(groups)]}
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json(Path(folder) / "manifest.json", manifest)  # before sbatch: lets `recover` find the jobs
    for gi, group in enumerate(groups):
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
        # the test step runs on one task (one GPU) of one node
        test_res = dict(res, gpus=min(1, int(res.get("gpus", 0) or 0)), nodes=1)
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


def _scontrol(*args: str) -> None:
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, ["scontrol", *args], proc.stdout, proc.stderr)


def launch_tests(tests: List[Dict[str, Any]], folder: Path, options: Dict[str, Any],
                 fns: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The test cells of a submission: one array per resource group (one sbatch call), each task
    waiting for its own run's train job.

    One sbatch gives every task of an array the same dependency, and ``aftercorr`` pairs task i
    with task i only; a run has several test cells. So the array is submitted held, each task
    that waits for a training gets ``afterok:<its train job>`` (``scontrol update JobId=A_i``:
    Slurm splits that task's record off the array), and the array is released. A task whose run is
    trained has no dependency. ``kill_on_invalid_dep``: a failed training cancels its tests.
    """
    fn = (fns or {}).get("test_cell", TEST_CELL_FN)
    exp = options.get("experiment", "ssflctl")
    sid = Path(folder).parent.name
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for t in tests:
        groups.setdefault(json.dumps(t["resources"], sort_keys=True), []).append(t)
    Path(folder).mkdir(parents=True, exist_ok=True)
    # before sbatch: lets `recover_tests` find the jobs of a submit killed before it recorded them;
    # ``released`` is set once a group's dependencies are in place and its hold is lifted
    manifest = {"groups": [{"name": f"testcell-{exp}-{sid}-{gi}",
                            "tests": [{"test_id": t["test_id"], "after": t.get("after")} for t in group],
                            "held": any(t.get("after") for t in group), "released": False}
                           for gi, group in enumerate(groups.values())]}
    write_json(Path(folder) / "manifest.json", manifest)
    out: Dict[str, str] = {}
    for gi, group in enumerate(groups.values()):
        res = dict(group[0]["resources"])
        res["time_min"] = max(10, min(int(res.get("time_min", 60)), 240))
        sub = Path(folder) / (f"group{gi}" if len(groups) > 1 else "")
        ex = make_executor(sub, res, options, name=manifest["groups"][gi]["name"])
        extra = dict(options.get("sbatch") or {})
        extra["kill_on_invalid_dep"] = "yes"
        waits = [t for t in group if t.get("after")]
        if waits:
            extra["hold"] = True
        ex.update_parameters(additional_parameters=extra)
        jobs = []
        try:
            with ex.batch():
                jobs = [ex.submit(run_test_cell, str(t["cell"]), fn) for t in group]
            for t, j in zip(group, jobs):
                if t.get("after"):
                    _scontrol("update", f"JobId={j.job_id}", f"Dependency=afterok:{t['after']}")
            if waits:
                _scontrol("release", str(jobs[0].job_id).split("_")[0])
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError,
                subprocess.TimeoutExpired) as exc:
            try:
                cancel([str(j.job_id) for j in jobs] + list(out.values()))
            except UserError:
                pass
            detail = getattr(exc, "stderr", "") or ""
            raise _sbatch_error(Exception(f"{exc} {detail}".strip()))
        for t, j in zip(group, jobs):
            out[t["test_id"]] = str(j.job_id)
        manifest["groups"][gi]["released"] = True
        write_json(Path(folder) / "manifest.json", manifest)
    return out


def _find_by_name(names: Iterable[str]) -> Dict[str, str]:
    """{job name: base job id} of the jobs with these names that sacct (14 days) or squeue know."""
    names = list(names)
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
    return found


def recover_tests(folder: Path) -> Dict[str, Dict[str, Any]]:
    """The test-cell jobs of a submission whose submit died between sbatch and recording them
    (``folder``: the submission's test folder): the group names in its manifest.json (written
    before sbatch) looked up in sacct/squeue. Per test id ``{"job_id", "after", "problems"}``;
    ``problems`` says why a job found cannot run: its submitit pickle is missing, or its array was
    left held without its dependencies (the submit died before ``scontrol release``)."""
    manifest = read_json(Path(folder) / "manifest.json", default=None)
    if not manifest:
        return {}
    groups = manifest.get("groups") or []
    found = _find_by_name(g["name"] for g in groups)
    out: Dict[str, Dict[str, Any]] = {}
    for gi, g in enumerate(groups):
        base = found.get(g["name"])
        if not base:
            continue
        single = len(g["tests"]) == 1
        sub = Path(folder) / (f"group{gi}" if len(groups) > 1 else "")
        for i, t in enumerate(g["tests"]):
            jid = base if single else f"{base}_{i}"
            problems = []
            pickle = sub / f"{jid}_submitted.pkl"
            if not pickle.exists():
                problems.append(f"test job {jid} has no submission file ({pickle.name}: the submit was killed "
                                "before submitit wrote it)")
            if g.get("held") and not g.get("released"):
                problems.append(f"test job {jid} was left held without its dependency (the submit was killed "
                                "before it released the array)")
            out[t["test_id"]] = {"job_id": jid, "after": t.get("after"), "problems": problems}
    return out


# ------------------------------------------------------------------------------------------
# scheduler state
# ------------------------------------------------------------------------------------------

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
    job names in manifest.json (written before sbatch) are looked up in sacct/squeue. Each run's
    ``problems`` says why a job found cannot run (its submitit pickle is missing)."""
    manifest = read_json(Path(folder) / "manifest.json", default=None)
    if not manifest:
        return {}
    names = {}
    for g in manifest["groups"]:
        names[g["train_name"]] = (g, "job_id")
        names[g["test_name"]] = (g, "test_job_id")
    found = _find_by_name(names)
    out: Dict[str, Dict[str, Any]] = {}
    groups = manifest["groups"]
    for name, base in found.items():
        g, key = names[name]
        single = len(g["run_ids"]) == 1
        sub = Path(folder) / (f"group{groups.index(g)}" if len(groups) > 1 else "")
        for i, rid in enumerate(g["run_ids"]):
            jid = base if single else f"{base}_{i}"
            got = out.setdefault(rid, {"job_id": None, "test_job_id": None, "problems": []})
            got[key] = jid
            # submitit renames each task's pickle to <job id>_submitted.pkl after sbatch returned; a
            # submit killed in between leaves a job that waits 60 s for it and fails
            pickle = sub / ("train" if key == "job_id" else "test") / f"{jid}_submitted.pkl"
            if not pickle.exists():
                got["problems"].append(f"{'train' if key == 'job_id' else 'test'} job {jid} has no submission "
                                       f"file ({pickle.name}: the submit was killed before submitit wrote it)")
    return {rid: v for rid, v in out.items() if v["job_id"]}


# ------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------
_KIND = {"queued": JobKind.QUEUED, "held": JobKind.HELD, "running": JobKind.RUNNING,
         "suspended": JobKind.RUNNING, "done": JobKind.COMPLETED, "failed": JobKind.FAILED,
         "preempted": JobKind.FAILED, "timeout": JobKind.FAILED, "node_fail": JobKind.FAILED,
         "oom": JobKind.FAILED, "cancelled": JobKind.CANCELLED, "unknown": JobKind.UNKNOWN}


def _gib(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.0f} MiB"


def to_status(job_id: str, rec, name_hint: str = "") -> JobStatus:
    """One answer of :func:`ssflctl.backends.slurm_query.query` as a JobStatus.

    ``rec`` is a JobRecord, a QueryFailed (the job could not be asked about: UNKNOWN with the
    failing command) or None (both commands answered without it: GONE). A record whose job name
    lacks our submission id belongs to another job that got our id after slurmctld's state was
    wiped: for us ours is GONE. Pending reasons that never clear by waiting come with a hint; a
    job killed by a signal or out of memory says which, with its peak memory when sacct has it.
    """
    if rec is None:
        return JobStatus(job_id, JobKind.GONE)
    if isinstance(rec, slurm_query.QueryFailed):
        return JobStatus(job_id, JobKind.UNKNOWN, error=str(rec))
    if isinstance(rec, dict):  # a plain {"state", "exit_code", "name", "reason"} (tests, old callers)
        try:
            kind = slurm_states.kind_of(rec.get("state", ""))
        except slurm_states.UnmappedState:
            return JobStatus(job_id, JobKind.UNKNOWN, raw=rec.get("state", ""),
                             error=f"unmapped Slurm state {rec.get('state')!r}")
        rc, sig = slurm_query.parse_exit_code(rec.get("exit_code", ""))
        rec = slurm_query.JobRecord(job_id=job_id, state=slurm_states.base_state(rec.get("state", "")),
                                    state_text=rec.get("state", ""), kind=kind, reason=rec.get("reason", ""),
                                    exit_code=rc, signal=sig, elapsed=rec.get("elapsed", ""),
                                    name=rec.get("name", ""))
    if name_hint and rec.name and name_hint not in rec.name:
        return JobStatus(job_id, JobKind.GONE, reason=f"job id {job_id} now belongs to another job "
                         f"({rec.name}); the scheduler has no record of ours")
    try:
        verdict = rec.verdict()
    except slurm_states.UnmappedState:
        return JobStatus(job_id, JobKind.UNKNOWN, raw=rec.state, error=f"unmapped Slurm state {rec.state!r}")
    kind = _KIND[verdict.kind.value]
    if kind is JobKind.QUEUED and verdict.stuck:
        kind = JobKind.HELD
    ec = "" if rec.exit_code is None else f"{rec.exit_code}:{rec.signal or 0}"
    st = JobStatus(job_id, kind, raw=rec.state, exit_code=ec, elapsed=rec.elapsed, name=rec.name,
                   error=rec.partial,
                   extra={"max_rss_bytes": rec.max_rss_bytes, "signal": rec.signal_name, "source": rec.source})
    if kind in (JobKind.QUEUED, JobKind.HELD):
        st.reason = rec.reason if rec.reason not in ("None", "(null)") else ""
        if verdict.stuck or kind is JobKind.HELD:
            st.hint = verdict.hint.replace("JOBID", job_id)
    elif kind is JobKind.FAILED:
        bits = []
        if rec.killed_by:
            bits.append(rec.exit_text)
        if verdict.kind.value == "oom" or rec.killed_by == 9:
            if rec.max_rss_bytes:
                bits.append(f"peak memory {_gib(rec.max_rss_bytes)}")
            bits.append("out of memory?" if verdict.kind.value != "oom" else "out of memory")
            st.hint = "raise resources.mem or lower batch_size"
        elif verdict.hint and verdict.kind.value in ("timeout", "preempted", "node_fail"):
            st.hint = verdict.hint.replace("JOBID", job_id)
        st.reason = ", ".join(bits)
    return st


class SlurmBackend(Backend):
    """Slurm through submitit: one train array + one dependent test array per submission."""

    name = "slurm"

    def check_available(self, where: str = "") -> None:
        if not shutil.which("sbatch"):
            raise UserError(f"{where}executor: slurm, but sbatch is not on PATH; submit from the cluster's "
                            "login node or pass --executor local")

    def limits(self, options):
        """The cluster's MaxArraySize, MaxJobCount and the user's MaxSubmitJobs (slurm_limits)."""
        return slurm_limits.read_limits(options)

    def submit(self, tasks, folder, options, fns=None):
        self.check_available()
        tasks = list(tasks)
        if any(isinstance(t, Task) and t.array is None for t in tasks):
            self.plan_arrays(tasks, options)  # not planned by the caller: read the limits now
        return launch([t.__dict__ if isinstance(t, Task) else t for t in tasks], folder, options, fns=fns)

    def submit_tests(self, tests, folder, options, fns=None):
        self.check_available()
        return launch_tests([t.__dict__ if isinstance(t, TestTask) else t for t in tests], folder, options, fns=fns)

    def query(self, jobs):
        jobs = [j for j in jobs if j.job_id]
        raw = slurm_query.query([j.job_id for j in jobs]) if jobs else {}
        return {j.job_id: to_status(j.job_id, raw.get(j.job_id), j.name_hint) for j in jobs}

    def cancel(self, jobs):
        cancel([j.job_id for j in jobs])

    def recover(self, folder):
        if not (Path(folder) / "manifest.json").exists():
            return {}
        return recover(folder)

    def recover_tests(self, folder):
        if not (Path(folder) / "manifest.json").exists():
            return {}
        return recover_tests(folder)

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
