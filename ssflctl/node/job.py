"""What runs on the node: train one run's attempts (with NaN retries), then test the finished one.

Never touches the SQLite registry: everything is written as small JSON files (atomically) in the
attempt directories through :mod:`ssflctl.workdir` (the one owner of that layout), which
``ssflctl.control.reconcile`` folds into the registry later.

* :func:`train_run` trains the current attempt in-process with ``mmengine.runner.Runner``
  (``work_dir`` = the attempt directory, so mmengine's logs and checkpoints are where mmdet users
  look for them), writes ``progress.json`` at every logging interval and ``outcome.json`` at the
  end, both with the base lr the optimizer really trains at (``effective_lr``: after mmengine's
  ``auto_scale_lr``). On a non-finite loss (``ssflctl.node.guard.NonFiniteLossError``) it asks
  ``ssflctl.node.retry.decide`` and renders the next attempt (lower config lr, from scratch or from the last
  clean checkpoint) inside the same job. Idempotent: an attempt with checkpoints and no outcome
  (requeue, preemption, time limit) resumes from its last checkpoint at the same lr; a finished
  attempt is not retrained. Raises :class:`TrainingFailed` when no attempt finished, so a Slurm
  ``afterok`` dependency is cancelled.
* :func:`test_run` runs mmdet's test loop on the finished attempt's checkpoint, dumps the
  detections (``detections.bbox.json``) and evaluates them with the standard COCO parameters
  (``ssflctl.evaluation.coco``) into ``metrics.json``.

Several GPUs (``resources.gpus`` × ``resources.nodes`` tasks, :mod:`ssflctl.node.dist`): every rank
runs :func:`train_run`; rank 0 alone takes the decisions that read and write the run directory
(which attempt, which checkpoint to resume, the retry) and hands them to the others
(:func:`ssflctl.node.dist.on_main`), and rank 0 alone writes progress/outcome/recovery/nan/metrics.
Every rank keeps its own log (rank 0: mmengine's ``<ts>/<ts>.log``; rank K: ``ranks/<ts>.rankK.log``).
The NaN guard stops all ranks at the same iteration; the retry runs on all of them. The test step
runs on one process (rank 0 after leaving the process group; the Slurm test job is one task).
"""
from __future__ import annotations

import datetime as _dt
import os
import time
import traceback as _tb
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ssflctl import atomic
from ssflctl.errors import UserError
from ssflctl.node import dist
from ssflctl.plan import render
from ssflctl.workdir.checkpoints import latest_checkpoint
from ssflctl.workdir.layout import AttemptDir, RunDir, TestDir
from ssflctl.workdir.records import Outcome, Progress, Recovery

PathLike = Union[str, "os.PathLike[str]"]
LOG_TAIL_LINES = 40
#: outcome.json's ``traceback``: about this many lines (the innermost frames of each chained exception)
TRACEBACK_LINES = 15


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


def _is_main_process() -> bool:
    """Rank 0 (the process group's rank, else the environment's: SLURM_PROCID / RANK)."""
    return dist.is_main()


def exception_reason(err: BaseException) -> str:
    """One line naming the exception: ``TypeError: AnchorHead.__init__() got an unexpected ...``
    (its message's lines joined, at most 500 characters)."""
    msg = " ".join(str(err).split())
    return (f"{type(err).__name__}: {msg}" if msg else type(err).__name__)[:500]


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def _chain(err: BaseException):
    """[(exception, the sentence linking it to the next one or "")], root cause first, the
    exception ``err`` last: what ``traceback.format_exception`` prints, in its order."""
    outer_first, cur, seen = [(err, "")], err, {id(err)}
    while True:
        if cur.__cause__ is not None:
            nxt, link = cur.__cause__, _CAUSE
        elif cur.__context__ is not None and not cur.__suppress_context__:
            nxt, link = cur.__context__, _CONTEXT
        else:
            break
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        outer_first.append((nxt, link))
        cur = nxt
    return outer_first[::-1]


