"""What runs on the node: train one run's attempts (with NaN retries), then test the finished one.

Never touches the SQLite registry: everything is written as small JSON files (atomically) in the
attempt directories, which ``ssflctl.control.reconcile.reconcile`` folds into the registry later.

* :func:`train_run` trains the current attempt in-process with ``mmengine.runner.Runner``
  (``work_dir`` = the attempt directory, so mmengine's logs and checkpoints are where mmdet users
  look for them), writes ``progress.json`` at every logging interval and ``outcome.json`` at the
  end. On a non-finite loss (``ssflctl.node.guard.NonFiniteLossError``) it asks
  ``ssflctl.node.retry.decide`` and renders the next attempt (lower lr, from scratch or from the last
  clean checkpoint) inside the same job. Idempotent: an attempt with checkpoints and no outcome
  (requeue, preemption, time limit) resumes from its last checkpoint at the same lr; a finished
  attempt is not retrained. Raises :class:`TrainingFailed` when no attempt finished, so a Slurm
  ``afterok`` dependency is cancelled.
* :func:`test_run` runs mmdet's test loop on the finished attempt's checkpoint, dumps the
  detections (``detections.bbox.json``) and evaluates them with the standard COCO parameters
  (``ssflctl.evaluation.coco``) into ``metrics.json``.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ssflctl import atomic
from ssflctl.plan import render
from ssflctl.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]
LOG_TAIL_LINES = 40


class TrainingFailed(RuntimeError):
    """No attempt of the run finished; ``.outcome`` is the last attempt's outcome.json body."""

    def __init__(self, message: str, outcome: Optional[Dict[str, Any]] = None):
        super().__init__(message)
        self.outcome = outcome

    def __reduce__(self):  # picklable: submitit sends exceptions back to the login node
        return (self.__class__, (str(self), self.outcome))


class TestFailed(RuntimeError):
    pass


