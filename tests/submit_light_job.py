"""A LIGHT stand-in for `ssflctl.plan.render.render_attempt` and `ssflctl.node.job` used by the submission
matrix tests (local processes and Slurm): it writes the same attempt files as the real job
(attempt.json, progress.json, outcome.json, metrics.json) in about a second, so the tests exercise
ssflctl's launch/registry/reconcile machinery without training. The real job is covered by
tests/test_submit_local.py::test_real_tiny_training_run (marked `training`).

``LIGHT_JOB_STEPS``/``LIGHT_JOB_SLEEP`` set its length; ``LIGHT_JOB_IGNORE_USR2`` makes it ignore
Slurm's SIGUSR2 warning (it then runs into its time limit); env.json has its ``pid``.

A run fails on purpose when ``<workspace>/fail/<run name>`` exists (the workspace is the run dir's
grandparent), so tests can make exactly one run fail.
"""
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from ssflctl.atomic import write_json


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _latest(run_dir: Path) -> Path:
    dirs = sorted((p for p in run_dir.glob("attempt-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    return dirs[-1]


def light_render(run_dir, attempt, *, lr=None, resume_from=None, reason="first attempt", run=None):
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    adir = run_dir / f"attempt-{attempt}"
    adir.mkdir(parents=True, exist_ok=True)
    write_json(adir / "attempt.json", {"run_id": run["run_id"], "attempt": attempt,
                                       "lr": lr if lr is not None else run["params"].get("lr"),
                                       "resume_from": resume_from, "reason": reason, "test": run["test"],
                                       "rendered_at": _now()})
    return adir


def light_train(run_dir):
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    adir = _latest(run_dir)
    info = json.loads((adir / "attempt.json").read_text())
    if os.environ.get("LIGHT_JOB_IGNORE_USR2"):  # a job that does not act on Slurm's warning signal
        import signal

        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    write_json(adir / "env.json", {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                   "start": time.time(), "pid": os.getpid()})
    steps = int(os.environ.get("LIGHT_JOB_STEPS", "3"))
    for it in range(1, steps + 1):
        write_json(adir / "progress.json", {"epoch": 1, "max_epochs": 1, "iter": it, "max_iters": steps,
                                            "loss": 1.0 / it, "lr": info["lr"], "time": 0.1, "updated_at": _now()})
        time.sleep(float(os.environ.get("LIGHT_JOB_SLEEP", "0.3")))
    (adir / "20260101_000000").mkdir(exist_ok=True)
    (adir / "20260101_000000" / "20260101_000000.log").write_text(f"light job log for {run['run_id']}\n")
    if (run_dir.parent.parent / "fail" / run["name"]).exists():
        write_json(adir / "outcome.json", {"outcome": "failed", "reason": "poisoned on purpose by the test",
                                           "nan": None, "log_tail": "", "checkpoint": None, "finished_at": _now()})
        raise RuntimeError("poisoned on purpose by the test")
    env = json.loads((adir / "env.json").read_text())
    write_json(adir / "env.json", dict(env, end=time.time()))
    write_json(adir / "outcome.json", {"outcome": "done", "reason": "trained", "nan": None, "log_tail": "",
                                       "checkpoint": "epoch_1.pth", "finished_at": _now()})
    return {"outcome": "done"}


def light_test(run_dir):
    adir = _latest(Path(run_dir))
    metrics = {"bbox": {"AP": 0.1}, "per_class": {}, "num_images": 1, "num_detections": 1,
               "evaluator": "light", "ann_file": "", "checkpoint": "epoch_1.pth"}
    write_json(adir / "metrics.json", metrics)
    return metrics


def light_train_and_test(run_dir):
    light_train(run_dir)
    return light_test(run_dir)


FNS = {"train": "submit_light_job:light_train", "test": "submit_light_job:light_test",
       "local": "submit_light_job:light_train_and_test"}


def wait_states(ws, experiment: str, want=frozenset({"done"}), timeout: float = 60, every: float = 0.3) -> set:
    """The experiment's run states by ``ssflctl status``'s view, polled until they are ``want`` or
    ``timeout`` seconds passed (the caller asserts on what it got)."""
    from ssflctl.commands.status import view
    from ssflctl.registry.store import Registry

    deadline = time.time() + timeout
    while True:
        with Registry(ws) as reg:
            states = {i["state"] for i in view(reg, ws, experiment)}
        if states == set(want) or time.time() > deadline:
            return states
        time.sleep(every)