def format_failure(err: BaseException, max_lines: int = TRACEBACK_LINES) -> str:
    """The exception's own traceback for outcome.json and the text log: as
    ``traceback.format_exception`` writes it (chained causes included, root cause first), each
    exception with its innermost frames only (where it was raised), as many as fit in about
    ``max_lines`` lines."""
    chain = _chain(err)

    def render(frames: int) -> list:
        lines = []
        for exc, link in chain:
            te = _tb.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
            stack = list(te.stack)
            if stack:
                lines.append("Traceback (most recent call last):")
                if len(stack) > frames:
                    left = len(stack) - frames
                    lines.append(f"  [... {left} outer frame{'s' if left != 1 else ''}]")
                lines += "".join(_tb.StackSummary.from_list(stack[-frames:]).format()).rstrip("\n").splitlines()
            lines += "".join(te.format_exception_only()).rstrip("\n").splitlines()
            if link:
                lines += ["", link, ""]
        return lines

    lines = render(3)
    for frames in (2, 1):
        if len(lines) <= max_lines:
            break
        lines = render(frames)
    if len(lines) > max_lines:
        lines = lines[-max_lines:]
    return "\n".join(lines) + "\n"


def _record_failure(adir: Path, err: BaseException) -> str:
    """The exception's traceback (:func:`format_failure`), appended to this rank's text log so
    ``ssflctl logs`` ends with it; returned for outcome.json."""
    text = format_failure(err)
    try:
        AttemptDir(adir).append_text_log(f"ssflctl: the attempt ended with an exception:\n{text}",
                                         rank=dist.rank() if dist.initialized() else 0)
    except OSError:
        pass  # the outcome still carries it
    return text


def _write_outcome(adir: Path, body: Dict[str, Any]) -> Dict[str, Any]:
    """Write outcome.json (rank 0) and return its body."""
    a = AttemptDir(adir)
    extra = {k: v for k, v in body.items() if k not in ("outcome", "reason", "nan", "checkpoint")}
    rec = Outcome.from_json({"outcome": body["outcome"], "reason": body.get("reason", ""), "nan": body.get("nan"),
                             "log_tail": a.log_tail(LOG_TAIL_LINES), "checkpoint": body.get("checkpoint"),
                             "finished_at": _now(), **extra})
    if _is_main_process():
        a.write_outcome(rec)
    return rec.to_json()


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------
def _progress_hook(attempt_dir: Path, interval: int):
    """An mmengine Hook instance writing progress.json every ``interval`` iterations (rank 0).

    At ``before_train`` (mmengine 0.10.7: the optimizer built and scaled by ``auto_scale_lr``, the
    schedulers built, the checkpoint resumed, ``LrOverrideHook`` (VERY_HIGH) applied; this hook is
    LOW) it measures the base lr the optimizer trains with
    (:func:`ssflctl.node.lr_resume.effective_lr`) into ``.effective_lr`` (an
    :class:`~ssflctl.workdir.records.EffectiveLr`, None when it could not be measured); every
    progress.json carries it, and :func:`train_attempt` puts it in outcome.json."""
    from mmengine.hooks import Hook

    from ssflctl.node.lr_resume import effective_lr

    class ProgressHook(Hook):
        priority = "LOW"

        def __init__(self):
            self.t0 = time.time()
            self.effective_lr = None

        def _write(self, runner, iters_done: int, outputs=None):
            if not _is_main_process():
                return
            loss = None
            if isinstance(outputs, dict) and "loss" in outputs:
                try:
                    v = outputs["loss"]
                    loss = float(v.detach() if hasattr(v, "detach") else v)
                except Exception:
                    loss = None
            try:
                lr = float(runner.optim_wrapper.get_lr()["lr"][0])
            except Exception:
                lr = None
            loop = runner.train_loop
            AttemptDir(attempt_dir).write_progress(Progress(
                epoch=int(runner.epoch) + 1 if hasattr(loop, "max_epochs") else None,
                max_epochs=getattr(loop, "max_epochs", None), iter=iters_done,
                max_iters=getattr(loop, "max_iters", None), loss=loss, lr=lr,
                time=round(time.time() - self.t0, 3), updated_at=_now(), effective_lr=self.effective_lr))

        def before_train(self, runner):
            self.t0 = time.time()
            try:
                self.effective_lr = effective_lr(runner)
            except Exception as err:  # noqa: BLE001 - a fact to show, never a reason to stop training
                self.effective_lr = None
                runner.logger.warning(f"ssflctl: the effective lr could not be measured: {err!r}")
                return
            eff = self.effective_lr
            if eff.scale is not None:
                runner.logger.info(f"ssflctl: optimizer base lr {eff.text()} (×{eff.scale:g}: total batch "
                                   f"{eff.batch} / auto_scale_lr.base_batch_size {eff.base_batch})")

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
    """mmengine's launcher: ``slurm`` (srun tasks) or ``pytorch`` (torchrun-style variables, the
    local executor) in a process group made by :func:`ssflctl.node.dist.setup`, else ``none``."""
    return dist.world().launcher if dist.initialized() else "none"


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
    if cfg.launcher != "none" and not dist.cuda():
        # mmengine's wrap_model passes device_ids=[LOCAL_RANK], which DDP refuses for a CPU module
        wrapper = dict(cfg.get("model_wrapper_cfg") or {"type": "MMDistributedDataParallel",
                                                        "broadcast_buffers": False})
        wrapper["device_ids"] = None
        cfg.model_wrapper_cfg = wrapper
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


