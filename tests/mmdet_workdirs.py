"""Small MMDetection work dirs written in the exact formats of the real tools, for the report tests.

mmdet 3.3 / mmengine 0.10.7 (read in the installed sources):
  - text log lines of ``LogProcessor.get_log_after_iter`` / ``get_log_after_epoch`` (epoch right-
    aligned to ``len(str(max_epochs)) + 3``; metrics after 4 spaces, ``key: value`` joined by 2 spaces,
    floats with 4 digits), ``Runner._log_env`` (runtime env ``seed:``, ``GPU number:``) and
    ``Config:\\n<pretty_text>``, CocoMetric's ``Evaluating bbox...``, ``bbox_mAP_copypaste: ...``,
    CheckpointHook's best-checkpoint line, ``Runner.load_checkpoint``'s ``Load checkpoint from``;
  - ``vis_data/scalars.json`` (``LocalVisBackend.add_scalars``: one ``json.dump`` per line, ``step``
    added), ``vis_data/config.py`` (``add_config``), ``<ts>/<ts>.json`` (``LoggerHook.after_test_epoch``).
mmdet 2.x / mmcv 1.x (``TextLoggerHook``; mmdet 2.x tools/train.py meta ``env_info/config/seed/exp_name``):
  - ``<ts>.log``: ``Epoch [1][50/7330]\\tlr: 1.978e-03, eta: ..., loss: 1.5000``,
    ``Epoch(val) [1][625]\\tbbox_mAP: 0.2000, ..., bbox_mAP_copypaste: 0.200 ...``;
  - ``<ts>.log.json``: the meta line, then ``{"mode": "train"|"val", "epoch", "iter", "lr", ...}``
    (floats rounded to 5 digits).
"""
from __future__ import annotations

import json
from pathlib import Path

AP6 = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def coco(ap: float, iou: str = "bbox", prefix: str = "coco/") -> dict:
    """CocoMetric-like numbers derived from AP (3 decimals, as CocoMetric rounds)."""
    vals = [ap, ap + 0.2, ap + 0.05, ap - 0.15, ap + 0.01, ap + 0.1]
    return {f"{prefix}{iou}_{k}": round(v, 3) for k, v in zip(AP6, vals)}


def _fmt(d: dict, sep: str, digits: int = 4) -> str:
    return sep.join(f"{k}: {v:.{digits}f}" if isinstance(v, float) else f"{k}: {v}" for k, v in d.items())


def mm3_config(*, max_epochs=12, lr=0.02, optimizer="SGD", batch=2, seed=None, save_best=None, max_iters=None) -> str:
    """A config as mmengine 0.10's Config.dump / pretty_text writes it (yapf style, dict(...))."""
    ck = f"checkpoint=dict(interval=1, type='CheckpointHook'{', save_best=' + repr(save_best) if save_best else ''}),"
    train_cfg = (f"train_cfg = dict(max_iters={max_iters}, type='IterBasedTrainLoop', val_interval=5000)"
                 if max_iters else f"train_cfg = dict(max_epochs={max_epochs}, type='EpochBasedTrainLoop', val_interval=1)")
    lines = [
        "auto_scale_lr = dict(base_batch_size=16, enable=False)",
        "default_hooks = dict(",
        f"    {ck}",
        "    logger=dict(interval=50, type='LoggerHook'),",
        "    timer=dict(type='IterTimerHook'))",
        "default_scope = 'mmdet'",
        "optim_wrapper = dict(",
        f"    optimizer=dict(lr={lr!r}, type={optimizer!r}, weight_decay=0.05),",
        "    paramwise_cfg=dict(bias_decay_mult=0, norm_decay_mult=0),",
        "    type='OptimWrapper')",
        "param_scheduler = [",
        "    dict(begin=0, by_epoch=False, end=1000, start_factor=1e-05, type='LinearLR'),",
        "]",
    ]
    if seed is not None:
        lines.append(f"randomness = dict(seed={seed})")
    lines += [
        train_cfg,
        "train_dataloader = dict(",
        f"    batch_size={batch},",
        "    dataset=dict(ann_file='annotations/instances_train2017.json', type='CocoDataset'),",
        "    num_workers=10,",
        "    sampler=dict(shuffle=True, type='DefaultSampler'))",
        "val_evaluator = dict(ann_file='data/coco/annotations/instances_val2017.json', metric='bbox', type='CocoMetric')",
        "work_dir = './work_dirs/x'",
    ]
    return "\n".join(lines) + "\n"


