"""A rendered config is data only: keys that would run as code on the node are refused at render time
(issue 20.1). The parser never executes the file."""
import pytest

from ssflctl.errors import UserError
from ssflctl.plan.config_check import check_rendered, parse_config_text

pytestmark = pytest.mark.unit

EVIL_KEY = "x': __import__('os').system('touch pwned'), 'y"


def test_plain_dumped_config_parses_to_its_data(tmp_path):
    text = ("model = dict(type='RetinaNet', bbox_head=dict(num_classes=8, loss_cls=dict(gamma=2.0, alpha=0.25)))\n"
            "img_scale = (1333, 800)\nlr = -0.5\nextra = {'0': 1, 'a-b': [True, None]}\n")
    assert parse_config_text(text) == {"model": {"type": "RetinaNet", "bbox_head": {"num_classes": 8, "loss_cls": {
        "gamma": 2.0, "alpha": 0.25}}}, "img_scale": (1333, 800), "lr": -0.5, "extra": {"0": 1, "a-b": [True, None]}}


def test_a_key_that_breaks_out_of_its_quotes_is_refused_and_never_runs(tmp_path):
    # what mmengine 0.10.7's Config.dump writes for that key: '{k}' without escaping
    text = f"overrides = {{'{EVIL_KEY}': 1}}\n"
    path = tmp_path / "config.py"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        check_rendered(path, {"overrides": {EVIL_KEY: 1}})
    assert "code, not data" in str(err.value) and len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "pwned").exists() and not __import__("os").path.exists("pwned")


def test_a_written_file_that_differs_from_what_was_meant_is_refused(tmp_path):
    path = tmp_path / "config.py"
    path.write_text("a = dict(b=1, c=2)\n")
    with pytest.raises(UserError, match=r"a\.c appears in the written file only"):
        check_rendered(path, {"a": {"b": 1}})
    check_rendered(path, {"a": {"b": 1, "c": 2}})  # equal: accepted


@pytest.mark.training
def test_render_refuses_an_injected_key_before_the_config_exists(tmp_path):
    """Through the real renderer and mmengine's real Config.dump: the attempt gets no config.py."""
    pytest.importorskip("mmengine")
    import json

    from ssflctl.plan import render

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "car"}]}))
    run = {"run_id": "r", "template": "retinanet_tiny", "test": True,
           "params": {"loss": "focal", "lr": 0.01, "seed": 0, "data_root": str(tmp_path), "max_epochs": 1},
           "overrides": {"model.bbox_head.loss_cls": {"type": "FocalLoss", EVIL_KEY: 1}}}
    (run_dir / "run.json").write_text(json.dumps(run))
    with pytest.raises(UserError):
        render.render_attempt(run_dir, 1, run=run)
    assert not (run_dir / "attempt-1" / "config.py").exists()
    assert not (tmp_path / "pwned").exists()


def test_sbatch_values_cannot_add_script_lines():
    from ssflctl.backends.slurm import check_options

    check_options({"partition": "gpulab02", "qos": "gpulab02", "constraint": "a100&ib", "sbatch": {"exclusive": True},
                   "setup": ["module load cuda/12.1"]}, "train-exp-20260101-000000-abcdef-0")
    for bad in ({"partition": "gpu\n#SBATCH --uid=0"}, {"sbatch": {"comment": "x\ntouch pwned"}},
                {"setup": ["echo a\necho b"]}, {"qos": "a b"}):
        with pytest.raises(UserError) as err:
            check_options(bad, "train-x")
        assert len(str(err.value).splitlines()) == 1
