"""Experiment files mean what researchers write, and bad ones stop at plan time (issues 13.4, 15.1, 20.2-20.5).

YAML 1.2 numbers, merge keys, the pydantic schema's file:line errors, values checked before anything
is written, and the limits that keep a hostile or mistaken file from hanging the login node.
"""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from ssflctl.errors import UserError
from ssflctl.plan import schema, spec, yamlio

pytestmark = pytest.mark.unit

BASE = """\
name: tiny
template: retinanet_tiny
datasets:
  synth:
    root: {root}
matrix:
  loss: [focal, ssfl]
  dataset: [synth]
  seed: [1, 2]
  lr: [0.01]
params:
  max_epochs: 1
overrides:
  train_cfg.val_interval: 1
executor:
  type: local
test: true
"""


@pytest.fixture
def base(tmp_path):
    root = tmp_path / "data" / "synth"
    root.mkdir(parents=True)
    return BASE.format(root=root)


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def plan(path):
    return spec.expand(spec.load(path))


# ----------------------------------------------------------------------------------------------
# YAML 1.2 numbers (issue 15.1)
# ----------------------------------------------------------------------------------------------

def test_yaml_12_numbers_as_the_user_means_them():
    d = yamlio.parse("a: [1e-3, 5E-4, .5, 1_000, +1e3, -2.5e+2, 1., 010, 0o17, 0x1F, .inf, -.Inf, .NaN]\n"
                     "b: [24:00:00, 1:30, 0b11, 1_, '1e-3', \"2\", 1e3x, yes, null]\n", "t.yaml")
    a, b = d["a"], d["b"]
    assert a[:7] == [0.001, 0.0005, 0.5, 1000, 1000.0, -250.0, 1.0]
    assert [type(x) for x in a[:7]] == [float, float, float, int, float, float, float]
    assert a[7:10] == [10, 15, 31] and all(type(x) is int for x in a[7:10])  # 010 is ten in YAML 1.2
    assert a[10] == float("inf") and a[11] == float("-inf") and a[12] != a[12]
    assert b[:7] == ["24:00:00", "1:30", "0b11", "1_", "1e-3", "2", "1e3x"]  # not YAML 1.2 numbers, or quoted
    assert b[7] is True and b[8] is None


def test_scientific_lrs_and_weight_decay_are_numbers(tmp_path, base):
    text = base.replace("  lr: [0.01]", "  lr: [1e-2, 1e-3]").replace(
        "  train_cfg.val_interval: 1", "  optim_wrapper.optimizer.weight_decay: 5e-4")
    runs = plan(write(tmp_path, text))
    assert sorted({r.params["lr"] for r in runs}) == [0.001, 0.01]
    assert all(r.overrides["optim_wrapper.optimizer.weight_decay"] == 0.0005 for r in runs)
    assert {r.name.split("-")[-1] for r in runs} == {"lr0.01", "lr0.001"}