class MM3Run:
    """One mmengine Runner start: ``<wd>/<ts>/`` with its log, scalars and config."""

    def __init__(self, wd: Path, ts: str, *, config: str, seed=42, gpus=8, max_epochs=12, iters=500,
                 scalars=True):
        self.wd, self.ts, self.max_epochs, self.iters = Path(wd), ts, max_epochs, iters
        self.dir = self.wd / ts
        (self.dir / "vis_data").mkdir(parents=True, exist_ok=True)
        (self.dir / "vis_data" / "config.py").write_text(config)
        self.t = 0
        self.log = []
        self.scalars = [] if scalars else None
        self._line("\n------------------------------------------------------------\nSystem environment:\n"
                   "    sys.platform: linux\n    Python: 3.10.13\n    PyTorch: 2.1.0\n\nRuntime environment:\n"
                   "    cudnn_benchmark: False\n    dist_cfg: {'backend': 'nccl'}\n"
                   f"    seed: {seed}\n    Distributed launcher: pytorch\n    Distributed training: True\n"
                   f"    GPU number: {gpus}\n------------------------------------------------------------\n")
        self._line("Config:\n" + config)

    def _line(self, msg: str):
        self.t += 1
        h, m, s = 10 + self.t // 3600, (self.t // 60) % 60, self.t % 60
        self.log.append(f"{self.ts[:4]}/{self.ts[4:6]}/{self.ts[6:8]} {h:02d}:{m:02d}:{s:02d} - mmengine - INFO - {msg}")

    def train_epoch(self, epoch: int, lr: float, loss: float = 1.0):
        ep = f"[{epoch}]".rjust(len(str(self.max_epochs)) + 3)
        for it in range(50, self.iters + 1, 50):
            step = (epoch - 1) * self.iters + it
            cur = str(it).rjust(len(str(self.iters)))
            self._line(f"Epoch(train){ep}[{cur}/{self.iters}]  base_lr: 2.0000e-02 lr: {lr:.4e}  eta: 1:00:00  "
                       f"time: 0.5000  data_time: 0.0100  memory: 3000  grad_norm: 5.1000  loss: {loss:.4f}  "
                       f"loss_cls: {loss / 2:.4f}  loss_bbox: {loss / 2:.4f}")
            if self.scalars is not None:
                self.scalars.append({"base_lr": 0.02, "lr": lr, "data_time": 0.01, "grad_norm": 5.1, "loss": loss,
                                     "loss_cls": loss / 2, "loss_bbox": loss / 2, "time": 0.5, "epoch": epoch,
                                     "iter": step, "memory": 3000, "step": step})
        self._line(f"Exp name: x_{self.ts}")

    def evaluate(self, mode: str, metrics: dict, epoch=None, n=625, classwise=None):
        """CocoMetric/VOCMetric's log lines, then LoggerHook's Epoch(val|test) line."""
        for it in (50,):
            if mode == "val":
                ep = f"[{epoch}]".rjust(len(str(self.max_epochs)) + 3)
                self._line(f"Epoch(val){ep}[ {it}/{n}]    eta: 0:00:30  time: 0.0300  data_time: 0.0010  memory: 500  ")
            else:
                self._line(f"Epoch(test) [ {it}/{n}]    eta: 0:00:30  time: 0.0300  data_time: 0.0010  memory: 500  ")
        for iou in ("bbox", "segm"):
            vals = [metrics.get(f"coco/{iou}_{k}") for k in AP6]
            if vals[0] is None:
                continue
            self._line(f"Evaluating {iou}...")
            if classwise and iou in classwise:
                rows = "".join(f"| {c:<8} | {v:<5} | 0.5    |\n" for c, v in classwise[iou].items())
                self._line("\n+----------+-------+--------+\n| category | mAP   | mAP_50 |\n"
                           "+----------+-------+--------+\n" + rows + "+----------+-------+--------+")
            self._line(f"{iou}_mAP_copypaste: " + " ".join(f"{v:.3f}" for v in vals))
        head = f"Epoch(val) [{epoch}][{n}/{n}]" if mode == "val" else f"Epoch(test) [{n}/{n}]"
        self._line(f"{head}    " + _fmt(dict(metrics, data_time=0.002, time=0.04), "  "))
        rec = dict(metrics, data_time=0.002, time=0.04)
        if mode == "val" and self.scalars is not None:
            self.scalars.append(dict(rec, step=epoch))
        if mode == "test":
            (self.dir / f"{self.ts}.json").write_text(json.dumps(rec))

    def best(self, score: float, key: str, epoch: int):
        name = f"best_{key}_epoch_{epoch}.pth".replace("/", "_")
        self._line(f"The best checkpoint with {score:0.4f} {key} at {epoch} epoch is saved to {name}.")
        (self.wd / name).write_bytes(b"")

    def write(self, log=True):
        if log:
            (self.dir / f"{self.ts}.log").write_text("\n".join(self.log) + "\n")
        if self.scalars:
            text = "".join(json.dumps(r) + "\n" for r in self.scalars)
            (self.dir / "vis_data" / "scalars.json").write_text(text)
            (self.dir / "vis_data" / f"{self.ts}.json").write_text(text)
        return self


