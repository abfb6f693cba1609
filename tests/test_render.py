"""ssflctl.plan.render and the templates: params through the Config API, provenance, builds."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssflctl.plan import render
from ssflctl.convert import synth_coco
from ssflctl.errors import UserError

pytestmark = pytest.mark.training

REPO = Path(__file__).resolve().parents[1]
EVIL = "x'); import os; os.system('touch /tmp/ssflctl-pwned') #"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth_coco.generate(root, n_train=4, n_val=2, size=(96, 96), seed=1)
    return root


def test_template_params_are_declared_without_mmengine():
    names = render.list_templates()
    assert {"retinanet_tiny", "retinanet_r50_fpn_1x_coco", "retinanet_r50_fpn_1x_cityscapes"} <= set(names)
    for name in names:
        p = render.template_params(name)
        for key in ("loss", "lr", "seed", "data_root", "max_epochs", "batch_size", "workers"):
            assert key in p, (name, key)
    assert render.template_params("retinanet_tiny")["classes"] is None
    with pytest.raises(UserError, match="not found"):
        render.resolve_template("no_such_template")


def test_values_never_become_source_text(synth, tmp_path):
    from mmengine.config import Config

    cfg = render.render_config("retinanet_tiny", {"data_root": EVIL, "classes": list(synth_coco.CLASSES)},
                               {"model.bbox_head.loss_cls.gamma": 1.5, "work_dir_note": EVIL})
    out = tmp_path / "config.py"
    cfg.dump(str(out))
    tree = ast.parse(out.read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom, ast.Call))
                and not (isinstance(n, ast.Call) and getattr(n.func, "id", None) == "dict")]
    back = Config.fromfile(str(out))
    assert back.train_dataloader.dataset.data_root == EVIL
    assert back.work_dir_note == EVIL
    assert back.ssflctl_params.data_root == EVIL
    assert back.test_evaluator.ann_file == os.path.join(EVIL, "annotations/val.json")
    assert back.model.bbox_head.loss_cls.gamma == 1.5
    assert not Path("/tmp/ssflctl-pwned").exists()


@pytest.mark.parametrize("loss,expect", [
    ("focal", {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}),
    ("ssfl", {"type": "ShiftStepFocalLoss", "shift": 0.1}),
    ("gfl", {"type": "ShiftStepFocalLoss", "shift": 0.0}),
    ({"type": "ShiftStepFocalLoss", "shift": 0.2, "max_weight": 100.0},
     {"type": "ShiftStepFocalLoss", "shift": 0.2, "max_weight": 100.0}),
])
def test_loss_param(synth, loss, expect):
    cfg = render.render_config("retinanet_tiny", {"loss": loss, "data_root": str(synth) + "/"})
    lc = cfg.model.bbox_head.loss_cls
    for k, v in expect.items():
        assert lc[k] == v
    # classes came from the annotation file
    assert cfg.model.bbox_head.num_classes == 3
    assert tuple(cfg.train_dataloader.dataset.metainfo.classes) == synth_coco.CLASSES
    assert tuple(cfg.test_dataloader.dataset.metainfo.classes) == synth_coco.CLASSES


def test_params_and_errors(synth):
    cfg = render.render_config("retinanet_tiny", {
        "data_root": str(synth) + "/", "lr": 0.02, "seed": 7, "max_epochs": 10, "batch_size": 3,
        "workers": 2, "img_scale": [64, 48]})
    assert cfg.optim_wrapper.optimizer.lr == 0.02 and cfg.randomness.seed == 7
    assert cfg.train_cfg.max_epochs == 10 and cfg.train_cfg.val_interval == 10
    assert cfg.param_scheduler[0].milestones == [8] and cfg.param_scheduler[0].end == 10
    assert cfg.train_dataloader.batch_size == 3
    assert cfg.val_dataloader.num_workers == 2 and cfg.val_dataloader.persistent_workers is True
    assert cfg.train_dataloader.dataset.pipeline[2].scale == (64, 48)
    assert cfg.test_dataloader.dataset.pipeline[1].scale == (64, 48)
    imports = cfg.custom_imports.imports
    assert {"ssflctl.extensions.losses", "ssflctl.extensions.compat", "ssflctl.node.guard"} <= set(imports)
    assert cfg.custom_imports.allow_failed_imports is False
    assert [h.type for h in cfg.custom_hooks] == ["NanGuardHook"]
    with pytest.raises(UserError, match="lossfn"):
        render.render_config("retinanet_tiny", {"lossfn": "focal"})
    with pytest.raises(UserError, match="unknown loss"):
        render.render_config("retinanet_tiny", {"loss": "focall", "data_root": str(synth) + "/"})
    with pytest.raises(UserError, match="needs a 'type'"):
        render.render_config("retinanet_tiny", {"loss": {"gamma": 1}, "data_root": str(synth) + "/"})
    with pytest.raises(UserError, match="lr must be"):
        render.render_config("retinanet_tiny", {"lr": "0.01", "data_root": str(synth) + "/"})
    # an override merges like mmengine's inheritance (a new key is added); the registry check
    # refuses a key the class does not take (tests/test_render_cache.py has the rest)
    from ssflctl.plan import registry_check

    cfg = render.render_config("retinanet_tiny", {"data_root": str(synth) + "/"}, {"model.bbox_hed.x": 1})
    with pytest.raises(registry_check.ConfigProblem, match="RetinaNet has no argument 'bbox_hed'; did you mean"):
        registry_check.check(cfg)
    with pytest.raises(UserError, match="classes not given"):
        render.render_config("retinanet_tiny", {"data_root": "/nonexistent/"})


def test_declared_param_that_nothing_sets_is_refused(tmp_path):
    t = tmp_path / "mine.py"
    t.write_text("ssflctl_params = dict(lr=0.01, momentum=0.9)\n"
                 "optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9))\n")
    with pytest.raises(UserError, match="momentum but nothing sets it"):
        render.render_config(str(t), {"lr": 0.1})
    t.write_text(t.read_text() + "ssflctl_bindings = dict(momentum='optim_wrapper.optimizer.momentum')\n")
    cfg = render.render_config(str(t), {"lr": 0.1, "momentum": 0.5})
    assert cfg.optim_wrapper.optimizer.lr == 0.1 and cfg.optim_wrapper.optimizer.momentum == 0.5


def test_cityscapes_recipe_and_epoch_rescaling():
    cfg = render.render_config("retinanet_r50_fpn_1x_cityscapes", {"data_root": "/d/cs/"})
    assert cfg.model.bbox_head.num_classes == 8
    assert cfg.train_dataloader.dataset.type == "RepeatDataset" and cfg.train_dataloader.dataset.times == 8
    inner = cfg.train_dataloader.dataset.dataset
    assert inner.data_root == "/d/cs/" and inner.type == "CityscapesDataset"
    assert inner.pipeline[2].scale == [(2048, 800), (2048, 1024)]
    assert cfg.optim_wrapper.optimizer.lr == 0.01 and cfg.train_dataloader.batch_size == 8
    assert cfg.train_cfg.max_epochs == 8 and cfg.param_scheduler[1].milestones == [7]
    assert cfg.val_evaluator.ann_file == "/d/cs/annotations/instancesonly_filtered_gtFine_val.json"
    cfg = render.render_config("retinanet_r50_fpn_1x_cityscapes",
                               {"max_epochs": 16, "repeat": 2, "load_from": "/ck/coco.pth"})
    assert cfg.param_scheduler[1].milestones == [14] and cfg.param_scheduler[1].end == 16
    assert cfg.param_scheduler[0].end == 500  # iteration-based warm-up untouched
    assert cfg.train_dataloader.dataset.times == 2 and cfg.load_from == "/ck/coco.pth"
    coco = render.render_config("retinanet_r50_fpn_1x_coco", {"loss": "ssfl"})
    assert coco.param_scheduler[1].milestones == [8, 11] and coco.train_cfg.max_epochs == 12
    assert coco.model.backbone.depth == 50 and coco.model.bbox_head.loss_cls.type == "ShiftStepFocalLoss"


def _standin(root: Path, names, size=(256, 128)):
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(root / "img" / "a.png")
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": size[0], "height": size[1]}],
           "annotations": [{"id": k + 1, "image_id": 1, "category_id": cid, "bbox": [10 + 60 * k, 20, 48, 48],
                            "area": 48 * 48, "iscrowd": 0, "segmentation": []}
                           for k, (cid, _) in enumerate(names)],
           "categories": [{"id": cid, "name": n} for cid, n in names]}
    (root / "ann.json").write_text(json.dumps(ann))


@pytest.mark.parametrize("template,names", [
    ("retinanet_r50_fpn_1x_coco", [(1, "person"), (3, "car")]),
    ("retinanet_r50_fpn_1x_cityscapes", [(24, "person"), (26, "car"), (33, "bicycle")]),
])
def test_big_templates_build(tmp_path, template, names):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner

    register_all_modules()
    _standin(tmp_path, names)
    split = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (("ann", "ann.json"), ("img", "img/"))}
    cfg = render.render_config(template, {"data_root": str(tmp_path) + "/", "workers": 0, "loss": "ssfl", **split},
                               {"model.backbone.init_cfg": None})
    from mmengine.config import Config

    cfg.dump(str(tmp_path / "config.py"))
    cfg = Config.fromfile(str(tmp_path / "config.py"))  # custom_imports registers ShiftStepFocalLoss
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == "RetinaNet"
    assert type(model.bbox_head.loss_cls).__name__ == "ShiftStepFocalLoss"
    assert model.bbox_head.num_classes == (80 if "coco" in template else 8)
    for split_name in ("train", "val", "test"):
        loader = Runner.build_dataloader(cfg[f"{split_name}_dataloader"], seed=0)
        assert len(loader.dataset) >= 1
    item = loader.dataset[0]
    # test scale: COCO 1333x800, Cityscapes 2048x1024 (keep ratio) of a 256x128 image
    assert tuple(item["inputs"].shape[1:]) == ((667, 1333) if "coco" in template else (1024, 2048))
    assert item["data_samples"].gt_instances.bboxes.shape[0] == len(names)


def test_render_attempt_writes_provenance(tmp_path, synth, monkeypatch):
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": "tiny-s0-12345678", "template": "retinanet_tiny",
        "params": {"data_root": str(synth) + "/", "seed": 3, "lr": 0.02}, "overrides": {}, "test": True}))
    adir = render.render_attempt(run_dir, 1)
    assert adir == run_dir / "attempt-1"
    a = json.loads((adir / "attempt.json").read_text())
    assert a["lr"] == 0.02 and a["attempt"] == 1 and a["resume_from"] is None and a["test"] is True
    p = json.loads((adir / "provenance.json").read_text())
    assert p["params"]["seed"] == 3 and p["params"]["lr"] == 0.02
    assert p["versions"]["mmdet"] == "3.3.0" and p["versions"]["mmengine"] and p["versions"]["torch"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert p["git"]["commit"] == head and isinstance(p["git"]["dirty"], bool)
    with pytest.raises(UserError, match="already rendered"):
        render.render_attempt(run_dir, 1)
    adir2 = render.render_attempt(run_dir, 2, lr=0.002, resume_from=str(adir / "epoch_1.pth"), reason="after NaN")
    from mmengine.config import Config

    cfg = Config.fromfile(str(adir2 / "config.py"))
    assert cfg.optim_wrapper.optimizer.lr == 0.002 and cfg.resume is True
    assert cfg.load_from == str(adir / "epoch_1.pth")
    assert {"type": "LrOverrideHook", "lr": 0.002} in [dict(h) for h in cfg.custom_hooks]
    assert json.loads((adir2 / "attempt.json").read_text())["reason"] == "after NaN"


def test_plain_mmdet_train_py_runs_the_rendered_config(tmp_path, synth):
    """Anyone can run the rendered config with mmdet's own tools/train.py (and --resume it)."""
    import mmdet

    train_py = Path(mmdet.__file__).parent / ".mim" / "tools" / "train.py"
    cfg = render.render_config("retinanet_tiny", {"data_root": str(synth) + "/", "max_epochs": 1,
                                                  "batch_size": 4, "log_interval": 1})
    cfg_file = tmp_path / "config.py"
    cfg.dump(str(cfg_file))
    wd = tmp_path / "wd"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, str(train_py), str(cfg_file), "--work-dir", str(wd)]
    r = subprocess.run(base, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (wd / "epoch_1.pth").is_file()
    r = subprocess.run(base + ["--resume", "--cfg-options", "train_cfg.max_epochs=2",
                               "param_scheduler.0.end=2"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "resumed epoch: 1, iter: 1" in out
    assert (wd / "epoch_2.pth").is_file()
