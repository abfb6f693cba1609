"""SSD300 on Pascal VOC with the Focal Loss family: the FocalSSDHead, the template and the shipped
experiment (dry-run), the real SSD300 (VGG16) built, and a tiny variant (ResNet-18 SSD, 128 px,
synthetic VOC-format data) trained for 2 iterations on the CPU through ssflctl's job, validated
with VOCMetric (mAP@0.5)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.training

VOC_CLASSES = ("person", "car", "dog")  # a few of VOC's 20 names


def make_voc(root: Path, n_trainval: int = 2, n_test: int = 2, size: int = 128, seed: int = 0) -> Path:
    """A tiny VOCdevkit: VOC2007 (trainval + test) and VOC2012 (trainval), JPEG + XML per image."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colours = {"person": (220, 40, 40), "car": (40, 190, 60), "dog": (40, 70, 230)}
    for year, splits in (("VOC2007", {"trainval": n_trainval, "test": n_test}), ("VOC2012", {"trainval": n_trainval})):
        base = root / year
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for split, n in splits.items():
            ids = []
            for i in range(n):
                img_id = f"{year[-4:]}_{split}_{i:03d}"
                img = Image.new("RGB", (size, size), (128, 128, 128))
                d = ImageDraw.Draw(img)
                objs = []
                for k in range(rng.randint(1, 2)):
                    cls = rng.choice(VOC_CLASSES)
                    w, h = rng.randint(36, 56), rng.randint(36, 56)
                    x0 = 4 + k * 64 if k else rng.randint(2, 8)
                    y0 = rng.randint(2, size - h - 2)
                    x1, y1 = min(size - 1, x0 + w), y0 + h
                    d.rectangle([x0, y0, x1, y1], fill=colours[cls])
                    objs.append((cls, x0 + 1, y0 + 1, x1 + 1, y1 + 1))  # VOC boxes are 1-based
                img.save(base / "JPEGImages" / f"{img_id}.jpg", quality=95)
                xml = [f"<annotation><folder>{year}</folder><filename>{img_id}.jpg</filename>",
                       f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>"]
                for cls, a, b, c, e in objs:
                    xml.append(f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>"
                               f"<difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
                               f"<xmax>{c}</xmax><ymax>{e}</ymax></bndbox></object>")
                xml.append("</annotation>")
                (base / "Annotations" / f"{img_id}.xml").write_text("".join(xml))
                ids.append(img_id)
            (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


# The tiny variant: SSD's anchors/assigner/coder and FocalSSDHead, a ResNet-18 (from scratch)
# instead of VGG16 and 128 px inputs (SSD300's VGG16 + extra layers need >= 272 px).
TINY_PARAMS = {"max_epochs": 1, "batch_size": 2, "workers": 0, "img_scale": [128, 128], "log_interval": 1,
               "val_interval": 1, "lr": 0.001, "seed": 0}
TINY_OVERRIDES = {
    # _delete_: replace SSD's VGG16, its neck and anchors instead of merging into them (mmengine's rule)
    "model.backbone": dict(_delete_=True, type="ResNet", depth=18, num_stages=4, out_indices=(1, 2, 3), frozen_stages=-1,
                           norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False, style="pytorch",
                           init_cfg=None),
    "model.neck": dict(_delete_=True, type="SSDNeck", in_channels=(128, 256, 512), out_channels=(128, 256, 512, 128, 128, 128),
                       level_strides=(2, 2, 2), level_paddings=(1, 1, 1), l2_norm_scale=None),
    "model.bbox_head.in_channels": (128, 256, 512, 128, 128, 128),
    # SSD's scale scheme for a 128 px input (0.1, then 0.2 .. 0.9 of the input)
    "model.bbox_head.anchor_generator": dict(_delete_=True, type="SSDAnchorGenerator", scale_major=False, input_size=128,
                                             min_sizes=[13, 26, 45, 64, 83, 102],
                                             max_sizes=[26, 45, 64, 83, 102, 122],
                                             strides=[8, 16, 32, 64, 128, 128],
                                             ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]]),
    "train_dataloader.dataset.times": 1,
    "custom_hooks": [],  # mmdet's CheckInvalidLossHook/NumClassCheckHook are not needed here
}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("VOCdevkit"))


# ------------------------------------------------------------------------------------ the head