def mm3_trained(root: Path, name: str, *, epochs=12, max_epochs=12, ap_of=lambda e: 0.3 + e / 100, test_ap=None,
                scalars=True, log=True, segm=False, seed=42, test_seed=999, lr=1.875e-04, optimizer="AdamW",
                val_every=1, save_best=None, best_epoch=None, classwise=None) -> Path:
    """An mmdet 3.x work dir: training to `epochs` (of `max_epochs`) with validation, optionally a
    tools/test.py run (newer timestamp, its own seed and config without randomness)."""
    wd = Path(root) / name
    run = MM3Run(wd, "20240301_100000", config=mm3_config(max_epochs=max_epochs, lr=lr, optimizer=optimizer,
                                                          batch=16, seed=seed, save_best=save_best),
                 seed=seed, max_epochs=max_epochs, scalars=scalars)
    for e in range(1, epochs + 1):
        run.train_epoch(e, lr=2.59e-05 if e == 1 else lr)
        if e % val_every == 0:
            m = coco(ap_of(e))
            if segm:
                m.update(coco(ap_of(e) - 0.03, "segm"))
            run.evaluate("val", m, epoch=e, classwise=classwise)
            if best_epoch == e:
                run.best(m["coco/bbox_mAP"], save_best or "coco/bbox_mAP", e)
            (wd / f"epoch_{e}.pth").write_bytes(b"")
    run.write(log=log)
    if test_ap is not None:
        t = MM3Run(wd, "20240305_090000", config=mm3_config(max_epochs=max_epochs, lr=0.5, optimizer="SGD", batch=1),
                   seed=test_seed, gpus=1, max_epochs=max_epochs, scalars=False)
        t._line(f"Load checkpoint from work_dirs/{name}/epoch_{epochs}.pth")
        m = coco(test_ap)
        if segm:
            m.update(coco(test_ap - 0.03, "segm"))
        t.evaluate("test", m, classwise=classwise)
        t.write()
    return wd


# ------------------------------------------------------------------------------- mmdet 2.x

MM2_CONFIG = """model = dict(
    type='MaskRCNN',
    backbone=dict(type='ResNet', depth=50, num_stages=4))
dataset_type = 'CocoDataset'
data = dict(
    samples_per_gpu=2,
    workers_per_gpu=2,
    train=dict(type='CocoDataset', ann_file='data/coco/annotations/instances_train2017.json'))
evaluation = dict(metric=['bbox', 'segm'], save_best='auto')
optimizer = dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001)
optimizer_config = dict(grad_clip=None)
lr_config = dict(policy='step', warmup='linear', warmup_iters=500, warmup_ratio=0.001, step=[8, 11])
runner = dict(type='EpochBasedRunner', max_epochs=12)
checkpoint_config = dict(interval=1)
log_config = dict(interval=50, hooks=[dict(type='TextLoggerHook')])
work_dir = './work_dirs/mask_rcnn_r50_fpn_1x_coco'
gpu_ids = range(0, 8)
"""

SUMMARY = """
 Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=1000 ] = {0:.3f}
 Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=1000 ] = {1:.3f}
 Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=1000 ] = {2:.3f}
 Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=1000 ] = {3:.3f}
 Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=1000 ] = {4:.3f}
 Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=1000 ] = {5:.3f}
 Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = {6:.3f}
 Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=300 ] = {6:.3f}
 Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=1000 ] = {6:.3f}
 Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=1000 ] = {6:.3f}
 Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=1000 ] = {6:.3f}
 Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=1000 ] = {6:.3f}
"""

KPT_SUMMARY = """
 Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets= 20 ] = 0.655
 Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets= 20 ] = 0.866
 Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets= 20 ] = 0.711
 Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets= 20 ] = 0.615
 Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets= 20 ] = 0.726
 Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 20 ] = 0.704
 Average Recall     (AR) @[ IoU=0.50      | area=   all | maxDets= 20 ] = 0.901
 Average Recall     (AR) @[ IoU=0.75      | area=   all | maxDets= 20 ] = 0.755
 Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets= 20 ] = 0.660
 Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets= 20 ] = 0.768
"""


def coco_summary(bbox: dict, ar: float) -> str:
    """pycocotools' 12-line summary as mmdet prints it: maxDets = proposal_nums (100, 300, 1000), so
    the AP lines say 1000 and there is no AR@1/AR@10."""
    return SUMMARY.format(*[bbox[f"bbox_{k}"] for k in AP6], ar)


