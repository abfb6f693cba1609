"""`quickstart.resolved_spec` (unit): the copy it writes for `submit` means what the experiment file
means. It reads the file as `submit` does (ssflctl.plan.yamlio: YAML 1.2 numbers), so a value that
YAML 1.1 reads otherwise (`24:00:00` a number of seconds, `010` octal) is not changed on the way."""
from __future__ import annotations

from pathlib import Path

import pytest

from ssflctl.commands import quickstart
from ssflctl.plan import spec

pytestmark = pytest.mark.unit


def test_the_resolved_spec_keeps_the_values_of_yaml_1_2(tmp_path):
    text = quickstart.SPEC.read_text(encoding="utf-8")
    for old, new in (('time: "00:30:00"', "time: 24:00:00"),     # unquoted: a string in YAML 1.2
                     ("lr: [0.01]", "lr: [1e-4, 5e-3]"),          # floats in YAML 1.2, strings in 1.1
                     ("log_interval: 10", "log_interval: 010")):  # 10 in YAML 1.2, 8 in 1.1
        assert old in text
        text = text.replace(old, new)
    src = tmp_path / "exp.yaml"
    src.write_text(text, encoding="utf-8")

    out = quickstart.resolved_spec(tmp_path / "ws", src, {"max_epochs": 2})
    ours, theirs = spec.load(out), spec.load(src)
    assert ours.resources == theirs.resources and ours.resources["time_min"] == 24 * 60
    assert ours.axes == theirs.axes and [0.0001, 0.005] in ours.axes.values()
    assert ours.params == dict(theirs.params, max_epochs=2) and ours.params["log_interval"] == 10
    assert Path(ours.datasets["cityscapes"].root).is_absolute()