TestFailed.__test__ = False  # not a pytest class


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# attempt directories
# --------------------------------------------------------------------------------------------
def attempts(run_dir: PathLike) -> list:
    """Attempt numbers that were rendered (attempt.json exists), ascending."""
    out = []
    for p in Path(run_dir).glob("attempt-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / "attempt.json").is_file():
            out.append(int(suffix))
    return sorted(out)


def last_checkpoint(attempt_dir: PathLike) -> Optional[str]:
    """The attempt's latest complete checkpoint: mmengine's ``last_checkpoint`` pointer when it names
    an existing file, else the highest ``epoch_N.pth``/``iter_N.pth`` that is a complete archive.

    The fallback matters: mmengine rewrites the pointer in place (truncate, then write) after each
    save, so a job killed at that moment (the time-limit signal, measured on the test cluster)
    leaves it empty, and mmengine's own resume then starts the attempt over from scratch. A
    checkpoint cut short while being written has no zip end record and is skipped.
    """
    import zipfile

    adir = Path(attempt_dir)
    try:
        path = (adir / "last_checkpoint").read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        path = ""
    if path and not os.path.isabs(path):
        path = str(adir / path)
    if path and os.path.isfile(path):
        return path
    numbered = []
    for cand in adir.glob("*.pth"):
        m = re.fullmatch(r"(?:epoch|iter)_(\d+)\.pth", cand.name)
        if m:
            numbered.append((int(m.group(1)), cand))
    for _, cand in sorted(numbered, reverse=True):
        if zipfile.is_zipfile(cand):
            return str(cand)
    return None


def log_tail(attempt_dir: PathLike, lines: int = LOG_TAIL_LINES) -> str:
    logs = sorted(Path(attempt_dir).glob("*/*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return ""
    with open(logs[-1], encoding="utf-8", errors="replace") as fh:
        return "".join(fh.readlines()[-lines:])


def _is_main_process() -> bool:
    try:
        from mmengine.dist import is_main_process

        return is_main_process()
    except Exception:  # pragma: no cover
        return True


def _write_outcome(adir: Path, body: Dict[str, Any]) -> Dict[str, Any]:
    body = {"outcome": body["outcome"], "reason": body.get("reason", ""), "nan": body.get("nan"),
            "log_tail": log_tail(adir), "checkpoint": body.get("checkpoint"),
            "finished_at": _now(), **{k: v for k, v in body.items() if k not in (
                "outcome", "reason", "nan", "checkpoint")}}
    if _is_main_process():
        atomic.write_json(adir / "outcome.json", body)
    return body


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------
def _progress_hook(attempt_dir: Path, interval: int):
    """An mmengine Hook instance writing progress.json every ``interval`` iterations (rank 0)."""
    from mmengine.hooks import Hook

    class ProgressHook(Hook):
        priority = "LOW"

        def __init__(self):
            self.t0 = time.time()
            self.path = attempt_dir / "progress.json"

        def _write(self, runner, iters_done: int, outputs=None):
            if not _is_main_process():
                return
            loss = None
            if isinstance(outputs, dict) and "loss" in outputs:
                try:
                    loss = float(outputs["loss"])
                except Exception:
                    loss = None
            try:
                lr = float(runner.optim_wrapper.get_lr()["lr"][0])
            except Exception:
                lr = None
            loop = runner.train_loop
            atomic.write_json(self.path, {
                "epoch": int(runner.epoch) + 1 if hasattr(loop, "max_epochs") else None,
                "max_epochs": getattr(loop, "max_epochs", None),
                "iter": iters_done,
                "max_iters": getattr(loop, "max_iters", None),
                "loss": loss, "lr": lr,
                "time": round(time.time() - self.t0, 3),
                "updated_at": _now(),
            })

        def before_train(self, runner):
            self.t0 = time.time()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            # runner.iter counts iterations before this one; "iter" is written 1-based
            done = int(runner.iter) + 1
            if done % interval == 0 or done >= runner.max_iters:
                self._write(runner, done, outputs)

    return ProgressHook()


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _launcher() -> str:
    try:
        ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        ntasks = 1
    return "slurm" if ntasks > 1 else "none"


def _load_cfg(adir: Path):
    from mmengine.config import Config

    from ssflctl.extensions import compat

    compat.allow_mmengine_checkpoints()
    cfg = Config.fromfile(str(adir / "config.py"))
    # A copy without a filename: mmengine's Runner dumps its runtime config as <timestamp>.py and
    # leaves our rendered config.py untouched.
    cfg = Config(cfg.to_dict(), cfg_text=cfg.text)
    cfg.work_dir = str(adir)
    cfg.launcher = _launcher()
    # mmengine keeps loggers and visualizers as process-wide named instances: a second Runner in
    # the same process (test after train, several runs in one local worker) with mmdet's fixed
    # name 'visualizer' would write its scalars into the first runner's log dir. Unique names:
    stamp = time.strftime("%Y%m%d_%H%M%S")
    cfg.experiment_name = f"{adir.parent.name}-{adir.name}-{stamp}-{time.time_ns() % 10**9:09d}"
    if isinstance(cfg.get("visualizer"), dict):
        cfg.visualizer.name = cfg.experiment_name
    return cfg


def _restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def record_recovery(adir: PathLike, kind: str, message: str, **extra: Any) -> None:
    """Append ``{"at", "kind", "message", ...}`` to ``attempt-N/recovery.json`` (rank 0): the node's
    record of interruptions and resumes, folded into the registry's event log by reconcile."""
    if not _is_main_process():
        return
    path = Path(adir) / "recovery.json"
    try:
        items = list(atomic.read_json(path) or [])
    except (ValueError, OSError):
        items = []
    items.append({"at": _now(), "kind": kind, "message": message, **extra})
    atomic.write_json(path, items)


def current_attempt_dir(run_dir: PathLike) -> Optional[Path]:
    done = attempts(run_dir)
    return render.attempt_dir(run_dir, done[-1]) if done else None


#: set in this process by `note_interrupted`: the scheduler's signal arrived and submitit has
#: requeued the job; whatever the SystemExit it raises turns into on its way out is not a failure
_INTERRUPTED: Optional[str] = None


def note_interrupted(run_dir: PathLike, why: str) -> None:
    """Called on the node when the scheduler signals a time limit/preemption (submitit checkpoint)."""
    global _INTERRUPTED
    _INTERRUPTED = why
    adir = current_attempt_dir(run_dir)
    if adir is None or (adir / "outcome.json").exists():
        return
    prog = atomic.read_json(adir / "progress.json") or {}
    ck = last_checkpoint(adir)
    record_recovery(adir, "interrupted", f"{why} at iter {prog.get('iter')}; last checkpoint "
                    f"{_name(ck) or 'none'}; requeued", iter=prog.get("iter"), checkpoint=_name(ck),
                    restart_count=_restart_count())


def _resume_cause(adir: Path) -> str:
    try:
        items = list(atomic.read_json(adir / "recovery.json") or [])
    except (ValueError, OSError):
        items = []
    if items and items[-1].get("kind") == "interrupted":
        return items[-1]["message"].split(" at iter")[0]
    n = _restart_count()
    return f"requeue (SLURM_RESTART_COUNT={n})" if n else "an interrupted job"


def train_attempt(adir: PathLike) -> Dict[str, Any]:
    """Train one attempt directory to its end; return (and write) its outcome.json body.

    Resumes from the attempt's own last checkpoint when there is one; else from the attempt's
    ``resume_from`` (another attempt's checkpoint); else starts fresh (or from ``load_from``).
    """
    from mmengine.runner import Runner

    adir = Path(adir)
    meta = atomic.read_json(adir / "attempt.json") or {}
    cfg = _load_cfg(adir)
    own = last_checkpoint(adir)
    if own:
        cfg.resume, cfg.load_from = True, own  # named: mmengine's own lookup trusts the pointer file
        prog = atomic.read_json(adir / "progress.json") or {}
        record_recovery(adir, "resumed", f"resumed from {_name(own)} at lr {meta.get('lr')} after "
                        f"{_resume_cause(adir)} (iter {prog.get('iter')} reached before)",
                        checkpoint=_name(own), lr=meta.get("lr"), restart_count=_restart_count())
    elif meta.get("resume_from"):
        cfg.resume, cfg.load_from = True, meta["resume_from"]
    else:
        cfg.resume = False
    if not own and (adir / "progress.json").exists():  # interrupted before its first checkpoint
        record_recovery(adir, "restarted", f"no checkpoint yet: restarted at lr {meta.get('lr')} after "
                        f"{_resume_cause(adir)}", lr=meta.get("lr"), restart_count=_restart_count())
    try:
        from ssflctl.node.guard import NonFiniteLossError
    except ImportError:  # pragma: no cover - the guard is part of the package
        class NonFiniteLossError(Exception):  # type: ignore[no-redef]
            pass

    interval = int(((cfg.get("default_hooks") or {}).get("logger") or {}).get("interval", 50) or 50)
    try:
        runner = Runner.from_cfg(cfg)
        runner.register_hook(_progress_hook(adir, interval), priority="LOW")
        runner.train()
    except NonFiniteLossError as err:
        rec = getattr(err, "record", None) or atomic.read_json(adir / "nan.json")
        return _write_outcome(adir, {"outcome": "nan", "reason": str(err), "nan": rec,
                                     "checkpoint": _name(last_checkpoint(adir))})
    except Exception as err:  # noqa: BLE001 - recorded, then the retry policy decides
        if _INTERRUPTED is not None:
            # submitit's signal handler requeued the job and raised SystemExit wherever training was;
            # library code with a bare `except:` may have turned it into another error (mmengine's
            # Config.pretty_text, called at every checkpoint, raises SyntaxError). Not a failure:
            # leave the attempt without an outcome so the requeued job resumes it.
            raise SystemExit(-1) from err
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        return _write_outcome(adir, {"outcome": "failed", "reason": reason,
                                     "checkpoint": _name(last_checkpoint(adir))})
    return _write_outcome(adir, {"outcome": "done", "reason": "finished",
                                 "checkpoint": _name(last_checkpoint(adir))})


def _name(path: Optional[str]) -> Optional[str]:
    return Path(path).name if path else None


def _next_attempt(run: Dict[str, Any], run_dir: Path, n: int, outcome: Dict[str, Any]) -> Optional[int]:
    """The retry loop's one decision: render attempt n+1 and return n+1, or None to stop."""
    from ssflctl.node import retry

    adir = render.attempt_dir(run_dir, n)
    meta = atomic.read_json(adir / "attempt.json") or {}
    policy = retry.RetryPolicy.from_dict(run.get("retry"), where=f"{run_dir / 'run.json'}: retry")
    decision = retry.decide(policy, adir, n, float(meta.get("lr")), outcome)
    if decision.action == "stop":
        return None
    render.render_attempt(run_dir, n + 1, lr=decision.lr, resume_from=decision.resume_from,
                          reason=decision.reason)
    return n + 1


def _interrupted(adir: Path) -> bool:
    """The attempt ran before (progress or a checkpoint) and has no outcome: requeue/time limit."""
    return (adir / "progress.json").exists() or last_checkpoint(adir) is not None


def _on_preempt(run: Dict[str, Any], run_dir: Path) -> str:
    from ssflctl.node import retry

    return retry.RetryPolicy.from_dict(run.get("retry"), where=f"{run_dir / 'run.json'}: retry").on_preempt


def train_run(run_dir: PathLike) -> Dict[str, Any]:
    """Train the run in ``run_dir`` until an attempt finishes; return that attempt's outcome.

    Renders attempt 1 if none exists. Raises :class:`TrainingFailed` if the retry policy stops
    before an attempt finishes.
    """
    run_dir = Path(run_dir)
    run = render.read_run(run_dir)
    done = attempts(run_dir)
    n = done[-1] if done else None
    if n is None:
        render.render_attempt(run_dir, 1, reason="first attempt")
        n = 1
    while True:
        adir = render.attempt_dir(run_dir, n)
        outcome = atomic.read_json(adir / "outcome.json")
        if outcome is None and _interrupted(adir) and _on_preempt(run, run_dir) != "resume":
            # requeued/timed out with retry.on_preempt restart|fail: the policy decides below
            outcome = _write_outcome(adir, {"outcome": "preempted", "reason": f"interrupted by {_resume_cause(adir)}",
                                            "checkpoint": _name(last_checkpoint(adir))})
        if outcome is None:
            outcome = train_attempt(adir)
        if outcome.get("outcome") == "done":
            return dict(outcome, attempt=n, attempt_dir=str(adir))
        nxt = _next_attempt(run, run_dir, n, outcome)
        if nxt is None:
            raise TrainingFailed(f"{run.get('run_id') or run_dir.name}: attempt {n} ended "
                                 f"{outcome.get('outcome')} ({outcome.get('reason')}); no attempt left",
                                 outcome)
        n = nxt


# --------------------------------------------------------------------------------------------
# testing
# --------------------------------------------------------------------------------------------
def finished_attempt(run_dir: PathLike) -> Optional[Path]:
    for n in reversed(attempts(run_dir)):
        adir = render.attempt_dir(run_dir, n)
        if (atomic.read_json(adir / "outcome.json") or {}).get("outcome") == "done":
            return adir
    return None


def _coco_metric(cfg) -> Dict[str, Any]:
    ev = cfg.get("test_evaluator")
    evs = ev if isinstance(ev, (list, tuple)) else [ev]
    for e in evs:
        if isinstance(e, dict) and e.get("type") in ("CocoMetric", "mmdet.CocoMetric"):
            return e
    raise UserError("config: test_evaluator has no CocoMetric; ssflctl's test step needs one "
                    "(with ann_file) to dump and evaluate detections")


def _voc_only(cfg) -> Optional[Dict[str, Any]]:
    """The VOCMetric when it is the only detection metric (no CocoMetric), else None."""
    ev = cfg.get("test_evaluator")
    evs = [e for e in (ev if isinstance(ev, (list, tuple)) else [ev]) if isinstance(e, dict)]
    types = {str(e.get("type", "")).split(".")[-1] for e in evs}
    if "CocoMetric" in types:
        return None
    return next((e for e in evs if str(e.get("type", "")).split(".")[-1] == "VOCMetric"), None)


def test_attempt(adir: PathLike, checkpoint: Optional[str] = None, force: bool = False) -> Dict[str, Any]:
    """Test one attempt's checkpoint; write detections.bbox.json and metrics.json."""
    from mmengine.runner import Runner

    from ssflctl.evaluation import coco as coco_eval

    adir = Path(adir)
    out = adir / "metrics.json"
    if out.exists() and not force:
        return atomic.read_json(out)
    if checkpoint is None:
        checkpoint = last_checkpoint(adir)
        if checkpoint is None:
            name = (atomic.read_json(adir / "outcome.json") or {}).get("checkpoint")
            checkpoint = str(adir / name) if name and (adir / name).is_file() else None
    if checkpoint is None:
        raise TestFailed(f"{adir}: no checkpoint to test")
    cfg = _load_cfg(adir)
    cfg.resume, cfg.load_from = False, str(checkpoint)
    voc = _voc_only(cfg)
    if voc is not None:
        # VOC: VOCMetric gives mAP@0.5; a CocoMetric without ann_file dumps the detections and a
        # COCO copy of the ground truth (the template keeps 'instances' in the test metainfo).
        metric: Dict[str, Any] = {"type": "CocoMetric", "metric": "bbox"}
        ann_file = str(adir / "detections.gt.json")
    else:
        metric = _coco_metric(cfg)
        ann_file = metric.get("ann_file")
        if not ann_file:
            raise UserError(f"{adir / 'config.py'}: test_evaluator.ann_file is not set")
    prefix = adir / "detections.tmp"
    metric["format_only"] = True
    metric["outfile_prefix"] = str(prefix)
    cfg.test_evaluator = [voc, metric] if voc is not None else metric
    runner = Runner.from_cfg(cfg)
    results = runner.test() or {}
    tmp = Path(f"{prefix}.bbox.json")
    dets = adir / "detections.bbox.json"
    if _is_main_process():
        if tmp.exists():
            os.replace(tmp, dets)
        else:  # no detections at all: mmdet may not write the file
            atomic.write_text(dets, "[]\n")
        if voc is not None and Path(f"{prefix}.gt.json").exists():
            os.replace(f"{prefix}.gt.json", ann_file)
    metrics = coco_eval.evaluate(ann_file, dets)
    if voc is not None:
        thrs = voc.get("iou_thrs", 0.5)
        # 'pascal_voc/mAP' is the mean over iou_thrs at full precision; 'AP50' is rounded to 3 digits
        full = list(thrs) if isinstance(thrs, (list, tuple)) else [thrs]
        mean_ap = results.get("pascal_voc/mAP" if full == [0.5] else "pascal_voc/AP50")
        metrics["voc"] = {"mAP50": None if mean_ap is None else float(mean_ap),
                          "eval_mode": voc.get("eval_mode", "11points"), "evaluator": "mmdet.VOCMetric"}
    metrics["checkpoint"] = Path(checkpoint).name
    metrics["attempt_dir"] = str(adir)
    metrics["tested_at"] = _now()
    if _is_main_process():
        atomic.write_json(out, metrics)
    return metrics


def test_run(run_dir: PathLike, force: bool = False) -> Dict[str, Any]:
    """Test the run's finished attempt; return the metrics.json body (cached unless ``force``)."""
    adir = finished_attempt(run_dir)
    if adir is None:
        raise TestFailed(f"{run_dir}: no finished attempt to test (train it first)")
    return test_attempt(adir, force=force)


test_run.__test__ = False  # type: ignore[attr-defined]
test_attempt.__test__ = False  # type: ignore[attr-defined]


def train_and_test(run_dir: PathLike) -> Dict[str, Any]:
    """Train, then test if run.json says so (``test`` defaults to true); both in this process."""
    outcome = train_run(run_dir)
    run = render.read_run(run_dir)
    result: Dict[str, Any] = {"outcome": outcome}
    if run.get("test", True):
        result["metrics"] = test_run(run_dir)
    return result
