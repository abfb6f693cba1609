"""Dataset pre-flight (issue 15.3): the data a run reads is checked before anything is submitted.

Most tests hand plan.preflight.check a stand-in renderer (a plain dict config, no mmengine);
one goes through `submit --dry-run` and `submit` with the real renderer and template.
"""
import json
from types import SimpleNamespace

import pytest

from ssflctl.plan import preflight

pytestmark = pytest.mark.unit


def coco(path, n_images=4, anns=True, classes=("car", "person"), prefix="", size=(96, 96), files=True):
    images = [{"id": i, "file_name": f"{prefix}img{i}.png", "width": size[0], "height": size[1]}
              for i in range(n_images)]
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(classes)]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 20, 20], "area": 400, "iscrowd": 0}
                   for i in range(n_images)] if anns else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    if files:
        img_dir = path.parent.parent / "images"
        for im in images:
            (img_dir / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            (img_dir / im["file_name"]).write_bytes(b"not an image: pre-flight never reads it")
    return path


def cfg_for(root, train="annotations/train.json", val="annotations/train.json", img="images/",
            dtype="CocoDataset", classes=("car", "person"), filter_cfg=None, wrap=False):
    def ds(ann, test_mode):
        d = {"type": dtype, "data_root": str(root) + "/", "ann_file": ann, "data_prefix": {"img": img},
             "test_mode": test_mode}
        if classes is not None:
            d["metainfo"] = {"classes": classes}
        if filter_cfg is not None and not test_mode:
            d["filter_cfg"] = filter_cfg
        return d
    train_ds = ds(train, False)
    if wrap:
        train_ds = {"type": "RepeatDataset", "times": 2, "dataset": train_ds}
    return {"train_dataloader": {"dataset": train_ds}, "val_dataloader": {"dataset": ds(val, True)},
            "test_dataloader": {"dataset": ds(val, True)}}


def run(root, seed=0, **params):
    return SimpleNamespace(run_id=f"r{seed}", template="t.py", params={"data_root": str(root) + "/", "seed": seed,
                                                                       **params},
                           overrides={}, test=True, line=7)


def check(runs, cfg):
    calls = []

    def render(template, params, overrides):
        calls.append(params)
        return cfg

    res = preflight.check(runs, where=lambda r: f"exp.yaml:{r.line}", render=render)
    return res, calls


def test_good_data_passes_and_renders_once_for_many_seeds(tmp_path):
    coco(tmp_path / "annotations" / "train.json")
    res, calls = check([run(tmp_path, s) for s in range(5)], cfg_for(tmp_path, wrap=True))
    assert res.problems == [] and len(calls) == 1


def test_missing_file_broken_json_and_missing_images(tmp_path):
    res, _ = check([run(tmp_path)], cfg_for(tmp_path))
    assert len(res.problems) == 1
    assert res.problems[0].startswith(f"{tmp_path}/annotations/train.json: the train/val/test annotation file does not exist; "
                                   "convert or download the data, or set params.train_ann/params.val_ann/params.test_ann "
                                   "(exp.yaml:7)")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text('{"images": [')
    res, _ = check([run(tmp_path)], cfg_for(tmp_path))
    assert "not valid JSON" in res.problems[0] and "train.json" in res.problems[0]
    coco(tmp_path / "annotations" / "train.json", files=False)
    res, _ = check([run(tmp_path)], cfg_for(tmp_path))
    assert "the train image directory does not exist" in res.problems[0]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "img0.png").write_bytes(b"")
    res, _ = check([run(tmp_path)], cfg_for(tmp_path))
    assert "3 of 4 sampled images" in res.problems[0] and "params.train_img" in res.problems[0]


def test_a_filter_that_removes_everything_is_refused(tmp_path):
    coco(tmp_path / "annotations" / "train.json", size=(96, 96))
    res, _ = check([run(tmp_path)], cfg_for(tmp_path, filter_cfg={"filter_empty_gt": True, "min_size": 200}))
    (p,) = res.problems
    assert "keeps 0 images and 0 boxes" in p and "min_size" in p and "need at least one array" in p
    # filter_empty_gt on a file without annotations: nothing to train on
    coco(tmp_path / "annotations" / "train.json", anns=False)
    res, _ = check([run(tmp_path)], cfg_for(tmp_path, filter_cfg={"filter_empty_gt": True}))
    assert "keeps 0 images" in res.problems[0]
    # boxes of a class the config does not train are filtered like mmdet does
    coco(tmp_path / "annotations" / "train.json", classes=("car", "person"))
    res, _ = check([run(tmp_path)], cfg_for(tmp_path, classes=("person",), filter_cfg={"filter_empty_gt": True}))
    assert "keeps 0 images and 0 boxes" in res.problems[0]