def record_recovery(adir: PathLike, kind: str, message: str, **fields: Any) -> None:
    """Append a :class:`~ssflctl.workdir.records.Recovery` entry to the attempt's recovery.json
    (rank 0): the node's record of interruptions and resumes, folded into the registry's event log
    by reconcile. ``fields`` are the entry's structured facts (cause, iter, checkpoint, lr, ...)."""
    if not _is_main_process():
        return
    AttemptDir(adir).append_recovery(Recovery.from_json({"at": _now(), "kind": kind, "message": message, **fields}))


def current_attempt_dir(run_dir: PathLike) -> Optional[Path]:
    rendered = RunDir(run_dir).attempts(rendered_only=True)
    return rendered[-1].path if rendered else None


#: set in this process by `note_interrupted`: the scheduler's signal arrived and submitit has
#: requeued the job; whatever the SystemExit it raises turns into on its way out is not a failure
_INTERRUPTED: Optional[str] = None


def note_interrupted(run_dir: PathLike, why: str) -> None:
    """Called on the node when the scheduler signals a time limit/preemption (submitit checkpoint)."""
    global _INTERRUPTED
    _INTERRUPTED = why
    adir = current_attempt_dir(run_dir)
    if adir is None:
        return
    a = AttemptDir(adir)
    if a.outcome is not None:
        return
    it = a.progress.iter if a.progress is not None else None
    ck = latest_checkpoint(adir)
    record_recovery(adir, "interrupted", f"{why} at iter {it}; last checkpoint {_name(ck) or 'none'}; requeued",
                    cause=why, iter=it, checkpoint=_name(ck), restart_count=_restart_count())


def _resume_cause(adir: Path) -> str:
    """What stopped the attempt last: the interruption's recorded cause, else the requeue count."""
    intr = AttemptDir(adir).last_interruption()
    if intr is not None and intr.cause:
        return intr.cause
    n = _restart_count()
    return f"requeue (SLURM_RESTART_COUNT={n})" if n else "an interrupted job"


def _resume_point(adir: Path) -> Optional[str]:
    """The attempt's own latest checkpoint, and the recovery entry saying what happens (rank 0)."""
    a = AttemptDir(adir)
    lr = a.info.lr
    own = latest_checkpoint(adir)
    if own:
        cause = _resume_cause(adir)
        reached = a.progress.iter if a.progress is not None else None
        record_recovery(adir, "resumed", f"resumed from {_name(own)} at lr {lr} after {cause} "
                        f"(iter {reached} reached before)", cause=cause, iter=reached,
                        checkpoint=_name(own), lr=lr, restart_count=_restart_count())
    elif a.progress is not None:  # interrupted before its first checkpoint
        cause = _resume_cause(adir)
        record_recovery(adir, "restarted", f"no checkpoint yet: restarted at lr {lr} after {cause}",
                        cause=cause, lr=lr, restart_count=_restart_count())
    return own


