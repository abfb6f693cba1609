"""Write the hand-made workspace the report's golden tests read (deterministic; no other module).

    python tests/golden/report/make_fixture.py        # rewrites tests/golden/report/ws

Matrix: loss {focal, ssfl, gfl} x dataset {cityscapes, coco} x seed {1, 2, 3}, lr 0.01 (constant).
  ssfl/cityscapes/s2  retried: attempt 1 NaN at iter 340 (lr 0.01), attempt 2 done at lr 0.001
  gfl/cityscapes/s3   failed: an error (CUDA out of memory), one attempt
  gfl/coco/s1         failed: NaN in all 3 attempts (lr 0.01, 0.001, 0.0001)
  gfl/coco/s2         running: progress.json at epoch 7/12, no outcome yet
  gfl/coco/s3         pending: run.json only (never submitted)
  focal/coco/s3       missing: no run directory at all
Every other run is done: attempt-1 with metrics.json (values from a seeded RNG).
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
WS = HERE / "ws"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
CLASSES = {"cityscapes": ["person", "car", "train"], "coco": ["person", "car", "dog"]}
BASE_AP = {("focal", "cityscapes"): 0.352, ("ssfl", "cityscapes"): 0.361, ("gfl", "cityscapes"): 0.356,
           ("focal", "coco"): 0.364, ("ssfl", "coco"): 0.368, ("gfl", "coco"): 0.359}
RETRY = {"on_nan": "lower_lr", "factor": 0.1, "max_attempts": 3, "from": "scratch",
         "on_preempt": "resume", "on_node_fail": "resubmit", "on_error": "fail"}


def _w(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def run_id(loss, ds, seed) -> str:
    name = f"{loss}-{ds}-s{seed}"
    return f"{name}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def metrics(loss, ds, seed, rng) -> dict:
    ap = BASE_AP[(loss, ds)] + rng.uniform(-0.006, 0.006)
    ratios = {"AP": 1, "AP50": 1.55, "AP75": 1.05, "APs": 0.45, "APm": 1.1, "APl": 1.4, "AR1": 0.85,
              "AR10": 1.3, "AR100": 1.38, "ARs": 0.7, "ARm": 1.45, "ARl": 1.7}
    bbox = {k: round(ap * ratios[k] + rng.uniform(-0.003, 0.003), 12) for k in METRICS}
    per_class = {c: round(ap * (0.8 + 0.2 * i) + rng.uniform(-0.01, 0.01), 12)
                 for i, c in enumerate(CLASSES[ds])}
    if ds == "cityscapes":
        per_class["train"] = None  # COCOeval -1: no ground truth of this class in the test set
    return {"bbox": bbox, "per_class": per_class, "num_images": 50, "num_detections": 3000 + seed,
            "evaluator": "pycocotools", "ann_file": f"data/{ds}/annotations/instancesonly_filtered_gtFine_val.json",
            "checkpoint": "epoch_12.pth"}


def scalars(lr, n=6, nan_at=None, start=2.0) -> str:
    lines = []
    for i in range(1, n + 1):
        it = i * 50
        loss = start * (0.85 ** i)
        if nan_at is not None and it >= nan_at:
            lines.append(f'{{"lr": {lr}, "loss": NaN, "loss_cls": NaN, "loss_bbox": 0.4, "iter": {it}, "epoch": 1, "step": {it}}}')
            break
        lines.append(json.dumps({"lr": lr, "loss": round(loss, 4), "loss_cls": round(loss * 0.6, 4),
                                 "loss_bbox": round(loss * 0.4, 4), "iter": it, "epoch": 1, "step": it}))
    return "\n".join(lines) + "\n"


def attempt(run_dir: Path, n, lr, reason, outcome=None, nan=None, m=None, progress=None, curve=None):
    d = run_dir / f"attempt-{n}"
    _w(d / "attempt.json", {"run_id": run_dir.name, "attempt": n, "config": "config.py", "lr": lr,
                            "resume_from": None, "reason": reason, "test": True})
    if curve is not None:
        _w(d / "20260101_120000" / "vis_data" / "scalars.json", curve)
    if nan is not None:
        _w(d / "nan.json", nan)
    if outcome is not None:
        _w(d / "outcome.json", outcome)
    if m is not None:
        _w(d / "metrics.json", m)
    if progress is not None:
        _w(d / "progress.json", progress)


def done_outcome(ckpt="epoch_12.pth"):
    return {"outcome": "done", "reason": "finished 12 epochs", "nan": None, "log_tail": "",
            "checkpoint": ckpt, "finished_at": "2026-01-01T13:00:00+00:00"}


def nan_outcome(it, lr):
    nan = {"iter": it, "epoch": 1, "loss_key": "loss_cls", "last_finite": {"loss": 1.1}, "lr": lr}
    return nan, {"outcome": "nan", "reason": f"NaN in loss_cls at iter {it}", "nan": nan,
                 "log_tail": "", "checkpoint": None, "finished_at": "2026-01-01T12:30:00+00:00"}


def main() -> None:
    if WS.exists():
        shutil.rmtree(WS)
    rng = random.Random(3407)
    for loss in ("focal", "ssfl", "gfl"):
        for ds in ("cityscapes", "coco"):
            for seed in (1, 2, 3):
                vals = metrics(loss, ds, seed, rng)  # drawn for every cell so values do not shift
                if (loss, ds, seed) == ("focal", "coco", 3):
                    continue  # missing: nobody submitted it
                rid = run_id(loss, ds, seed)
                rd = WS / "runs" / rid
                _w(rd / "run.json", {
                    "run_id": rid, "name": f"{loss}-{ds}-s{seed}", "experiment": "ssfl_vs_fl",
                    "axes": {"loss": loss, "dataset": ds, "seed": seed, "lr": 0.01},
                    "template": "templates/retinanet_r50_fpn_1x_cityscapes.py",
                    "params": {"loss": loss, "lr": 0.01, "seed": seed, "data_root": f"data/{ds}"},
                    "overrides": {}, "resources": {"gpus": 1, "cpus": 6, "mem_gb": 32, "time_min": 1440},
                    "retry": RETRY, "test": True})
                key = (loss, ds, seed)
                if key == ("gfl", "coco", 3):
                    continue  # pending: run.json only
                if key == ("ssfl", "cityscapes", 2):
                    nan, out = nan_outcome(340, 0.01)
                    attempt(rd, 1, 0.01, "first attempt", out, nan, curve=scalars(0.01, nan_at=340))
                    attempt(rd, 2, 0.001, "NaN at iter 340 with lr 0.01; lr x 0.1 from scratch", done_outcome(),
                            m=vals, curve=scalars(0.001, start=2.1))
                elif key == ("gfl", "cityscapes", 3):
                    attempt(rd, 1, 0.01, "first attempt", {
                        "outcome": "failed", "reason": "RuntimeError: CUDA out of memory", "nan": None,
                        "log_tail": "", "checkpoint": None, "finished_at": "2026-01-01T12:10:00+00:00"})
                elif key == ("gfl", "coco", 1):
                    for n, lr in ((1, 0.01), (2, 0.001), (3, 0.0001)):
                        nan, out = nan_outcome(100 * n, lr)
                        attempt(rd, n, lr, "first attempt" if n == 1 else f"NaN with lr {lr * 10:g}; lr x 0.1",
                                out, nan, curve=scalars(lr, nan_at=100 * n))
                elif key == ("gfl", "coco", 2):
                    attempt(rd, 1, 0.01, "first attempt", progress={
                        "epoch": 7, "max_epochs": 12, "iter": 2100, "max_iters": 3600, "loss": 0.61, "lr": 0.01,
                        "time": 0.4, "updated_at": "2026-01-01T12:40:00+00:00"}, curve=scalars(0.01))
                else:
                    attempt(rd, 1, 0.01, "first attempt", done_outcome(), m=vals,
                            curve=scalars(0.01, start=2.0 + seed / 10) if ds == "cityscapes" else None)


if __name__ == "__main__":
    main()
