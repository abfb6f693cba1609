"""Axes with derived settings (``ssflctl_derived``): ResNet depth -> FPN channels + checkpoint,
optimizer -> its defaults; the shipped depth-sweep experiment (dry-run, every run renders), and
RetinaNet with ResNet-18 and ResNet-50 both built by mmdet (no downloads) and run forward."""
from __future__ import annotations

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.training

TEMPLATE = "retinanet_resnet_fpn_coco"
SMALL, LARGE = [64, 128, 256, 512], [256, 512, 1024, 2048]


def test_derived_table_is_read_without_executing_the_template(tmp_path):
    from ssflctl.plan import derived
    from ssflctl.errors import UserError
    from ssflctl.plan.render import resolve_template

    table = derived.read(resolve_template(TEMPLATE))
    assert sorted(table["depth"]) == [18, 34, 50, 101, 152]
    assert table["depth"][34]["model.neck.in_channels"] == SMALL
    assert table["depth"][101]["model.neck.in_channels"] == LARGE
    assert set(table["optimizer"]) == {"sgd", "adam"}
    assert derived.lookup(table["depth"], "18") is table["depth"][18]
    assert derived.lookup(table["optimizer"], "Adam") is table["optimizer"]["adam"]
    bad = tmp_path / "t.py"
    bad.write_text("ssflctl_derived = dict(depth={18: {'a.b': open('x')}})\n")
    with pytest.raises(UserError, match="literal"):
        derived.read(bad)


@pytest.mark.parametrize("depth,chans", [(18, SMALL), (34, SMALL), (50, LARGE), (101, LARGE), (152, LARGE)])
def test_depth_axis_sets_channels_and_checkpoint(depth, chans):
    from ssflctl.plan.render import render_config

    cfg = render_config(TEMPLATE, {"depth": depth})
    assert cfg.model.backbone.depth == depth
    assert list(cfg.model.neck.in_channels) == chans
    assert cfg.model.backbone.init_cfg == {"type": "Pretrained", "checkpoint": f"torchvision://resnet{depth}"}


def test_optimizer_axis_brings_its_defaults_and_explicit_lr_wins():
    from ssflctl.errors import UserError
    from ssflctl.plan.render import render_config

    sgd = render_config(TEMPLATE, {}).optim_wrapper.optimizer
    assert dict(sgd) == {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001}
    adam = render_config(TEMPLATE, {"optimizer": "adam"}).optim_wrapper.optimizer
    assert dict(adam) == {"type": "Adam", "lr": 0.0001, "weight_decay": 0.0}  # no SGD momentum left
    adam = render_config(TEMPLATE, {"optimizer": "adam", "lr": 0.001}).optim_wrapper.optimizer
    assert dict(adam) == {"type": "Adam", "lr": 0.001, "weight_decay": 0.0}
    # an override still wins over both
    adam = render_config(TEMPLATE, {"optimizer": "adam"}, {"optim_wrapper.optimizer.weight_decay": 0.05})
    assert adam.optim_wrapper.optimizer.weight_decay == 0.05
    with pytest.raises(UserError, match="supports 18, 34, 50, 101, 152"):
        render_config(TEMPLATE, {"depth": 26})
    with pytest.raises(UserError, match="supports sgd, adam"):
        render_config(TEMPLATE, {"optimizer": "rmsprop"})


