"""ssflctl.workdir.runref: what a RUN argument names (used by `logs` and `show`)."""
import json

import pytest

from ssflctl.workdir import runref
from ssflctl.errors import UserError

pytestmark = pytest.mark.unit


def _run(ws, run_id, name):
    d = ws / "runs" / run_id
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"run_id": run_id, "name": name}))
    return d


@pytest.fixture
def ws(tmp_path):
    _run(tmp_path, "focal-coco-s0-aaaa1111", "focal-coco-s0")
    _run(tmp_path, "focal-coco-s1-aaaa2222", "focal-coco-s1")
    _run(tmp_path, "ssfl-coco-s0-bbbb1111", "ssfl-coco-s0")
    _run(tmp_path, "ssfl-coco-s0-cccc2222", "ssfl-coco-s0")      # the same name in another experiment
    (tmp_path / "runs" / "stray").mkdir()                          # not a run dir: ignored
    return tmp_path


def test_exact_id_name_and_unique_prefix(ws):
    assert runref.resolve(ws, "focal-coco-s1-aaaa2222", "logs").name == "focal-coco-s1-aaaa2222"
    assert runref.resolve(ws, "focal-coco-s0", "logs").name == "focal-coco-s0-aaaa1111"   # a name
    assert runref.resolve(ws, "focal-coco-s1", "logs").name == "focal-coco-s1-aaaa2222"
    assert runref.resolve(ws, "ssfl-coco-s0-c", "show").name == "ssfl-coco-s0-cccc2222"   # an id prefix


def test_ambiguous_and_missing_are_one_line_errors(ws):
    with pytest.raises(UserError) as err:
        runref.resolve(ws, "ssfl-coco-s0", "show")   # one name, two runs
    msg = str(err.value)
    assert msg.startswith("show: 'ssfl-coco-s0' matches 2 runs") and "ssfl-coco-s0-bbbb1111" in msg
    assert "\n" not in msg
    with pytest.raises(UserError) as err:
        runref.resolve(ws, "focal-", "logs")         # a prefix of two ids
    assert "matches 2 runs" in str(err.value) and "longer prefix" in str(err.value)
    with pytest.raises(UserError) as err:
        runref.resolve(ws, "nope", "logs")
    assert str(err.value).startswith("logs: no run matching 'nope'") and "ssflctl status" in str(err.value)
    with pytest.raises(UserError):
        runref.resolve(ws / "elsewhere", "focal-coco-s0", "logs")  # no runs dir at all