def test_quoted_number_where_the_template_has_a_number_is_refused(tmp_path, base):
    text = base.replace("  train_cfg.val_interval: 1", "  optim_wrapper.optimizer.weight_decay: '5e-4'")
    p = write(tmp_path, text)
    with pytest.raises(UserError) as ei:
        plan(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:14: overrides.optim_wrapper.optimizer.weight_decay: expected a number"), msg
    assert "0.0001" in msg and "unquoted (5e-4)" in msg
    # a string where the template holds a string stays a string
    ok = base.replace("  train_cfg.val_interval: 1", "  model.bbox_head.loss_cls.type: 'FocalLoss'")
    assert plan(write(tmp_path, ok, "ok.yaml"))


# ----------------------------------------------------------------------------------------------
# values knowable from the file fail at plan time (issue 20.2, 20.3)
# ----------------------------------------------------------------------------------------------

def _sub(old, new):
    return lambda t: t.replace(old, new, 1)


PLAN_TIME = {
    "seed_2_32": (_sub("seed: [1, 2]", "seed: [1, 4294967296]"), 9, "matrix.seed[1]: expected whole numbers from 0"),
    "seed_param": (_sub("  max_epochs: 1", "  seed: 4294967296"), 12, "params.seed: expected a whole number from 0 to 4294967295"),
    "loss_kwarg_axis": (_sub("loss: [focal, ssfl]", "loss: [focal, {type: FocalLoss, gama: 1.5}]"), 7,
                        "'gama' is not an argument of FocalLoss; did you mean 'gamma'?"),
    "loss_kwarg_override": (_sub("  train_cfg.val_interval: 1", "  model.bbox_head.loss_cls.gama: 1.5"), 14,
                            "overrides.model.bbox_head.loss_cls.gama: 'gama' is not an argument"),
    "loss_kwarg_nested": (_sub("  train_cfg.val_interval: 1", "  model: {bbox_head: {loss_cls: {gama: 1.5}}}"), 14,
                          "did you mean 'gamma'?"),
    "batch_size_0": (_sub("  max_epochs: 1", "  batch_size: 0"), 12, "params.batch_size: expected a whole number >= 1"),
    "max_epochs_0": (_sub("  max_epochs: 1", "  max_epochs: 0"), 12, "params.max_epochs: expected a whole number >= 1"),
    "max_epochs_two": (_sub("  max_epochs: 1", '  max_epochs: "two"'), 12, "got a string ('two')"),
    "max_epochs_axis": (_sub("  lr: [0.01]", "  lr: [0.01]\n  max_epochs: [1, two]"), 11, "matrix.max_epochs[1]"),
    "lr_inf": (_sub("lr: [0.01]", "lr: [.inf]"), 10, "matrix.lr[0]: expected positive finite numbers"),
    "lr_inf_param": (_sub("  max_epochs: 1", "  lr: .inf"), 12, "params.lr: expected a positive finite number"),
    "loss_unknown": (_sub("loss: [focal, ssfl]", "loss: [focal, fcal]"), 7, "unknown loss 'fcal'; did you mean 'focal'?"),
    "include_unknown_loss": (_sub("  lr: [0.01]", "  lr: [0.01]\n  include:\n    - {loss: fcal}"), 12,
                             "matrix.include[0].loss: unknown loss 'fcal'; did you mean 'focal'?"),
    "exclude_value_not_on_axis": (_sub("  lr: [0.01]", "  lr: [0.01]\n  exclude:\n    - {loss: fcal}"), 12,
                                  "matrix.exclude[0].loss: 'fcal' is not a value of the axis; it has: 'focal', 'ssfl'"),
    "exclude_seed_not_on_axis": (_sub("  lr: [0.01]", "  lr: [0.01]\n  exclude:\n    - {loss: ssfl, seed: 3}"), 12,
                                 "it has: 1, 2"),
    "name_trailing_newline": (_sub("name: tiny", 'name: "tiny\\n"'), 1, "name: expected a name"),
    "dataset_name_newline": (_sub("  synth:\n", '  "synth\\n":\n'), 4, "expected a dataset name"),
    "retry_factor": (_sub("test: true", "retry:\n  factor: 2\ntest: true"), 18, "retry.factor: 2 must be a number between 0 and 1"),
    "retry_misspelt": (_sub("test: true", "retry:\n  max_attemps: 2\ntest: true"), 18, "did you mean 'max_attempts'"),
    "too_many_runs": (_sub("seed: [1, 2]", "seed: [" + ", ".join(map(str, range(6000))) + "]"), 6,
                      "matrix: 12000 runs (the product of the axes' lengths, plus include rules), more than the 10000"),
}


@pytest.mark.parametrize("case", sorted(PLAN_TIME))
def test_plan_time_errors(case, tmp_path, base):
    mutate, line, needle = PLAN_TIME[case]
    p = write(tmp_path, mutate(base), f"{case}.yaml")
    with pytest.raises(UserError) as ei:
        plan(p)
    msg = str(ei.value)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith(f"{p}:{line}: "), msg
    assert needle in msg, msg


@pytest.mark.parametrize("case", ["seed_2_32", "loss_kwarg_override", "exclude_value_not_on_axis", "lr_inf_param"])
def test_refused_file_writes_nothing(case, tmp_path, base):
    """The CLI in-process: exit 2, one line, no registry row and no run directory."""
    from typer.testing import CliRunner

    from ssflctl.cli import app

    mutate, line, needle = PLAN_TIME[case]
    p = write(tmp_path, mutate(base), f"{case}.yaml")
    ws = tmp_path / "ws"
    res = CliRunner().invoke(app, ["submit", str(p), "--workspace", str(ws)])
    assert res.exit_code == 2, res.output
    assert f"{p}:{line}:" in res.output and needle in res.output and "Traceback" not in res.output
    assert not (ws / "runs").exists()
    if (ws / "registry.sqlite").exists():
        from ssflctl.registry.store import Registry

        with Registry(ws) as reg:
            assert reg.list_runs() == []


# ----------------------------------------------------------------------------------------------
# merge keys and duplicates (issue 20.5)
# ----------------------------------------------------------------------------------------------

def test_merge_keys_explicit_key_wins(tmp_path, base):
    text = base.replace("datasets:\n  synth:\n",
                        "datasets:\n  synth:\n    params: &defaults {max_epochs: 3, batch_size: 2}\n").replace(
        "params:\n  max_epochs: 1\n", "params:\n  <<: *defaults\n  max_epochs: 1\n")
    exp = spec.load(write(tmp_path, text))
    assert exp.params == {"batch_size": 2, "max_epochs": 1}
    assert exp.lines["params.max_epochs"] == 14 and exp.lines["params.batch_size"] == 5
    d = yamlio.parse("a: &a {x: 1, y: 1}\nb: &b {x: 2, z: 2}\nc: {<<: [*a, *b], z: 3}\n", "t.yaml")
    assert d["c"] == {"x": 1, "y": 1, "z": 3}  # the earlier merged mapping wins; an explicit key wins over both
    with pytest.raises(UserError, match=r"^t.yaml:4: x: duplicate key \(first on line 3\); keep one$"):
        yamlio.parse("c:\n  <<: {x: 0}\n  x: 1\n  x: 2\n", "t.yaml")  # two explicit keys are still a mistake


# ----------------------------------------------------------------------------------------------
# limits (issue 20.4): one line, well under a second each
# ----------------------------------------------------------------------------------------------

def _refused_fast(path, needle):
    t0 = time.monotonic()
    with pytest.raises(UserError) as ei:
        plan(path)
    took = time.monotonic() - t0
    msg = str(ei.value)
    assert len(msg.splitlines()) == 1 and needle in msg, msg
    assert took < 1.0, f"{took:.2f} s"
    return msg


def test_huge_file_is_refused_unread(tmp_path):
    p = tmp_path / "instances_train.json"
    with open(p, "wb") as fh:  # 100 MB, sparse: the check must not read it
        fh.truncate(100 * 1024 * 1024)
    msg = _refused_fast(p, "more than the 1000000 an experiment file may have")
    assert msg.startswith(f"{p}: 104857600 bytes")


def test_alias_bomb(tmp_path, base):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = "\n".join("  " + ln for ln in lines)
    text = base.replace("params:\n", "params:\n  classes:\n" + textwrap.indent(bomb, "  ") + "\n", 1)
    p = write(tmp_path, text)
    assert p.stat().st_size < 1000
    _refused_fast(p, "expands to more than 100000 values")


def test_product_of_a_million_runs(tmp_path, base):
    text = base.replace("  seed: [1, 2]", "  seed: [" + ",".join(map(str, range(1000))) + "]").replace(
        "  lr: [0.01]", "  lr: [" + ",".join(f"0.{i + 1:04d}" for i in range(500)) + "]")
    msg = _refused_fast(write(tmp_path, text), "1000000 runs")
    assert "more than the 10000" in msg and ":6: matrix:" in msg


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deep_nesting(tmp_path, base, depth):
    p = write(tmp_path, base.replace("  max_epochs: 1", "  classes: " + "[" * depth + "]" * depth))
    _refused_fast(p, "nest")


def test_nul_byte_and_non_utf8(tmp_path, base):
    p = tmp_path / "nul.yaml"
    p.write_bytes(base.replace("name: tiny", "name: ti\x00ny").encode())
    assert _refused_fast(p, "is not allowed in YAML").startswith(f"{p}:1: the character '\\x00'")
    p = tmp_path / "latin1.yaml"
    p.write_bytes(base.encode().replace(b"max_epochs: 1", b"max_epochs: 1 # r\xe9sum\xe9"))
    assert _refused_fast(p, "not UTF-8").startswith(f"{p}:12: ")


def test_not_a_file(tmp_path):
    with pytest.raises(UserError, match="not a file"):
        spec.load(tmp_path)


# ----------------------------------------------------------------------------------------------
# contracts: run ids, RetryPolicy, imports, the loss allow-list
# ----------------------------------------------------------------------------------------------

#: computed with the hand-validating spec.py (commit 3dcd44c) before the schema rewrite
PINNED = {
    "quickstart.yaml": ["focal-cityscapes-s42-1fbe4e54", "focal-cityscapes-s0-81b52173",
                        "ssfl-cityscapes-s42-84145857", "ssfl-cityscapes-s0-815e5b35"],
    "ssfl_vs_fl.yaml": ["focal-coco-s3407-af163186", "focal-cityscapes-s3407-5c9c2ec2",
                        "ssfl-coco-s3407-f8729472", "ssfl-cityscapes-s3407-8e1f53e7"],
    "ssd_voc_focal.yaml": ["focal-voc-s0-gamma1-f0f2da7a", "focal-voc-s0-gamma2-d92ab923"],
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_run_ids_do_not_change(name):
    runs = spec.expand(spec.load(REPO / "experiments" / name), check_paths=False)
    assert [r.run_id for r in runs] == PINNED[name]


def test_retry_policy_is_one_model():
    from ssflctl.node import retry
    from ssflctl.workdir.retry_policy import RetryPolicy

    assert retry.RetryPolicy is RetryPolicy
    exp = spec.load(REPO / "experiments" / "quickstart.yaml")
    assert RetryPolicy.from_dict(exp.retry).to_dict() == exp.retry
    with pytest.raises(UserError, match=r"^run.json: retry.factor: 2 must be a number between 0 and 1"):
        RetryPolicy.from_dict({"factor": 2}, where="run.json: retry")


def test_plan_imports_neither_render_nor_the_node():
    code = ("import sys, ssflctl.plan.spec; "
            "bad = [m for m in sys.modules if m.startswith(('ssflctl.node', 'ssflctl.plan.render', 'torch', "
            "'mmengine', 'mmdet'))]; print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.training
def test_loss_kwargs_match_the_classes():
    import inspect

    from mmdet.models.losses import FocalLoss

    from ssflctl.extensions import losses
    from ssflctl.plan.losses import LOSS_KWARGS

    classes = {"FocalLoss": FocalLoss, "FocalFamilyLoss": losses.FocalFamilyLoss,
               "ShiftStepFocalLoss": losses.ShiftStepFocalLoss,
               "GeneralizedFocalLossStar": losses.GeneralizedFocalLossStar}
    for name, cls in classes.items():
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert LOSS_KWARGS[name] == params, name


def test_schema_line_of_walks_the_raw_data():
    raw = yamlio.parse("a:\n  b:\n    - 1\n    - c: 2\n", "t.yaml")
    assert schema.line_of(raw, ("a", "b", 1, "c")) == 4
    assert schema.line_of(raw, ("a", "zz")) == 1 and schema.line_of(raw, ("a", "b", 7)) == 2


def test_c_and_python_loaders_agree(tmp_path):
    """libyaml's parser (used where PyYAML has it) and the pure-Python one give the same data and lines."""
    text = (REPO / "experiments" / "ssfl_vs_fl.yaml").read_text() + "x: &a {k: [1e-3, .5, 1_000]}\ny: {<<: *a}\n"
    c, py = yamlio.parse(text, "t.yaml"), yamlio.parse(text, "t.yaml", yamlio.PyLoader)
    assert c == py and c["y"] == {"k": [0.001, 0.5, 1000]}

    def lines(d, out):
        if isinstance(d, dict):
            out.append(sorted(d.lines.items()))
            [lines(v, out) for v in d.values()]
        return out
    assert lines(c, []) == lines(py, [])
    # (a syntax error's mark may differ by a line: libyaml reports where it gave up)
    for bad in ("a: 1\na: 2\n", "[" * 100 + "]" * 100, "a: *nope\n", "a: &x 1\nb: &x 2\n"):
        msgs = []
        for cls in (None, yamlio.PyLoader):
            with pytest.raises(UserError) as ei:
                yamlio.parse(bad, "t.yaml", cls)
            msgs.append(str(ei.value).split(": ")[0])
        assert msgs[0] == msgs[1], (bad, msgs)  # same file:line