def _rank_log(runner, adir: Path, own: Optional[str], lr) -> Optional[Any]:
    """Ranks > 0: a file handler writing the runner's log to ``ranks/<ts>.rank<K>.log`` (mmengine
    writes rank 0's only); every rank: one line saying who it is and where it starts from."""
    w = dist.world()
    if not dist.initialized():
        return None
    handler = None
    r = dist.rank()
    if r > 0:
        import logging

        from mmengine.logging.logger import MMFormatter

        path = AttemptDir(adir).rank_log_path(runner.timestamp, r)
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        handler.setFormatter(MMFormatter(color=False, datefmt="%Y/%m/%d %H:%M:%S"))
        handler.setLevel(logging.INFO)
        runner.logger.addHandler(handler)
    import torch.distributed as td

    runner.logger.info(f"ssflctl: rank {r} of world size {td.get_world_size()} (launcher {w.launcher}, "
                       f"backend {td.get_backend()}, local rank {w.local_rank}); "
                       + (f"resumes {_name(own)} at lr {lr}" if own else f"starts at lr {lr}"))
    return handler


def train_attempt(adir: PathLike) -> Dict[str, Any]:
    """Train one attempt directory to its end; return (and write) its outcome.json body.

    Resumes from the attempt's own last checkpoint when there is one; else from the attempt's
    ``resume_from`` (another attempt's checkpoint); else starts fresh (or from ``load_from``).
    The outcome carries ``effective_lr`` (the base lr the optimizer trained at, see
    :func:`_progress_hook`) when training got as far as ``before_train``.
    """
    from mmengine.runner import Runner

    adir = Path(adir)
    a = AttemptDir(adir)
    lr = a.info.lr
    cfg = _load_cfg(adir)
    own = dist.on_main(lambda: _resume_point(adir))  # one checkpoint for every rank
    if own:
        cfg.resume, cfg.load_from = True, own  # named: mmengine's own lookup trusts the pointer file
    elif a.info.resume_from:
        cfg.resume, cfg.load_from = True, a.info.resume_from
    else:
        cfg.resume = False
    try:
        from ssflctl.node.guard import NonFiniteLossError
    except ImportError:  # pragma: no cover - the guard is part of the package
        class NonFiniteLossError(Exception):  # type: ignore[no-redef]
            pass

    interval = int(((cfg.get("default_hooks") or {}).get("logger") or {}).get("interval", 50) or 50)
    handler = None
    progress = _progress_hook(adir, interval)

    def measured() -> Dict[str, Any]:  # the base lr the optimizer trained at, for outcome.json
        return {"effective_lr": progress.effective_lr.to_json()} if progress.effective_lr is not None else {}

    try:
        runner = Runner.from_cfg(cfg)
        handler = _rank_log(runner, adir, own, lr)
        runner.register_hook(progress, priority="LOW")
        runner.train()
    except NonFiniteLossError as err:
        rec = getattr(err, "record", None) or (AttemptDir(adir).nan.to_json() if AttemptDir(adir).nan else None)
        return _write_outcome(adir, {"outcome": "nan", "reason": str(err), "nan": rec,
                                     "checkpoint": _name(latest_checkpoint(adir)), **measured()})
    except Exception as err:  # noqa: BLE001 - recorded, then the retry policy decides
        if _INTERRUPTED is not None:
            # submitit's signal handler requeued the job and raised SystemExit wherever training was;
            # library code with a bare `except:` may have turned it into another error (mmengine's
            # Config.pretty_text, called at every checkpoint, raises SyntaxError). Not a failure:
            # leave the attempt without an outcome so the requeued job resumes it.
            raise SystemExit(-1) from err
        trace = _record_failure(adir, err)
        return _write_outcome(adir, {"outcome": "failed", "reason": exception_reason(err), "traceback": trace,
                                     "checkpoint": _name(latest_checkpoint(adir)), **measured()})
    finally:
        if handler is not None:
            handler.close()
    return _write_outcome(adir, {"outcome": "done", "reason": "finished",
                                 "checkpoint": _name(latest_checkpoint(adir)), **measured()})


def _name(path: Optional[str]) -> Optional[str]:
    return Path(path).name if path else None


