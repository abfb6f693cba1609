"""Experiment files: validation with file:line errors, matrix expansion, stable run ids, dry run."""
import json
import re
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from ssflctl.plan import spec
from ssflctl.errors import UserError

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
resources:
  cpus: 1
  mem: 2G
  time: "00:20:00"
executor:
  type: local
  local:
    max_parallel: 2
retry:
  on_nan: lower_lr
  factor: 0.1
  max_attempts: 2
test: true
"""


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data" / "synth"
    root.mkdir(parents=True)
    return root


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_expand_ids_are_stable_and_readable(tmp_path, data_root):
    p = write(tmp_path, BASE.format(root=data_root))
    runs = spec.expand(spec.load(p))
    assert len(runs) == 4
    names = sorted(r.name for r in runs)
    assert names == ["focal-synth-s1", "focal-synth-s2", "ssfl-synth-s1", "ssfl-synth-s2"]
    for r in runs:
        assert re.fullmatch(rf"{re.escape(r.name)}-[0-9a-f]{{8}}", r.run_id)
        assert r.params["data_root"].startswith(str(data_root))
        assert r.params["max_epochs"] == 1 and r.params["lr"] == 0.01
        assert r.resources == {"gpus": 0, "cpus": 1, "mem_gb": 2.0, "time_min": 20}
        assert r.retry["max_attempts"] == 2 and r.test is True
    again = spec.expand(spec.load(p))
    assert [r.run_id for r in again] == [r.run_id for r in runs]
    # a changed setting changes the id; a changed resource does not
    p2 = write(tmp_path, BASE.format(root=data_root).replace("max_epochs: 1", "max_epochs: 2"), "b.yaml")
    assert not {r.run_id for r in spec.expand(spec.load(p2))} & {r.run_id for r in runs}
    p3 = write(tmp_path, BASE.format(root=data_root).replace("cpus: 1", "cpus: 2"), "c.yaml")
    assert {r.run_id for r in spec.expand(spec.load(p3))} == {r.run_id for r in runs}


def test_include_exclude_dotted_axes(tmp_path, data_root):
    text = BASE.format(root=data_root).replace(
        "  lr: [0.01]\n",
        "  lr: [0.01, 0.001]\n  model.bbox_head.loss_cls.gamma: [2.0]\n"
        "  exclude:\n    - {loss: ssfl, lr: 0.01}\n"
        "  include:\n    - {loss: gfl, seed: 1}\n")
    runs = spec.expand(spec.load(write(tmp_path, text)))
    cells = sorted((r.axes["loss"], r.axes["seed"], r.axes["lr"]) for r in runs)
    assert cells == sorted([("focal", 1, 0.01), ("focal", 2, 0.01), ("focal", 1, 0.001), ("focal", 2, 0.001),
                            ("ssfl", 1, 0.001), ("ssfl", 2, 0.001), ("gfl", 1, 0.01), ("gfl", 1, 0.001)])
    r = next(r for r in runs if r.axes["loss"] == "ssfl")
    assert r.overrides == {"model.bbox_head.loss_cls.gamma": 2.0}
    assert "lr0.001" in r.name and "gamma" not in r.name  # single-valued axes stay out of the name


def test_per_dataset_templates_and_resources():
    exp = spec.load(REPO / "experiments" / "ssfl_vs_fl.yaml")
    runs = spec.expand(exp, dry_run=True)
    assert len(runs) == 4
    by = {(r.axes["loss"], r.axes["dataset"]): r for r in runs}
    assert set(by) == {("focal", "coco"), ("ssfl", "coco"), ("focal", "cityscapes"), ("ssfl", "cityscapes")}
    assert by["ssfl", "cityscapes"].template.endswith("retinanet_r50_fpn_1x_cityscapes.py")
    assert by["focal", "coco"].template.endswith("retinanet_r50_fpn_1x_coco.py")
    for r in runs:
        assert r.params["seed"] == 3407 and r.params["lr"] == 0.01
        assert r.resources["gpus"] == 1 and r.resources["cpus"] == 6
    assert by["ssfl", "cityscapes"].resources["time_min"] < by["ssfl", "coco"].resources["time_min"]
    assert exp.executor["slurm"] == {"partition": "gpulab02", "qos": "gpulab02"}
    assert by["ssfl", "cityscapes"].name == "ssfl-cityscapes-s3407"


def test_missing_dataset_is_a_warning_under_dry_run(tmp_path):
    p = write(tmp_path, BASE.format(root=tmp_path / "nowhere"))
    exp = spec.load(p)
    runs = spec.expand(exp, dry_run=True)
    assert len(runs) == 4 and len(exp.warnings) == 1 and "nowhere" in exp.warnings[0]
    with pytest.raises(UserError, match=r"exp.yaml:5: datasets.synth.root: directory .* does not exist"):
        spec.expand(spec.load(p))


def test_dry_run_cli_prints_the_four_runs_with_slurm_resources(tmp_path):
    proc = run_cli("submit", REPO / "experiments" / "ssfl_vs_fl.yaml", "--dry-run", "--workspace", tmp_path / "ws",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [ln.split("\t") for ln in proc.stdout.splitlines() if ln.count("\t") > 3]
    header, rows = lines[0], lines[1:]
    assert header[:5] == ["run", "loss", "dataset", "seed", "lr"]
    assert len(rows) == 4
    for row in rows:
        rec = dict(zip(header, row))
        assert rec["resources"] == "1 GPU, 6 CPU, 32G, " + ("1-12:00:00" if rec["dataset"] == "cityscapes" else "4-00:00:00")
        assert rec["executor"] == "slurm partition=gpulab02 qos=gpulab02"
        assert rec["action"] == "submit" and rec["seed"] == "3407" and rec["lr"] == "0.01"
    assert {(dict(zip(header, r))["loss"], dict(zip(header, r))["dataset"]) for r in rows} == {
        ("focal", "coco"), ("ssfl", "coco"), ("focal", "cityscapes"), ("ssfl", "cityscapes")}
    assert "warning:" in proc.stderr and "does not exist" in proc.stderr  # no data here: warned, not refused
    assert not (tmp_path / "ws" / "registry.sqlite").exists()


# ----------------------------------------------------------------------------------------------
# twenty-odd broken files: one line, file:line, exit 2, no traceback, nothing registered
# ----------------------------------------------------------------------------------------------

def _sub(old, new):
    return lambda t: t.replace(old, new, 1)


BROKEN = {
    "invalid_yaml": (_sub("loss: [focal, ssfl]", "loss: [focal, ssfl"), 8, "invalid YAML"),
    "bad_indent": (_sub("  seed: [1, 2]", "    seed: [1, 2]\n   bogus"), 9, "invalid YAML"),
    "duplicate_key": (_sub("  lr: [0.01]", "  lr: [0.01]\n  lr: [0.1]"), 11, "duplicate key"),
    "empty_file": (lambda t: "# nothing\n", 1, "empty"),
    "top_is_list": (lambda t: "- a\n- b\n", 1, "expected a mapping"),
    "unknown_top_key": (_sub("matrix:", "matrx:"), 6, "did you mean 'matrix'"),
    "misspelt_partition": (_sub("  local:\n    max_parallel: 2", "  slurm:\n    partiton: gpulab02"), 20,
                           "did you mean 'partition'"),
    "gpus_wrong_type": (_sub("  cpus: 1", "  cpus: 1\n  gpus: one"), 15, "resources.gpus: expected a whole number"),
    "cpus_zero": (_sub("  cpus: 1", "  cpus: 0"), 14, "resources.cpus"),
    "mem_bad": (_sub("  mem: 2G", "  mem: lots"), 15, "resources.mem"),
    "time_bad": (_sub('  time: "00:20:00"', "  time: forever"), 16, "resources.time"),
    "empty_axis": (_sub("  seed: [1, 2]", "  seed: []"), 9, "empty axis"),
    "no_axes": (_sub("  loss: [focal, ssfl]\n  dataset: [synth]\n  seed: [1, 2]\n  lr: [0.01]", "  {}"), 6, "matrix"),
    "unknown_template": (_sub("template: retinanet_tiny", "template: retinanet_tinny"), 2, "did you mean 'retinanet_tiny'"),
    "unknown_dataset": (_sub("  dataset: [synth]", "  dataset: [synthh]"), 8, "did you mean 'synth'"),
    "missing_dataset_path": (_sub("root: ", "root: /nonexistent"), 5, "does not exist"),
    "duplicate_value": (_sub("  seed: [1, 2]", "  seed: [1, 1]"), 9, "listed twice"),
    "duplicate_run_via_include": (_sub("  lr: [0.01]", "  lr: [0.01]\n  include:\n    - {loss: focal, seed: 1}"), 12,
                                  "same settings"),
    "negative_lr": (_sub("  lr: [0.01]", "  lr: [-0.1]"), 10, "matrix.lr"),
    "seed_string": (_sub("  seed: [1, 2]", "  seed: [one]"), 9, "matrix.seed"),
    "name_missing": (_sub("name: tiny\n", ""), 1, "name: missing"),
    "name_spaces": (_sub("name: tiny", "name: my tiny study"), 1, "name: expected"),
    "test_not_bool": (_sub("test: true", "test: sometimes"), 25, "test: expected true or false"),
    "retry_factor": (_sub("factor: 0.1", "factor: 2"), 23, "retry.factor"),
    "retry_misspelt": (_sub("max_attempts: 2", "max_attemps: 2"), 24, "did you mean 'max_attempts'"),
    "unknown_param": (_sub("  max_epochs: 1", "  max_epoch: 1"), 12, "did you mean 'max_epochs'"),
    "exclude_not_axis": (_sub("  lr: [0.01]", "  lr: [0.01]\n  exclude:\n    - {los: ssfl}"), 12, "did you mean 'loss'"),
    "exclude_everything": (_sub("  lr: [0.01]", "  lr: [0.01]\n  exclude:\n    - {dataset: synth}"), 6, "no runs"),
    "executor_type": (_sub("  type: local", "  type: slurmm"), 18, "did you mean 'slurm'"),
    "array_parallelism": (_sub("  local:\n    max_parallel: 2", "  slurm:\n    array_parallelism: 0"), 20,
                          "array_parallelism"),
    "max_parallel_type": (_sub("max_parallel: 2", "max_parallel: two"), 20, "max_parallel"),
    "max_num_timeout": (_sub("  local:\n    max_parallel: 2", "  slurm:\n    max_num_timeout: -1"), 20,
                        "executor.slurm.max_num_timeout: expected a whole number >= 0"),
    "signal_delay_s": (_sub("  local:\n    max_parallel: 2", "  slurm:\n    signal_delay_s: soon"), 20,
                       "executor.slurm.signal_delay_s: expected a whole number of seconds"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_one_line_error(case, tmp_path, data_root):
    mutate, line, needle = BROKEN[case]
    p = write(tmp_path, mutate(BASE.format(root=data_root)), f"{case}.yaml")
    ws = tmp_path / "ws"
    proc = run_cli("submit", p, "--workspace", ws, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert len(err.splitlines()) == 1, err
    assert f"{p}:{line}:" in err, err
    assert needle in err, err
    if (ws / "registry.sqlite").exists():
        from ssflctl.registry.store import Registry

        with Registry(ws) as reg:
            assert reg.list_runs() == []
    assert not (ws / "runs").exists()


def test_at_least_twenty_broken_cases():
    assert len(BROKEN) >= 20


def test_yaml_tags_and_anchors_are_plain_data(tmp_path, data_root):
    text = BASE.format(root=data_root).replace("params:\n  max_epochs: 1", "params:\n  max_epochs: 1\n  classes: !!python/object/apply:os.system ['echo hi']")
    with pytest.raises(UserError, match=r"exp.yaml:13: invalid YAML"):
        spec.load(write(tmp_path, text))


def test_time_and_mem_parsing():
    assert spec.parse_time("1-02:00:00") == 26 * 60
    assert spec.parse_time("24:00:00") == 1440
    assert spec.parse_time("90m") == 90 and spec.parse_time("2h") == 120 and spec.parse_time(30) == 30
    assert spec.parse_time("0:00:00") is None and spec.parse_time(True) is None
    assert spec.parse_mem("32G") == 32 and spec.parse_mem("512M") == 0.5 and spec.parse_mem("1T") == 1024
    assert spec.parse_mem("x") is None and spec.parse_mem(0) is None


def test_executor_choice(tmp_path, data_root, monkeypatch):
    from ssflctl.control import submit

    text = BASE.format(root=data_root).replace("  type: local\n", "  type: auto\n")
    exp = spec.load(write(tmp_path, text))
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here: auto means local
    assert spec.executor_kind(exp) == "local"
    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    sinfo = tmp_path / "sinfo"
    sinfo.write_text("#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm controller' >&2\nexit 1\n")
    sinfo.chmod(0o755)
    assert spec.executor_kind(exp) == "local"  # the client is installed but no controller answers
    sinfo.write_text("#!/bin/sh\necho gpulab02\n")
    assert spec.executor_kind(exp) == "slurm"
    assert spec.executor_kind(exp, "local") == "local"  # --executor wins
    res = submit.submit(REPO / "experiments" / "ssfl_vs_fl.yaml", tmp_path / "ws", dry_run=True, executor="local")
    assert res.kind == "local" and len(res.submitted) == 4
    with pytest.raises(UserError, match="--executor: expected slurm, local or auto"):
        spec.executor_kind(exp, "pbs")
