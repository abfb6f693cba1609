"""Slurm backend (submitit): one job array for the train jobs of a submission (one sbatch call per
resource group, optional %N throttle) and one test array whose task i starts after train task i
succeeded (``aftercorr``; ``afterok`` for a single job). Nothing waits on the login node.

Also: sacct/squeue queries (`job_states`) and scancel.
"""
from __future__ import annotations

import importlib
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import submitit
import submitit.helpers

from ssflctl.atomic import read_json, write_json
from ssflctl.errors import UserError
from ssflctl.backends import THREAD_VARS


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

    def __init__(self, fn: str = "ssflctl.node.job:train_run", timeout_min: Optional[float] = None):
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


def run_test(run_dir: str, fn: str = "ssflctl.node.job:test_run"):
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
    train_fn = fns.get("train", "ssflctl.node.job:train_run")
    test_fn = fns.get("test", "ssflctl.node.job:test_run")
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


def parse_sacct(text: str) -> Dict[str, Dict[str, str]]:
    """Parse ``sacct -X -n -P -o JobID,State,ExitCode,Elapsed`` output."""
    out: Dict[str, Dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4 or not parts[0]:
            continue
        jid, state, code, elapsed = parts[:4]
        state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
        for j in _expand_ids(jid):
            out[j] = {"state": state, "exit_code": code, "elapsed": elapsed}
            if len(parts) > 4:
                out[j]["name"] = parts[4]
    return out


def parse_squeue(text: str) -> Dict[str, Dict[str, str]]:
    out: Dict[str, Dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        for j in _expand_ids(parts[0]):
            out[j] = {"state": parts[1], "exit_code": "", "elapsed": parts[2] if len(parts) > 2 else ""}
            if len(parts) > 3:
                out[j]["name"] = parts[3]
    return out


def job_states(job_ids: Iterable[str]) -> Dict[str, Dict[str, str]]:
    """State per job id from sacct (falling back to squeue if sacct is unavailable)."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    bases = sorted({j.split("_")[0] for j in ids})
    states: Dict[str, Dict[str, str]] = {}
    try:
        proc = subprocess.run(["sacct", "-j", ",".join(bases), "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Elapsed,JobName%200"],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            states.update(parse_sacct(proc.stdout))
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:  # squeue is authoritative for what is still queued/running (sacct may lag)
        proc = subprocess.run(["squeue", "-h", "-j", ",".join(bases), "-o", "%i|%T|%M|%j"],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            for j, st in parse_squeue(proc.stdout).items():
                if j not in states or states[j]["state"] in ("PENDING", "RUNNING", "REQUEUED", "UNKNOWN"):
                    states[j] = st
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {j: states[j] for j in ids if j in states}


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
