"""Issue 15.2/15.5: overrides merge like mmengine's inheritance; a broken override fails at
`submit --dry-run` (and `submit`) with the YAML key and line; a submission parses each template
once and writes configs without yapf — and renders exactly what a fresh per-run render does."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ssflctl.control import submit as submit_mod
from ssflctl.errors import UserError
from ssflctl.plan import config_check, overrides, registry_check, render
from ssflctl.plan.config_text import dump_text

pytestmark = pytest.mark.training

#: every template in templates/, with params and overrides that touch each kind of value
CASES = {
    "retinanet_tiny": [({"data_root": "/d/synth/", "classes": ["a", "b", "c"], "loss": "ssfl", "lr": 0.02,
                         "max_epochs": 4, "img_scale": [64, 48]},
                        {"optim_wrapper": {"clip_grad": {"max_norm": 35}}, "model.bbox_head.loss_cls.gamma": 1.5})],
    "retinanet_r50_fpn_1x_coco": [({"loss": "gfl", "seed": 3, "batch_size": 4, "workers": 0},
                                   {"param_scheduler.1.milestones": [9], "model": {"backbone": {"init_cfg": None}}})],
    "retinanet_r50_fpn_1x_cityscapes": [({"max_epochs": 16, "repeat": 2, "load_from": "/ck/coco.pth"},
                                         {"train_cfg": {"val_interval": 2}, "work_note": "x'); import os #"})],
    "retinanet_resnet_fpn_coco": [({"depth": 18, "optimizer": "adam", "lr": 1e-3}, {}),
                                  ({"depth": 101, "optimizer": "sgd"},
                                   {"optim_wrapper.optimizer": {"_delete_": True, "type": "SGD", "lr": 0.1}})],
    "ssd300_voc": [({"seed": 1, "max_epochs": 6}, {"default_hooks.logger.interval": 7})],
}


def _cases():
    assert set(CASES) == set(render.list_templates()), "add the new template to CASES"
    return [(t, p, o) for t, items in CASES.items() for p, o in items]


@pytest.mark.parametrize("template,params,ovr", _cases())
def test_cached_render_is_the_fresh_render(tmp_path, template, params, ovr):
    from mmengine.config import Config

    fresh = render.render_config(template, params, ovr)
    cache = render.RenderCache()
    first = render.render_config(template, params, ovr, cache=cache)
    other = render.render_config(template, {**params, "seed": 5}, {"model.bbox_head.num_classes": 3, "train_cfg.max_epochs": 99},
                                 cache=cache)  # another run of the same submission changes shared subtrees
    again = render.render_config(template, params, ovr, cache=cache)
    assert other.model.bbox_head.num_classes == 3
    assert fresh.to_dict() == first.to_dict() == again.to_dict()
    text = dump_text(fresh.to_dict())
    assert text == dump_text(again.to_dict())
    config_check.check_text(text, fresh.to_dict())
    fast, slow = tmp_path / "fast.py", tmp_path / "slow.py"
    fast.write_text(text)
    fresh.dump(str(slow))  # mmengine's own writer (yapf)
    assert Config.fromfile(str(fast)).to_dict() == fresh.to_dict() == Config.fromfile(str(slow)).to_dict()
    assert registry_check.problems(again) == []


def test_dump_text_is_faithful_for_awkward_values(tmp_path):
    from mmengine.config import Config

    data = {"a": {"x y": 1, 3: (1,), "class": None, "ok": [(1, 2), {"k": float("inf")}, []]},
            "b": "it's \"q\"\n{{x}}", "c": (), "d": dict(), "e": [1.5e-05, -2, True], "f": float("-inf")}
    text = dump_text(data)
    p = tmp_path / "c.py"
    p.write_text(text)
    config_check.check_text(text, data)
    back = Config.fromfile(str(p)).to_dict()
    assert back["a"] == data["a"] and back["c"] == () and back["e"] == data["e"] and back["f"] == float("-inf")
    with pytest.raises(TypeError):
        dump_text({"a": object()})


def test_render_attempt_with_cache_writes_the_same_files(tmp_path):
    run = {"run_id": "r1", "template": "retinanet_r50_fpn_1x_coco", "params": {"seed": 2},
           "overrides": {"model": {"bbox_head": {"loss_cls": {"gamma": 1.5}}}}, "test": True}
    a = render.render_attempt(tmp_path / "a", 1, run=run)
    cache = render.RenderCache()
    b = render.render_attempt(tmp_path / "b", 1, run=run, cache=cache, check=registry_check.check)
    c = render.render_attempt(tmp_path / "c", 1, run=run, cache=cache, resume_from="/x/epoch_3.pth", lr=0.001)
    assert (a / "config.py").read_text() == (b / "config.py").read_text()
    assert "LrOverrideHook" in (c / "config.py").read_text()
    assert (a / "provenance.json").read_text().count("template_sha256") == 1


# ------------------------------------------------------------------------------------------
# the merge rule
# ------------------------------------------------------------------------------------------
BASE = {"optim_wrapper": {"type": "OptimWrapper", "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9}},
        "model": {"bbox_head": {"loss_cls": {"type": "FocalLoss", "gamma": 2.0}}, "init_cfg": None},
        "param_scheduler": [{"type": "LinearLR", "end": 500}, {"type": "MultiStepLR", "milestones": [8, 11]}],
        "load_from": "x.pth"}


def _merged(ovr):
    from mmengine.config import Config

    cfg = Config(copy.deepcopy(BASE))
    overrides.merge(cfg, ovr)
    return cfg.to_dict()


def _mmengine(options):
    from mmengine.config import Config

    cfg = Config(copy.deepcopy(BASE))
    cfg.merge_from_dict(copy.deepcopy(options), allow_list_keys=True)
    return cfg.to_dict()


@pytest.mark.parametrize("forms", [
    [{"optim_wrapper": {"clip_grad": {"max_norm": 35}}}, {"optim_wrapper.clip_grad.max_norm": 35},
     {"optim_wrapper.clip_grad": {"max_norm": 35}}, {"optim_wrapper": {"clip_grad.max_norm": 35}}],
    [{"model": {"bbox_head": {"loss_cls": {"gamma": 1.5}}}}, {"model.bbox_head.loss_cls.gamma": 1.5}],
    [{"optim_wrapper": {"optimizer": {"_delete_": True, "type": "Adam", "lr": 1e-4}}},
     {"optim_wrapper.optimizer": {"_delete_": True, "type": "Adam", "lr": 1e-4}}],
    [{"param_scheduler": {"1": {"milestones": [9]}}}, {"param_scheduler.1.milestones": [9]},
     {"param_scheduler.1": {"milestones": [9]}}],
])
def test_dotted_and_nested_forms_mean_the_same_as_mmengine(forms):
    want = _mmengine(forms[1] if len(forms) > 1 else forms[0])
    for form in forms:
        assert _merged(form) == want, form


def test_merge_rule_details():
    got = _merged({"optim_wrapper": {"clip_grad": {"max_norm": 35}}})
    assert got["optim_wrapper"]["optimizer"] == BASE["optim_wrapper"]["optimizer"]  # merged, not replaced
    got = _merged({"model": {"bbox_head": {"loss_cls": {"gamma": 1.5}}}})
    assert got["model"]["bbox_head"]["loss_cls"] == {"type": "FocalLoss", "gamma": 1.5}
    got = _merged({"optim_wrapper.optimizer": {"_delete_": True, "type": "Adam", "lr": 1e-4}})
    assert got["optim_wrapper"]["optimizer"] == {"type": "Adam", "lr": 1e-4}
    got = _merged({"optim_wrapper.optimizer": {"type": "Adam"}})  # without _delete_: merged (momentum stays)
    assert got["optim_wrapper"]["optimizer"]["momentum"] == 0.9
    assert _merged({"param_scheduler.-1.milestones": [10]})["param_scheduler"][1]["milestones"] == [10]
    assert _merged({"model.init_cfg": {"type": "Pretrained", "checkpoint": "c"}})["model"]["init_cfg"]["type"] \
        == "Pretrained"  # a mapping takes the place of None
    assert _merged({"load_from": None, "optim_wrapper": {"optimizer.lr": 0.5}, "optim_wrapper.optimizer.lr": 0.2}
                   )["optim_wrapper"]["optimizer"]["lr"] == 0.2  # later wins
    with pytest.raises(overrides.OverrideError, match=r"param_scheduler\.5: index 5 is out of range"):
        _merged({"param_scheduler.5.end": 1})
    with pytest.raises(overrides.OverrideError, match=r"overrides\.load_from: the config has 'x.pth' here"):
        _merged({"load_from": {"a": 1}})


# ------------------------------------------------------------------------------------------
# submit --dry-run / submit: the key and the line
# ------------------------------------------------------------------------------------------
EXP = """\
name: ov
template: retinanet_r50_fpn_1x_coco
datasets:
  coco: {{root: {root}, overrides: {ds_over}}}