def test_classes_of_the_config_must_be_in_the_file(tmp_path):
    coco(tmp_path / "annotations" / "train.json", classes=("car", "person"))
    res, _ = check([run(tmp_path)], cfg_for(tmp_path, classes=("car", "bicycle")))
    (p,) = res.problems
    assert "classes bicycle of the config are not categories" in p and "it has: car, person" in p


def test_cityscapes_test_split_has_only_dummy_labels(tmp_path):
    ann = tmp_path / "annotations" / "instancesonly_filtered_gtFine_test.json"
    coco(ann, anns=False, classes=("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"),
         prefix="berlin/")
    cfg = cfg_for(tmp_path, train="annotations/instancesonly_filtered_gtFine_test.json",
                  val="annotations/instancesonly_filtered_gtFine_test.json", img="leftImg8bit/test/",
                  dtype="CityscapesDataset", classes=("person", "car"),
                  filter_cfg={"filter_empty_gt": True, "min_size": 32})
    (tmp_path / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    res, _ = check([run(tmp_path)], cfg)
    assert len(res.problems) == 2  # train on it, and evaluate on it (val and test: one line)
    assert all("Cityscapes' test split has only dummy labels" in p for p in res.problems)
    assert "train on the train split" in res.problems[0] and "validate and test on val" in res.problems[1]


def test_each_annotation_file_is_read_once_by_path_mtime_size(tmp_path):
    ann = coco(tmp_path / "annotations" / "train.json")
    other = coco(tmp_path / "annotations" / "val.json")
    cfg = cfg_for(tmp_path, val="annotations/val.json")
    res, _ = check([run(tmp_path, 0), run(tmp_path, 1, batch_size=2), run(tmp_path, 2, img_scale=[64, 64])], cfg)
    assert res.problems == []
    assert sorted(res.read) == sorted([str(ann), str(other)])  # 2 renders, each file read once
    res, _ = check([run(tmp_path)], cfg)
    assert res.read == []  # unchanged: the cache answers
    coco(ann, n_images=5)
    res, _ = check([run(tmp_path)], cfg)
    assert res.read == [str(ann)]  # changed size/mtime: read again


def test_a_missing_data_root_is_left_to_spec(tmp_path):
    res, calls = check([run(tmp_path / "nowhere")], {})
    assert res.problems == [] and calls == []


EXP = """\
name: pf
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  seed: [1, 2, 3]
params: {{max_epochs: 1}}
overrides: {{train_dataloader.dataset.filter_cfg.min_size: {min_size}}}
resources: {{cpus: 1, mem: 1G, time: "00:10:00"}}
executor: {{type: local}}
"""


@pytest.mark.training
def test_submit_and_dry_run_refuse_with_the_real_template(tmp_path, monkeypatch):
    """retinanet_tiny on synthetic data whose images are 96 px: min_size 200 leaves nothing to train on."""
    from ssflctl.control import submit as submit_mod
    from ssflctl.convert import synth_coco
    from ssflctl.errors import UserError

    monkeypatch.chdir(tmp_path)
    synth_coco.generate(tmp_path / "data", n_train=3, n_val=2, seed=0)
    path = tmp_path / "pf.yaml"
    path.write_text(EXP.format(root=tmp_path / "data", min_size=200))
    res = submit_mod.submit(path, tmp_path / "ws", dry_run=True)
    (p,) = res.problems
    assert "annotations/train.json: the train split keeps 0 images" in p and f"{path}:" in p
    with pytest.raises(UserError) as err:
        submit_mod.submit(path, tmp_path / "ws")
    assert str(err.value) == p
    assert not (tmp_path / "ws" / "runs").exists()  # nothing claimed, rendered or submitted
    path.write_text(EXP.format(root=tmp_path / "data", min_size=4))
    assert submit_mod.submit(path, tmp_path / "ws", dry_run=True).problems == []