class MM2Run:
    """One mmcv 1.x runner start: ``<wd>/<ts>.log`` and ``<wd>/<ts>.log.json``."""

    def __init__(self, wd: Path, ts: str, *, config: str = MM2_CONFIG, seed=0, iters=7330, json_log=True, text_log=True):
        self.wd, self.ts, self.iters = Path(wd), ts, iters
        self.wd.mkdir(parents=True, exist_ok=True)
        self.t, self.log = 0, []
        self.json = [{"env_info": "sys.platform: linux\nPython: 3.7.10", "config": config, "seed": seed,
                      "exp_name": "mask_rcnn_r50_fpn_1x_coco.py"}]
        self.json_log, self.text_log = json_log, text_log
        self._line("Environment info:\n------------------------------------------------------------\n"
                   "sys.platform: linux\n------------------------------------------------------------\n")
        self._line("Distributed training: True")
        self._line("Config:\n" + config)
        self._line(f"Set random seed to {seed}, deterministic: False")

    def _line(self, msg):
        self.t += 1
        self.log.append(f"{self.ts[:4]}-{self.ts[4:6]}-{self.ts[6:8]} 10:{(self.t // 60) % 60:02d}:{self.t % 60:02d},"
                        f"{self.t % 1000:03d} - mmdet - INFO - {msg}")

    def train_epoch(self, epoch, lr=0.02, loss=1.5):
        for it in (50, 100):
            self._line(f"Epoch [{epoch}][{it}/{self.iters}]\tlr: {lr:.3e}, eta: 1 day, 0:00:00, time: 0.500, "
                       f"data_time: 0.050, memory: 4000, loss_rpn_cls: 0.5000, loss_cls: 0.5000, loss: {loss:.4f}")
            self.json.append({"mode": "train", "epoch": epoch, "iter": it, "lr": round(lr, 5), "memory": 4000,
                              "data_time": 0.05, "loss_rpn_cls": 0.5, "loss_cls": 0.5, "loss": loss, "time": 0.5})

    def val(self, epoch, metrics: dict, summaries: dict = None, lr=0.02):
        """mmdet 2.x CocoDataset.evaluate's log (Evaluating X..., summary via print_log), then the
        TextLoggerHook Epoch(val) line with the copypaste values inline."""
        for iou in ("bbox", "segm"):
            if f"{iou}_mAP" in metrics:
                self._line(f"Evaluating {iou}...")
                if summaries and iou in summaries:
                    self._line("\n" + summaries[iou])
        self._line(f"Exp name: mask_rcnn_r50_fpn_1x_coco.py")
        items = []
        rec = {"mode": "val", "epoch": epoch, "iter": 625, "lr": lr}
        for iou in ("bbox", "segm"):
            if f"{iou}_mAP" in metrics:
                vals = {f"{iou}_{k}": metrics[f"{iou}_{k}"] for k in AP6}
                items += [f"{k}: {v:.4f}" for k, v in vals.items()]
                cp = " ".join(f"{v:.3f}" for v in vals.values())
                items.append(f"{iou}_mAP_copypaste: {cp}")
                rec.update(vals)
                rec[f"{iou}_mAP_copypaste"] = cp
        for k in ("AP50", "mAP"):  # VOCDataset.evaluate
            if k in metrics:
                items.append(f"{k}: {metrics[k]:.4f}")
                rec[k] = metrics[k]
        self._line(f"Epoch(val) [{epoch}][625]\t" + ", ".join(items))
        self.json.append(rec)

    def write(self):
        if self.text_log:
            (self.wd / f"{self.ts}.log").write_text("\n".join(self.log) + "\n")
        if self.json_log:
            (self.wd / f"{self.ts}.log.json").write_text("".join(json.dumps(r) + "\n" for r in self.json))
        return self


def mm2_mask_rcnn(root: Path, name: str = "mask_rcnn_r50_fpn_1x_coco", resumed_at=7, epochs=12, ap_of=lambda e: 0.2 + e / 100,
                  json_log=True) -> Path:
    """An mmdet 2.x Mask R-CNN work dir, trained in two runner starts (resumed at `resumed_at`)."""
    wd = Path(root) / name
    runs = [MM2Run(wd, "20210101_000000", json_log=json_log), MM2Run(wd, "20210103_000000", json_log=json_log)]
    for e in range(1, epochs + 1):
        r = runs[0] if e < resumed_at else runs[1]
        r.train_epoch(e)
        m = dict(coco(ap_of(e), "bbox", ""), **coco(ap_of(e) - 0.02, "segm", ""))
        bbox = {k: v for k, v in m.items() if k.startswith("bbox")}
        segm = {k.replace("segm", "bbox"): v for k, v in m.items() if k.startswith("segm")}
        r.val(e, m, summaries={"bbox": coco_summary(bbox, 0.5), "segm": coco_summary(segm, 0.45)})
        (wd / f"epoch_{e}.pth").write_bytes(b"")
    (wd / "mask_rcnn_r50_fpn_1x_coco.py").write_text(MM2_CONFIG)
    for r in runs:
        r.write()
    return wd
