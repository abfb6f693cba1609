"""Local backend: a detached runner process that works through a queue of runs, a few at a time.

Why not submitit's LocalExecutor: its controller processes are plain children of the submitting
python (no new session), so SIGHUP to the shell's process group kills them, and it has no
concurrency limit. Here ``submit`` starts ``python -m ssflctl.backends.local <folder>`` in a new
session (setsid, stdin from /dev/null, output to a file) and returns at once. The runner ignores
SIGHUP, starts each run as ``python -m ssflctl.backends.local --task FN RUN_DIR`` in its own session,
and records every task's state in ``<folder>/tasks/<i>.json`` (atomically). Cancel: a
``<i>.cancel`` marker (pending tasks) and SIGTERM to the task's process group (running tasks).

``resources.gpus: N`` (N > 1) is N processes, one per GPU, as torchrun starts them: the task process
is rank 0 and starts ranks 1..N-1 in its own session (one cancel stops all), each with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` (a free port) and
``CUDA_VISIBLE_DEVICES`` = the run's N GPUs (mmengine's ``pytorch`` launcher takes device
LOCAL_RANK); rank K's output goes to ``<i>.rank<K>.log``. Never more GPUs than the machine has: a
run that asks for more than it shows fails with the reason. On a machine without GPUs the N
processes train on the CPU with gloo (at most one per core).
"""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from ssflctl.atomic import read_json, write_json
from ssflctl.backends.base import (TEST_CELL_FN, TRAIN_AND_TEST_FN, THREAD_VARS, Backend, JobKind, JobStatus, Task,
                                   TestTask)
from ssflctl.errors import UserError

RUNNER_MODULE = "ssflctl.backends.local"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def launch(tasks: List[Dict[str, Any]], folder: Path, options: Dict[str, Any],
           fns: Optional[Dict[str, str]] = None) -> Dict[str, Dict[str, Any]]:
    folder = Path(folder).resolve()
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    fn = (fns or {}).get("local", TRAIN_AND_TEST_FN)
    queue = {
        "max_parallel": int(options.get("max_parallel") or 1),
        "fn": fn,
        "tasks": [{"index": i, "run_id": t["run_id"], "run_dir": str(Path(t["run_dir"]).resolve()),
                   "gpus": int((t.get("resources") or {}).get("gpus", 0)),
                   "nodes": int((t.get("resources") or {}).get("nodes", 1) or 1),
                   "cpus": int((t.get("resources") or {}).get("cpus", 0) or 0),
                   **({"after": t["after"]} if t.get("after") else {})}
                  for i, t in enumerate(tasks)],
        "created_at": _now(),
    }
    write_json(folder / "queue.json", queue)
    for t in queue["tasks"]:
        write_json(folder / "tasks" / f"{t['index']}.json", {"state": "pending", "run_id": t["run_id"]})
    log = open(folder / "runner.log", "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", RUNNER_MODULE, str(folder)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd=os.getcwd(),
        )
    finally:
        log.close()
    write_json(folder / "runner.json", {"pid": proc.pid, "started_at": _now(), "cmd": RUNNER_MODULE})
    return {t["run_id"]: {"job_id": f"local-{proc.pid}_{t['index']}", "test_job_id": None} for t in queue["tasks"]}


# ------------------------------------------------------------------------------------------
# state queries (login node side)
# ------------------------------------------------------------------------------------------