def _next_attempt(run: Dict[str, Any], run_dir: Path, n: int, outcome: Dict[str, Any]) -> Optional[int]:
    """The retry loop's one decision: render attempt n+1 and return n+1, or None to stop."""
    from ssflctl.node import retry

    adir = RunDir(run_dir).attempt(n)
    policy = retry.RetryPolicy.from_dict(run.get("retry"), where=f"{RunDir(run_dir).run_json_path}: retry")
    decision = retry.decide(policy, adir.path, n, float(adir.info.lr), outcome)
    if decision.action == "stop":
        return None
    render.render_attempt(run_dir, n + 1, lr=decision.lr, resume_from=decision.resume_from,
                          reason=decision.reason)
    return n + 1


def _on_preempt(run: Dict[str, Any], run_dir: Path) -> str:
    from ssflctl.node import retry

    return retry.RetryPolicy.from_dict(run.get("retry"), where=f"{RunDir(run_dir).run_json_path}: retry").on_preempt


def _first_attempt(run_dir: Path) -> int:
    """The attempt to train: the last rendered one; attempt 1 is rendered if there is none."""
    rendered = RunDir(run_dir).attempts(rendered_only=True)
    if rendered:
        return rendered[-1].n
    render.render_attempt(run_dir, 1, reason="first attempt")
    return 1


def _known_outcome(run: Dict[str, Any], run_dir: Path, adir: Path) -> Optional[Dict[str, Any]]:
    """The attempt's outcome when it needs no training (finished, or interrupted with
    retry.on_preempt restart|fail: written here as preempted, the policy decides)."""
    a = AttemptDir(adir)
    if a.outcome is not None:
        return a.outcome.to_json()
    if a.interrupted and _on_preempt(run, run_dir) != "resume":
        return _write_outcome(adir, {"outcome": "preempted", "reason": f"interrupted by {_resume_cause(adir)}",
                                     "checkpoint": _name(latest_checkpoint(adir))})
    return None


def train_run(run_dir: PathLike) -> Dict[str, Any]:
    """Train the run in ``run_dir`` until an attempt finishes; return that attempt's outcome.

    Renders attempt 1 if none exists. Raises :class:`TrainingFailed` if the retry policy stops
    before an attempt finishes.
    """
    dist.setup()  # several tasks: the process group, before anything is decided
    run_dir = Path(run_dir)
    run = render.read_run(run_dir)
    n = dist.on_main(lambda: _first_attempt(run_dir))
    while True:
        adir = RunDir(run_dir).attempt(n).path
        outcome = dist.on_main(lambda: _known_outcome(run, run_dir, adir))
        if outcome is None:
            outcome = train_attempt(adir)
            outcome = dist.broadcast(outcome)  # rank 0's, the one it wrote
        if outcome.get("outcome") == "done":
            dist.teardown()
            return dict(outcome, attempt=n, attempt_dir=str(adir))
        nxt = dist.on_main(lambda: _next_attempt(run, run_dir, n, outcome))
        if nxt is None:
            dist.teardown()
            trace = outcome.get("traceback")  # where the attempt's exception was raised, in the job's output too
            raise TrainingFailed(f"{run.get('run_id') or run_dir.name}: attempt {n} ended "
                                 f"{outcome.get('outcome')} ({outcome.get('reason')}); no attempt left"
                                 + (f"\n{trace.rstrip()}" if trace else ""), outcome)
        n = nxt


# --------------------------------------------------------------------------------------------
# testing
# --------------------------------------------------------------------------------------------
def finished_attempt(run_dir: PathLike) -> Optional[Path]:
    a = RunDir(run_dir).finished()
    return a.path if a is not None else None


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