def _head(**kw):
    import ssflctl.extensions.heads  # noqa: F401  (registers FocalSSDHead)
    import ssflctl.extensions.losses  # noqa: F401  (registers ShiftStepFocalLoss)
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict
    from mmengine.logging import MMLogger

    # init_weights() dumps to the *current* MMLogger's file handlers; make a fresh logger current so
    # a Runner finished earlier in this process (whose log file is closed) is not written to.
    MMLogger.get_instance(f"test-ssd-head-{id(kw)}")
    cfg = dict(type="FocalSSDHead", num_classes=3, in_channels=(8, 8, 8), anchor_generator=dict(
        type="SSDAnchorGenerator", scale_major=False, input_size=64, min_sizes=[10, 20, 40],
        max_sizes=[20, 40, 60], strides=[8, 16, 32], ratios=[[2], [2], [2]]),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        train_cfg=ConfigDict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.,
                                           ignore_iof_thr=-1, gt_max_assign_all=False),
                             sampler=dict(type="PseudoSampler"), smoothl1_beta=1., allowed_border=-1, pos_weight=-1,
                             neg_pos_ratio=3, debug=False))
    cfg.update(kw)
    return MODELS.build(cfg)


def _loss(head, neg_pos_ratio):
    import torch
    from mmengine.structures import InstanceData

    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    cls, reg = head(feats)
    gts = [InstanceData(bboxes=torch.tensor([[4., 4., 30., 30.]]), labels=torch.tensor([1])),
           InstanceData(bboxes=torch.tensor([[20., 10., 60., 50.]]), labels=torch.tensor([2]))]
    metas = [dict(img_shape=(64, 64), pad_shape=(64, 64))] * 2
    head.train_cfg["neg_pos_ratio"] = neg_pos_ratio
    losses = head.loss_by_feat(cls, reg, gts, metas)
    return float(sum(losses["loss_cls"]).detach()), float(sum(losses["loss_bbox"]).detach())


def test_focal_head_uses_all_anchors_with_sigmoid_outputs():
    torch = pytest.importorskip("torch")
    head = _head(loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=1.0, alpha=0.25, loss_weight=1.0))
    head.init_weights()
    assert head.cls_out_channels == 3 and head.use_sigmoid_cls
    assert head.cls_convs[0][-1].out_channels == head.num_base_priors[0] * 3
    assert torch.allclose(head.cls_convs[1][-1].bias, torch.full_like(head.cls_convs[1][-1].bias, -math.log(99)))
    # no hard negative mining: the ratio of sampled negatives does not matter ...
    assert _loss(head, 3) == pytest.approx(_loss(head, 1))
    # ... while SSD's own CE loss (loss_cls=None) depends on it
    ssd = _head(loss_cls=None)
    ssd.init_weights()
    assert ssd.cls_out_channels == 4 and not ssd.use_sigmoid_cls
    assert _loss(ssd, 3)[0] != pytest.approx(_loss(ssd, 1)[0])
    # gamma changes the classification loss, not the box loss
    g2 = _head(loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0))
    g2.load_state_dict(head.state_dict())
    assert _loss(g2, 3)[0] < _loss(head, 3)[0] and _loss(g2, 3)[1] == pytest.approx(_loss(head, 3)[1])
    with pytest.raises(ValueError, match="use_sigmoid"):
        _head(loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False))


def test_focal_head_takes_the_ssfl_family():
    pytest.importorskip("torch")
    head = _head(loss_cls=dict(type="ShiftStepFocalLoss", use_sigmoid=True, gamma=1.0, alpha=0.25, shift=0.1,
                               loss_weight=1.0))
    head.init_weights()
    cls_loss, box_loss = _loss(head, 3)
    assert math.isfinite(cls_loss) and cls_loss > 0 and math.isfinite(box_loss)


# ------------------------------------------------------------------------- template + experiment


def test_experiment_dry_run(tmp_path):
    proc = run_cli("submit", REPO / "experiments" / "ssd_voc_focal.yaml", "--dry-run", "--workspace", tmp_path / "ws")
    assert proc.returncode == 0, proc.stderr
    assert "would submit 2 runs" in proc.stdout and "6 test jobs of 6 test cells" in proc.stdout
    assert "gamma1" in proc.stdout and "gamma2" in proc.stdout
    for thr in ("0.45", "0.5", "0.6"):  # the seed's NMS thresholds: test cells of each run
        assert proc.stdout.count(f"test iou_threshold{thr}") == 2


def test_experiment_runs_render_the_focal_head():
    from ssflctl.plan import spec
    from ssflctl.plan.render import render_config

    runs = spec.expand(spec.load(REPO / "experiments" / "ssd_voc_focal.yaml"), dry_run=True)
    gammas = []
    for r in runs:
        cfg = render_config(r.template, r.params, r.overrides)
        head = cfg.model.bbox_head
        assert head.type == "FocalSSDHead" and head.num_classes == 20
        assert head.loss_cls.type == "FocalLoss" and head.loss_cls.alpha == 0.25
        assert cfg.test_evaluator.type == "VOCMetric" and cfg.test_evaluator.metric == "mAP"
        assert cfg.model.test_cfg.nms.iou_threshold == 0.5
        gammas.append(head.loss_cls.gamma)
        assert [t.overrides for t in r.tests] == [{"model.test_cfg.nms.iou_threshold": v} for v in (0.45, 0.5, 0.6)]
    assert sorted(gammas) == [1.0, 2.0]