matrix:
  loss: [focal, ssfl]
  seed: [1]
{axis}overrides:
  {over}
resources: {{gpus: 0, cpus: 1, mem: 500M, time: "00:10:00"}}
executor: {{type: local}}
"""


def _exp(tmp_path, over, ds_over="{}", axis=""):
    (tmp_path / "coco").mkdir(exist_ok=True)
    p = tmp_path / "ov.yaml"
    p.write_text(EXP.format(root=tmp_path / "coco", over=over, ds_over=ds_over, axis=axis))
    return p


def test_dry_run_renders_and_checks_nested_overrides(tmp_path):
    p = _exp(tmp_path, "optim_wrapper: {clip_grad: {max_norm: 35}}\n  model: {bbox_head: {loss_cls: {gamma: 1.5}}}")
    res = submit_mod.submit(p, tmp_path / "ws", dry_run=True)
    assert len(res.submitted) == 2
    cfg = render.render_config(res.submitted[0].run.template, res.submitted[0].run.params,
                               res.submitted[0].run.overrides)
    assert cfg.optim_wrapper.clip_grad.max_norm == 35 and cfg.optim_wrapper.optimizer.type == "SGD"
    assert cfg.model.bbox_head.loss_cls.gamma == 1.5 and cfg.model.bbox_head.loss_cls.type == "FocalLoss"


@pytest.mark.parametrize("over,ds_over,axis,line,key,what", [
    ("model:\n    bbox_head:\n      loss_cls: {type: FocalLos}", "{}", "", 11,
     "overrides.model.bbox_head.loss_cls", "unknown loss type 'FocalLos'; did you mean 'FocalLoss'"),  # plan time
    ("model:\n    bbox_head:\n      loss_cls: {type: CrossEntropyLoss}", "{}", "", 11,
     "overrides.model.bbox_head.loss_cls.type",  # render time: the merge keeps focal's keywords
     "model.bbox_head.loss_cls.gamma: CrossEntropyLoss has no argument 'gamma'"),
    ("model.bbox_hed.num_classes: 3", "{}", "", 9, "overrides.model.bbox_hed.num_classes",
     "model.bbox_hed: RetinaNet has no argument 'bbox_hed'; did you mean 'bbox_head'"),
    ("train_cfg.max_epochs: 2", "{optim_wrapper: {optimizer: {type: Adamm}}}", "", 4,
     "datasets.coco.overrides.optim_wrapper.optimizer.type", "'Adamm' is not registered"),
    ("train_cfg.max_epochs: 2", "{}", "  train_dataloader.dataset.pipeline.2.keep_ratoi: [true]\n", 8,
     "matrix.train_dataloader.dataset.pipeline.2.keep_ratoi", "did you mean 'keep_ratio'"),
    ("param_scheduler.7.end: 3", "{}", "", 9, "overrides.param_scheduler.7.end", "param_scheduler.7: index 7 is out of range"),
    # RetinaHead takes **kwargs and hands them to AnchorHead, which does not take the typo
    ("model.bbox_head.anchor_generatr.octave_base_scale: 2", "{}", "", 9,
     "overrides.model.bbox_head.anchor_generatr.octave_base_scale",
     "model.bbox_head.anchor_generatr: RetinaHead has no argument 'anchor_generatr'; did you mean 'anchor_generator'?"),
])
def test_a_broken_override_fails_at_dry_run_with_key_and_line(tmp_path, over, ds_over, axis, line, key, what):
    p = _exp(tmp_path, over, ds_over, axis)
    with pytest.raises(UserError) as ei:
        submit_mod.submit(p, tmp_path / "ws", dry_run=True)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:{line}: {key}: "), msg
    assert what in msg and "\n" not in msg


def test_a_broken_override_fails_submit_before_any_job(tmp_path, monkeypatch):
    from ssflctl.registry.store import Registry

    monkeypatch.chdir(tmp_path)
    p = _exp(tmp_path, "model: {bbox_head: {loss_cls: {type: FocalLoss}}}")  # ssfl's shift would stay
    with pytest.raises(UserError) as ei:
        submit_mod.submit(p, tmp_path / "ws", preflight=False)  # stand-in data: the override check is tested
    assert str(ei.value).startswith(f"{p}:9: overrides.model.bbox_head.loss_cls.type: "
                                    "model.bbox_head.loss_cls.shift: FocalLoss has no argument 'shift'")
    with Registry.for_reading(tmp_path / "ws") as reg:
        states = {r["state"] for r in reg.run_rows("ov")}
    assert states == {"pending"}
    assert not list((tmp_path / "ws" / "runs").glob("*/attempt-*"))


# ------------------------------------------------------------------------------------------
# **kwargs: followed up the MRO while an __init__ only hands them on
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template,params,ovr", _cases())
def test_every_template_passes_and_its_head_is_checked(template, params, ovr):
    cfg = render.render_config(template, params, ovr)
    assert registry_check.problems(cfg) == []
    head, _ = registry_check._lookup(cfg.model.bbox_head.type, ("MODELS",))
    allowed = registry_check._closed_kwargs(head)  # RetinaHead -> AnchorHead, FocalSSDHead -> SSDHead
    assert allowed is not None and {"anchor_generator", "init_cfg"} <= allowed


def test_anchor_generator_typo_under_retinanet_is_refused():
    cfg = render.render_config("retinanet_r50_fpn_1x_coco", {}, {"model.bbox_head.anchor_generatr": {"octave_base_scale": 2}})
    with pytest.raises(registry_check.ConfigProblem) as ei:
        registry_check.check(cfg)
    assert ei.value.path == "model.bbox_head.anchor_generatr"
    assert ei.value.what == "RetinaHead has no argument 'anchor_generatr'; did you mean 'anchor_generator'?"


class _Base:
    def __init__(self, depth=1, width=2):
        self.depth, self.width = depth, width


class _HandsOn(_Base):
    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)


class _OldStyle(_Base):
    def __init__(self, *args, scale=1.0, **kw):
        super(_OldStyle, self).__init__(*args, **kw)


class _Explicit(_Base):
    def __init__(self, scale=1.0, **kwargs):
        _Base.__init__(self, **kwargs)


class _Peeks(_Base):
    def __init__(self, scale=1.0, **kwargs):
        if kwargs.get("depth", 0) > 5 or "width" in kwargs and kwargs["width"] < 0:
            raise ValueError("too deep")
        super().__init__(**kwargs)


class _Consumes(_Base):
    def __init__(self, **kwargs):
        super().__init__()
        self.extra = kwargs.get("extra")


class _PopsThenHandsOn(_Base):
    def __init__(self, **kwargs):
        self.legacy = kwargs.pop("legacy", None)
        super().__init__(**kwargs)


class _HandsElsewhere(_Base):
    def __init__(self, **kwargs):
        super().__init__()
        self.inner = dict(**kwargs)


class _ReturnsEarly(_Base):
    def __init__(self, **kwargs):
        if kwargs.get("lazy"):
            return
        super().__init__(**kwargs)


class _Mixin:
    def __init__(self, mix=0, **kwargs):
        super().__init__(**kwargs)


class _Mixed(_Mixin, _HandsOn):
    pass


class _OpenAllTheWay:
    def __init__(self, **kwargs):
        super().__init__(**kwargs)


def _module():
    from mmengine.model import BaseModule

    class Module(BaseModule):
        def __init__(self, channels=8, **kwargs):
            super().__init__(**kwargs)

    return Module


@pytest.mark.parametrize("cls,allowed", [
    (_Base, {"depth", "width"}),
    (_HandsOn, {"scale", "depth", "width"}),
    (_OldStyle, {"scale", "depth", "width"}),
    (_Explicit, {"scale", "depth", "width"}),
    (_Peeks, {"scale", "depth", "width"}),
    (_Mixed, {"mix", "scale", "depth", "width"}),
    (_module, {"channels", "init_cfg"}),  # mmengine's BaseModule closes the set with init_cfg
    (_Consumes, None),  # reads kwargs itself: whatever it takes is not known
    (_PopsThenHandsOn, None),
    (_HandsElsewhere, None),
    (_ReturnsEarly, None),
    (_OpenAllTheWay, None),  # **kwargs all the way to object
])
def test_kwargs_followed_only_while_handed_on(cls, allowed):
    if cls is _module:
        cls = _module()
    got = registry_check._closed_kwargs(cls)
    assert got == (None if allowed is None else frozenset(allowed))


def test_a_class_that_consumes_its_kwargs_is_not_refused(monkeypatch):
    from mmdet.registry import MODELS

    registry_check._registries()
    for cls in (_Consumes, _HandsOn):  # registered for this test only
        monkeypatch.setitem(MODELS._module_dict, f"KwargsCheck{cls.__name__}", cls)
    ok = {"model": {"type": "KwargsCheck_Consumes", "extra": 1, "depth": 3}}
    assert registry_check.problems(ok) == []
    bad = {"model": {"type": "KwargsCheck_HandsOn", "scale": 2.0, "dpeth": 3}}
    assert registry_check.problems(bad) == [("model.dpeth", "_HandsOn has no argument 'dpeth'; did you mean 'depth'?")]