def pid_alive(pid: Optional[int], marker: str = "") -> bool:
    """True if ``pid`` exists (and, when given, its command line contains ``marker``)."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # zombie: finished, not yet reaped
            return False
    except (OSError, IndexError):
        pass
    if marker:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return True
        return marker in cmd
    return True


def runner_alive(folder: Path) -> bool:
    """Whether the submission's runner process is alive (runner.json's pid)."""
    runner = read_json(Path(folder) / "runner.json", default={}) or {}
    return pid_alive(runner.get("pid"), RUNNER_MODULE)


def task_state(folder: Path, index: int, runners: Optional[Dict[str, bool]] = None) -> Dict[str, Any]:
    """The task's recorded state; ``lost`` if it claims pending/running but its runner is gone.
    ``runners``: {folder: runner alive} already asked in this query (one question per submission)."""
    key = os.fspath(folder)
    st = read_json(os.path.join(key, "tasks", f"{index}.json"), default=None) or {"state": "missing"}
    if st.get("state") in ("pending", "running"):
        if runners is None:
            alive = runner_alive(folder)
        else:
            if key not in runners:
                runners[key] = runner_alive(folder)
            alive = runners[key]
        if not alive and not (st.get("state") == "running" and pid_alive(st.get("pid"), RUNNER_MODULE)):
            st = dict(st, state="lost")
    return st


def parse_job_id(job_id: str):
    """'local-<runner pid>_<index>' -> (pid, index) or None."""
    if not job_id or not job_id.startswith("local-"):
        return None
    pid, _, idx = job_id[6:].partition("_")
    try:
        return int(pid), int(idx)
    except ValueError:
        return None


def recover(folder: Path) -> Dict[str, Dict[str, Any]]:
    """Job ids of a submission whose submit process died before recording them (``{}`` if the
    runner never started)."""
    folder = Path(folder)
    queue = read_json(folder / "queue.json", default=None)
    runner = read_json(folder / "runner.json", default=None)
    if not queue or not runner:
        return {}
    return {t["run_id"]: {"job_id": f"local-{runner['pid']}_{t['index']}", "test_job_id": None}
            for t in queue["tasks"]}


def recover_tests(folder: Path) -> Dict[str, Dict[str, Any]]:
    """The test-cell jobs of a submission whose submit died before recording them (``folder``: the
    submission's test folder, a runner of its own): per test id ``{"job_id", "after", "problems"}``."""
    queue = read_json(Path(folder) / "queue.json", default=None)
    got = recover(folder)
    after = {t["run_id"]: t.get("after") for t in (queue or {}).get("tasks", [])}
    return {tid: {"job_id": v["job_id"], "after": after.get(tid), "problems": []} for tid, v in got.items()}


def cancel(folder: Path, index: int) -> None:
    folder = Path(folder)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    (folder / "tasks" / f"{index}.cancel").write_text(_now())
    st = read_json(folder / "tasks" / f"{index}.json", default={}) or {}
    pid = st.get("pid")
    if st.get("state") == "running" and pid_alive(pid, RUNNER_MODULE):
        try:
            os.killpg(int(pid), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------------------------------
# the runner (detached) and the task entry point
# ------------------------------------------------------------------------------------------

def _write_task(folder: Path, index: int, **st: Any) -> None:
    path = folder / "tasks" / f"{index}.json"
    cur = read_json(path, default={}) or {}
    cur.update(st)
    write_json(path, cur)


def run_queue(folder: Path, poll_s: float = 0.5) -> int:
    folder = Path(folder)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not (folder / "runner.json").exists():  # the launcher may have died before writing it
        write_json(folder / "runner.json", {"pid": os.getpid(), "started_at": _now(), "cmd": RUNNER_MODULE})
    queue = read_json(folder / "queue.json")
    maxp = max(1, int(queue.get("max_parallel", 1)))
    pending = list(queue["tasks"])
    running: Dict[int, subprocess.Popen] = {}
    stopping = {"flag": False}

    def _term(signum, frame):  # cancel of the whole submission
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    kill_at: Dict[int, float] = {}
    gpus = visible_gpus()
    free: List[str] = list(gpus)
    held: Dict[int, List[str]] = {}
    while pending or running:
        for t in list(pending):
            if stopping["flag"] or (folder / "tasks" / f"{t['index']}.cancel").exists():
                pending.remove(t)
                _write_task(folder, t["index"], state="cancelled", ended_at=_now())
        while pending and len(running) < maxp and not stopping["flag"]:
            t = pending[0]
            need = int(t.get("gpus", 0))
            env = dict(os.environ)
            too_many = _too_many(need, gpus) or (
                f"resources.nodes is {t['nodes']}: the local executor runs on this machine only; use the "
                "Slurm executor for several nodes" if int(t.get("nodes", 1)) > 1 else "")
            if too_many:
                pending.pop(0)
                _write_task(folder, t["index"], state="failed", returncode=2, reason=too_many, ended_at=_now())
                (folder / f"{t['index']}.log").write_text(f"ssflctl local runner: {too_many}\n")
                continue
            if need > 1:
                env[NPROC_VAR] = str(need)
            if need and gpus:  # GPU slots: each task gets its own devices
                if len(free) < need:
                    break  # wait for a running task to give its GPUs back
                held[t["index"]], free[:] = free[:need], free[need:]
                env["CUDA_VISIBLE_DEVICES"] = ",".join(held[t["index"]])
            if t.get("cpus"):  # a run's cpus are its threads, as a Slurm cpus-per-task allocation would be
                for var in THREAD_VARS:
                    env.setdefault(var, str(max(1, int(t["cpus"]) // max(1, need))))
            pending.pop(0)
            env["SSFLCTL_LOCAL_LOGDIR"], env["SSFLCTL_LOCAL_INDEX"] = str(folder), str(t["index"])
            logf = open(folder / f"{t['index']}.log", "ab")
            try:
                p = subprocess.Popen(
                    [sys.executable, "-m", RUNNER_MODULE, "--task", queue["fn"], t["run_dir"]],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                    env=env,
                )
            finally:
                logf.close()
            running[t["index"]] = p
            _write_task(folder, t["index"], state="running", pid=p.pid, started_at=_now(),
                        gpus=held.get(t["index"], []))
        for idx, p in list(running.items()):
            cancelled = stopping["flag"] or (folder / "tasks" / f"{idx}.cancel").exists()
            if cancelled and p.poll() is None:
                if idx not in kill_at:
                    kill_at[idx] = time.time() + 15
                    _signal_group(p.pid, signal.SIGTERM)
                elif time.time() > kill_at[idx]:
                    _signal_group(p.pid, signal.SIGKILL)
            rc = p.poll()
            if rc is None:
                continue
            del running[idx]
            free.extend(held.pop(idx, []))
            state = "cancelled" if cancelled else ("done" if rc == 0 else "failed")
            _write_task(folder, idx, state=state, returncode=rc, ended_at=_now())
        time.sleep(poll_s)
    return 0


#: set by the runner for a run of N > 1 processes (the task process starts the other ranks)
NPROC_VAR = "SSFLCTL_LOCAL_NPROC"


def _too_many(need: int, gpus: List[str]) -> str:
    """Why a run of ``need`` GPUs cannot run here ("" when it can)."""
    if need > 1 and gpus and need > len(gpus):
        return (f"resources.gpus is {need} but this machine has {len(gpus)} GPU(s) "
                f"({', '.join(gpus)}); lower resources.gpus or use the Slurm executor")
    if need > 1 and not gpus and need > (os.cpu_count() or 1):
        return (f"resources.gpus is {need}: no GPU here, and {need} CPU processes are more than the "
                f"{os.cpu_count()} cores")
    return ""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(n: int, fn: str, run_dir: str) -> List[subprocess.Popen]:
    """Rank 0 (this process) starts ranks 1..n-1 with torchrun's variables; sets its own."""
    port = str(_free_port())
    os.environ.update({"WORLD_SIZE": str(n), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": port})
    out_dir = Path(os.environ.get("SSFLCTL_LOCAL_LOGDIR", "."))
    procs = []
    for k in range(1, n):
        env = dict(os.environ, RANK=str(k), LOCAL_RANK=str(k))
        env.pop(NPROC_VAR, None)
        log = open(out_dir / f"{os.environ.get('SSFLCTL_LOCAL_INDEX', 'task')}.rank{k}.log", "ab")
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", RUNNER_MODULE, "--task", fn, run_dir],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=env))
        finally:
            log.close()
    return procs


def visible_gpus() -> List[str]:
    """GPU ids this machine offers: $CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_task(fn: str, run_dir: str) -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    n = int(os.environ.pop(NPROC_VAR, "1") or 1)
    others = _start_ranks(n, fn, run_dir) if n > 1 else []
    mod, _, name = fn.partition(":")
    rc = 0
    try:
        getattr(importlib.import_module(mod), name)(run_dir)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    except BaseException:
        traceback.print_exc()
        rc = 1
    for p in others:  # the run ends when every rank has; after a failure of rank 0 none waits on it
        try:
            code = p.wait(timeout=None if rc == 0 else 30)
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
        rc = rc or (1 if code else 0)
    return rc


def main(argv: List[str]) -> int:
    if len(argv) == 3 and argv[0] == "--task":
        return run_task(argv[1], argv[2])
    if len(argv) == 1:
        return run_queue(Path(argv[0]))
    print("usage: python -m ssflctl.backends.local FOLDER | --task MODULE:FN RUN_DIR", file=sys.stderr)
    return 2


_KINDS = {"pending": JobKind.QUEUED, "running": JobKind.RUNNING, "cancelled": JobKind.CANCELLED,
          "done": JobKind.COMPLETED, "failed": JobKind.FAILED}


def _signal_name(rc: Optional[int]) -> str:
    if rc is not None and rc < 0:
        try:
            return f" ({signal.Signals(-rc).name})"
        except ValueError:
            return ""
    return ""


class LocalBackend(Backend):
    """Detached runner processes on this machine (train and test in one process per run)."""

    name = "local"
    test_in_train_job = True

    def submit(self, tasks, folder, options, fns=None):
        return launch([t.__dict__ if isinstance(t, Task) else t for t in tasks], folder, options, fns=fns)

    def submit_tests(self, tests, folder, options, fns=None):
        """The test cells in a runner of their own (``<submission>/tests``). A cell whose training
        is still to run waits, in its task, for the train task's state file to say done (the
        file and the states to wait for are written into the cell's definition as ``wait_for``)."""
        from ssflctl.workdir.layout import RunDir

        tasks = []
        for t in tests:
            t = t if isinstance(t, TestTask) else TestTask(**t)
            parsed = parse_job_id(t.after) if t.after else None
            if t.after and (parsed is None or not t.after_folder):
                raise UserError(f"test {t.test_id}: cannot wait for job {t.after} on the local backend")
            if parsed is not None:
                run = RunDir(t.run_dir)
                body = run.test_cell(t.test_id) or {}
                body["wait_for"] = {"file": str(Path(t.after_folder).resolve() / "tasks" / f"{parsed[1]}.json"),
                                    "ok": ["done"], "fail": ["failed", "cancelled", "lost", "missing"]}
                run.write_test_cell(body)
            tasks.append({"run_id": t.test_id, "run_dir": t.cell, "resources": t.resources, "after": t.after})
        got = launch(tasks, folder, options, fns={"local": (fns or {}).get("test_cell", TEST_CELL_FN)})
        return {tid: v["job_id"] for tid, v in got.items()}

    def query(self, jobs):
        out = {}
        runners: Dict[str, bool] = {}
        for j in jobs:
            parsed = parse_job_id(j.job_id)
            if parsed is None or j.folder is None:
                out[j.job_id] = JobStatus(j.job_id, JobKind.GONE, reason="no record of the local job")
                continue
            st = task_state(j.folder, parsed[1], runners)
            s = st.get("state", "missing")
            if s == "lost":
                out[j.job_id] = JobStatus(j.job_id, JobKind.GONE, raw="lost",
                                          reason="the local runner process is gone (killed or machine restarted)")
            elif s in _KINDS:
                rc = st.get("returncode")
                status = JobStatus(j.job_id, _KINDS[s], raw=s, exit_code="" if rc is None else str(rc))
                if s == "failed":
                    status.raw, status.exit_code = f"exited with code {rc}{_signal_name(rc)}; see `ssflctl logs`", ""
                out[j.job_id] = status
            else:
                out[j.job_id] = JobStatus(j.job_id, JobKind.GONE, reason="no record of the local job")
        return out

    def cancel(self, jobs):
        for j in jobs:
            parsed = parse_job_id(j.job_id)
            if parsed and j.folder is not None:
                cancel(Path(j.folder), parsed[1])

    def recover(self, folder):
        return recover(folder)

    def recover_tests(self, folder):
        return recover_tests(folder)

    def job_output(self, job):
        parsed = parse_job_id(job.job_id)
        return Path(job.folder) / f"{parsed[1]}.log" if parsed and job.folder is not None else None

    def describe_where(self, options):
        return "local"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