def test_ssd300_vgg16_builds_with_20_classes():
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from ssflctl.plan.render import render_config

    register_all_modules()
    cfg = render_config("ssd300_voc", {})
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    head = model.bbox_head
    assert type(head).__name__ == "FocalSSDHead" and head.cls_out_channels == 20
    assert [t[-1].out_channels for t in head.cls_convs] == [n * 20 for n in head.num_base_priors]
    with torch.no_grad():
        feats = model.extract_feat(torch.zeros(1, 3, 300, 300))
    assert [f.shape[-1] for f in feats] == [38, 19, 10, 5, 3, 1]  # SSD300's six levels


# ------------------------------------------------------------------------- tiny training run


def test_tiny_ssd_focal_trains_two_iterations_validates_and_tests(tmp_path, voc):
    from ssflctl.node import job
    from ssflctl.workdir import mmlogs as logs

    run_dir = tmp_path / "runs" / "ssd-tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": "ssd-tiny", "name": "ssd-tiny", "template": "ssd300_voc",
        "params": {**TINY_PARAMS, "data_root": str(voc) + "/"},
        "overrides": {**TINY_OVERRIDES, "model.bbox_head.loss_cls.gamma": 1.0}, "retry": {}, "test": False}))
    outcome = job.train_run(run_dir)
    assert outcome["outcome"] == "done", outcome
    adir = run_dir / "attempt-1"
    cfg_text = (adir / "config.py").read_text()
    assert "FocalSSDHead" in cfg_text and "VOCMetric" in cfg_text
    scalars = [r for p in adir.glob("*/vis_data/scalars.json") for r in logs.read_scalars(p)]
    train = [r for r in scalars if "loss_cls" in r]
    assert [r["iter"] for r in train] == [1, 2]  # 2 images per VOC trainval x 2 years, batch 2
    assert all(math.isfinite(r["loss_cls"]) and r["loss_cls"] > 0 and math.isfinite(r["loss_bbox"]) for r in train)
    val = [r for r in scalars if "pascal_voc/mAP" in r]
    assert len(val) == 1 and 0.0 <= val[0]["pascal_voc/mAP"] <= 1.0

    # the test step: VOCMetric's mAP@0.5 plus the 12 COCO numbers on mmdet's COCO copy of the VOC GT
    metrics = job.test_run(run_dir)
    assert json.loads((adir / "metrics.json").read_text()) == metrics
    assert 0.0 <= metrics["voc"]["mAP50"] <= 1.0 and metrics["voc"]["eval_mode"] == "11points"
    from ssflctl.evaluation.coco import STAT_NAMES
    assert list(metrics["bbox"]) == list(STAT_NAMES)
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["bbox"].values())
    gt = json.loads((adir / "detections.gt.json").read_text())
    assert metrics["ann_file"] == str(adir / "detections.gt.json") and metrics["num_images"] == 2
    assert sorted(im["id"] for im in gt["images"]) == ["2007_test_000", "2007_test_001"]
    assert len(gt["categories"]) == 20 and set(VOC_CLASSES) <= {c["name"] for c in gt["categories"]}
    n_gt = sum((voc / "VOC2007" / "Annotations" / f"{i}.xml").read_text().count("<object>")
               for i in ("2007_test_000", "2007_test_001"))
    assert len(gt["annotations"]) == n_gt
    dets = json.loads((adir / "detections.bbox.json").read_text())
    assert metrics["num_detections"] == len(dets) and {d["image_id"] for d in dets} <= {im["id"] for im in gt["images"]}

    # the report: a "VOC mAP@0.5" column, and the gallery draws the VOC images (JPEGImages/<id>.jpg)
    from ssflctl.report import build_report, make_report
    from ssflctl.report.aggregate import pct

    rep = make_report(tmp_path)
    assert rep.main.flat_columns()[:2] == ["VOC mAP@0.5", "AP"]
    assert rep.main.rows[0][1][0].text == pct(metrics["voc"]["mAP50"])
    page = build_report(tmp_path, fmt="html", gallery=2)
    assert page.count("data:image/jpeg;base64,") == 2 and "no pictures" not in page
    # the attempt dir read as an outside mmdet work dir: VOCMetric's number from mmengine's own logs
    from ssflctl.report.collect import read_workdir

    outside = read_workdir(adir)
    assert outside["state"] == "done"
    assert outside["metrics"]["bbox"]["VOC mAP@0.5"] == pytest.approx(metrics["voc"]["mAP50"])