def test_shipped_experiment_dry_run_and_every_run_renders(tmp_path):
    from ssflctl.plan import spec
    from ssflctl.plan.render import render_config

    path = REPO / "experiments" / "retinanet_depth_sweep.yaml"
    proc = run_cli("submit", path, "--dry-run", "--workspace", tmp_path / "ws")
    assert proc.returncode == 0, proc.stderr
    assert "would submit 11 runs" in proc.stdout
    seen = set()
    for r in spec.expand(spec.load(path), dry_run=True):
        cfg = render_config(r.template, r.params, r.overrides)
        opt = cfg.optim_wrapper.optimizer
        assert opt.type == "Adam" and "momentum" not in opt and opt.lr == r.axes["lr"]
        depth = r.axes["depth"]
        assert list(cfg.model.neck.in_channels) == (SMALL if depth < 50 else LARGE)
        assert cfg.model.backbone.init_cfg.checkpoint == f"torchvision://resnet{depth}"
        assert cfg.randomness.seed == r.axes["seed"] and cfg.train_cfg.max_epochs == r.axes["max_epochs"]
        seen.add((depth, r.axes["lr"], r.axes["seed"], r.axes["max_epochs"]))
    assert {d for d, *_ in seen} == {18, 34, 50, 101, 152}
    assert {(lr, s) for d, lr, s, e in seen if d == 18 and e == 50} == {
        (0.0001, 0), (0.001, 3407), (0.0001, 3407), (0.00001, 3407)}
    assert (18, 0.0001, 0, 80) in seen and {e for d, lr, s, e in seen if d == 50} == {20, 40, 50}


@pytest.mark.parametrize("depth", [18, 50])
def test_depth_builds_and_runs_forward(depth):
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.optim import build_optim_wrapper

    from ssflctl.plan.render import render_config

    register_all_modules()
    cfg = render_config(TEMPLATE, {"depth": depth, "optimizer": "adam", "lr": 0.001})
    cfg.model.backbone.init_cfg = None  # nothing can be downloaded here
    model = MODELS.build(cfg.model)
    assert [c.conv.in_channels for c in model.neck.lateral_convs] == (SMALL if depth < 50 else LARGE)[1:]
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.zeros(1, 3, 64, 64))
    assert len(feats) == 5 and all(f.shape[1] == 256 for f in feats)
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    assert type(optim.optimizer).__name__ == "Adam" and optim.optimizer.param_groups[0]["lr"] == 0.001


@pytest.mark.parametrize("depth", [18, 50])
def test_tiny_variant_of_the_sweep_trains_a_few_iterations(tmp_path, depth):
    """The shipped sweep's template at depth 18 and 50, shrunk to small synthetic images, trains
    two iterations through mmengine's Runner with Adam (the sweep's optimizer) and finite losses."""
    import math

    from mmengine.runner import Runner

    from ssflctl.convert import synth_coco
    from ssflctl.plan.render import render_config

    data = tmp_path / "data"
    synth_coco.generate(data, n_train=4, n_val=0, n_test=0, size=(64, 64), min_size=16, max_size=32)
    classes = list(synth_coco.CLASSES)
    params = {"depth": depth, "optimizer": "adam", "lr": 0.0001, "data_root": f"{data}/", "max_epochs": 1,
              "batch_size": 2, "workers": 0, "train_ann": "annotations/train.json", "train_img": "images/train/",
              "log_interval": 1}
    overrides = {
        "model.backbone.init_cfg": None,  # nothing can be downloaded here
        "model.bbox_head.num_classes": len(classes),
        "train_dataloader.dataset.metainfo": {"classes": classes},
        "train_dataloader.dataset.pipeline.2.scale": (64, 64),
        "train_dataloader.num_workers": 0, "train_dataloader.persistent_workers": False,
        "train_cfg.val_interval": 99,
    }
    cfg = render_config(TEMPLATE, params, overrides)
    cfg.work_dir = str(tmp_path / "work")
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
    cfg.default_hooks.checkpoint = None
    cfg.visualizer.name = f"depth-sweep-{depth}-{tmp_path.name}"
    runner = Runner.from_cfg(cfg)
    seen = []

    from mmengine.hooks import Hook

    class Record(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            seen.append(float(outputs["loss"].detach() if hasattr(outputs["loss"], "detach") else outputs["loss"]))

    runner.register_hook(Record(), priority="LOWEST")
    runner.train()
    assert runner.iter == 2 and len(seen) == 2
    assert all(math.isfinite(v) and v > 0 for v in seen)
    assert type(runner.optim_wrapper.optimizer).__name__ == "Adam"
    assert [c.conv.in_channels for c in runner.model.neck.lateral_convs] == (SMALL if depth < 50 else LARGE)[1:]