def test_attempt(adir: PathLike, checkpoint: Optional[str] = None, force: bool = False,
                 overrides: Optional[Dict[str, Any]] = None, into: Optional[TestDir] = None) -> Dict[str, Any]:
    """Test one attempt's checkpoint; write detections.bbox.json and metrics.json.

    ``overrides`` (a test cell's dotted test-time keys) are set on the attempt's config first, and
    ``into`` (the cell's :class:`~ssflctl.workdir.layout.TestDir`) receives the results and
    mmengine's test logs instead of the attempt directory."""
    from mmengine.runner import Runner

    from ssflctl.evaluation import coco as coco_eval

    a = AttemptDir(adir)
    adir = a.path
    res = into if into is not None else a
    out = res.metrics_path
    if out.exists() and not force:
        return atomic.read_json(out)
    if checkpoint is None:
        checkpoint = latest_checkpoint(adir)
        if checkpoint is None:
            name = a.outcome.checkpoint if a.outcome is not None else None
            checkpoint = str(adir / name) if name and (adir / name).is_file() else None
    if checkpoint is None:
        raise TestFailed(f"{adir}: no checkpoint to test")
    cfg = _load_cfg(adir)
    cfg.resume, cfg.load_from = False, str(checkpoint)
    for key, value in (overrides or {}).items():
        render._set_existing(cfg, str(key), value, "test_matrix")
    if into is not None:
        into.path.mkdir(parents=True, exist_ok=True)
        cfg.work_dir = str(into.path)
    voc = _voc_only(cfg)
    if voc is not None:
        # VOC: VOCMetric gives mAP@0.5; a CocoMetric without ann_file dumps the detections and a
        # COCO copy of the ground truth (the template keeps 'instances' in the test metainfo).
        metric: Dict[str, Any] = {"type": "CocoMetric", "metric": "bbox"}
        ann_file = str(res.gt_path)
    else:
        metric = _coco_metric(cfg)
        ann_file = metric.get("ann_file")
        if not ann_file:
            raise UserError(f"{adir / 'config.py'}: test_evaluator.ann_file is not set")
    prefix = res.path / "detections.tmp"
    metric["format_only"] = True
    metric["outfile_prefix"] = str(prefix)
    cfg.test_evaluator = [voc, metric] if voc is not None else metric
    runner = Runner.from_cfg(cfg)
    results = runner.test() or {}
    tmp = Path(f"{prefix}.bbox.json")
    dets = res.detections_path
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
    if overrides:
        metrics["test_overrides"] = dict(overrides)
    if _is_main_process():
        res.write_metrics(metrics)
    return metrics


def test_run(run_dir: PathLike, force: bool = False) -> Dict[str, Any]:
    """Test the run's finished attempt; return the metrics.json body (cached unless ``force``)."""
    adir = finished_attempt(run_dir)
    if adir is None:
        raise TestFailed(f"{run_dir}: no finished attempt to test (train it first)")
    return test_attempt(adir, force=force)


def test_cell_run(cell: PathLike, force: bool = False, poll_s: float = 5.0) -> Dict[str, Any]:
    """A test cell's job (test_matrix): ``cell`` is its definition ``<run>/tests/<test_id>.json``.
    Tests the run's finished attempt with the cell's test-time keys into
    ``attempt-N/tests/<test_id>/``. A ``wait_for`` in the definition (the local backend: a state
    file of the train job) is waited for first."""
    cell = Path(cell)
    run = RunDir(cell.parent.parent)
    body = run.test_cell(cell.stem)
    if body is None:
        raise TestFailed(f"{cell}: no test cell definition")
    wait = body.get("wait_for")
    while isinstance(wait, dict):
        state = (atomic.read_json(Path(wait["file"]), default=None) or {}).get("state", "missing")
        if state in wait.get("ok", ()):
            break
        if state in wait.get("fail", ()) and state != "missing":
            raise TestFailed(f"{run.run_id}: its training job ended {state}; nothing to test")
        time.sleep(poll_s)
    a = run.refresh().finished()
    if a is None:
        raise TestFailed(f"{run.path}: no finished attempt to test (train it first)")
    return test_attempt(a.path, force=force, overrides=body.get("overrides") or {}, into=a.test(cell.stem))


test_run.__test__ = False  # type: ignore[attr-defined]
test_cell_run.__test__ = False  # type: ignore[attr-defined]
test_attempt.__test__ = False  # type: ignore[attr-defined]


def train_and_test(run_dir: PathLike) -> Dict[str, Any]:
    """Train, then test if run.json says so (``test`` defaults to true); both in this process.
    Several ranks: all train; then they leave the process group and rank 0 tests alone."""
    outcome = train_run(run_dir)
    dist.teardown()
    run = render.read_run(run_dir)
    result: Dict[str, Any] = {"outcome": outcome}
    if run.get("test", True) and _is_main_process():
        result["metrics"] = test_run(run_dir)
    return result
