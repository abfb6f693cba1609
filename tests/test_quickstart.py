"""`ssflctl quickstart` end to end, smaller: generate, convert, submit (local), wait, report; twice.

The same code path as the command (``quickstart.run``), with a smaller dataset and fewer epochs
(``data=`` / ``params=``): SSFL* at lr 0.01 still goes NaN within a few iterations and is retrained
at a lower lr (x0.1 per NaN) by the job's retry loop, so the report shows the attempts.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest

from ssflctl.commands import quickstart
from ssflctl.errors import UserError

pytestmark = [pytest.mark.training, pytest.mark.slow]

SMALL_DATA = {"n_train": 24, "n_val": 6, "n_test": 2}          # 512x256 as the real quickstart
SMALL_PARAMS = {"max_epochs": 2, "log_interval": 1, "ckpt_interval": 2}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
COCO12 = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _consoles():
    from rich.console import Console

    out, err = io.StringIO(), io.StringIO()
    return (out, err, Console(file=out, width=200, force_terminal=False),
            Console(file=err, width=200, force_terminal=False))


def _go(ws):
    out, err, c_out, c_err = _consoles()
    saved = {v: os.environ.get(v) for v in THREAD_VARS}  # run() sets them for the jobs it launches
    try:
        res = quickstart.run(ws, data=SMALL_DATA, params=SMALL_PARAMS, executor="local", interval=0.5,
                             console=c_out, err=c_err)
    finally:
        for var, val in saved.items():
            if val is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = val
    return res, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    ws = tmp_path_factory.mktemp("quickstart") / "ws"
    res, out, err = _go(ws)
    return {"ws": ws, "res": res, "out": out, "err": err}


@pytest.fixture(scope="module")
def second(first):
    res, out, err = _go(first["ws"])
    return {"res": res, "out": out, "err": err}


def _run_dirs(ws: Path):
    return sorted(p for p in (ws / "runs").iterdir() if (p / "run.json").is_file())


def _attempts(run_dir: Path):
    out = []
    for a in sorted(run_dir.glob("attempt-*"), key=lambda p: int(p.name.split("-")[1])):
        meta = json.loads((a / "attempt.json").read_text())
        outcome = json.loads((a / "outcome.json").read_text()) if (a / "outcome.json").is_file() else {}
        out.append({"n": int(a.name.split("-")[1]), "lr": meta["lr"], "outcome": outcome.get("outcome"),
                    "metrics": json.loads((a / "metrics.json").read_text()) if (a / "metrics.json").is_file() else None})
    return out


def test_every_run_trained_and_tested_with_its_12_numbers(first):
    res, ws = first["res"], first["ws"]
    assert res.generated and res.converted == ["train", "val", "test"]
    assert (ws / "data" / "cityscapes" / "annotations" / "instancesonly_filtered_gtFine_val.json").is_file()
    assert len(res.submit.submitted) == 4 and res.submit.kind == "local"
    assert res.done, [(i["run"], i["state"], i["note"]) for i in res.items]
    runs = _run_dirs(ws)
    assert len(runs) == 4
    for rd in runs:
        final = [a for a in _attempts(rd) if a["outcome"] == "done"]
        assert len(final) == 1, rd.name
        bbox = final[0]["metrics"]["bbox"]
        assert set(bbox) == set(COCO12)
        # small, medium and large objects are all in the 512x256 val images: no -1/null
        assert all(isinstance(bbox[k], float) and 0.0 <= bbox[k] <= 1.0 for k in COCO12), bbox
    # the report's main table: a row per loss, 12 numbers each (mean ± std over the 2 seeds), n = 2
    text = res.report_text
    for loss in ("focal", "ssfl"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {loss} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        numbers = [c for c in cells[1:] if re.fullmatch(r"(\*\*)?-?\d+\.\d ± \d+\.\d(\*\*)?", c)]
        assert len(numbers) == 12, row
        assert cells[-1].rstrip("†") == "2", row
    assert "Runs without results" not in text


def test_focal_trains_at_lr_001_and_ssfl_is_retried_at_lr_0001(first):
    ws = first["ws"]
    for rd in _run_dirs(ws):
        run = json.loads((rd / "run.json").read_text())
        atts = _attempts(rd)
        assert atts[0]["lr"] == pytest.approx(0.01)
        if run["axes"]["loss"] == "focal":
            assert [(a["outcome"], a["lr"]) for a in atts] == [("done", pytest.approx(0.01))]
        else:
            # NaN at lr 0.01 (and maybe again at 0.001), then trained at 0.01 x 0.1^k
            assert [a["outcome"] for a in atts] == ["nan"] * (len(atts) - 1) + ["done"] and len(atts) >= 2, atts
            assert [a["lr"] for a in atts] == pytest.approx([0.01 * 0.1 ** k for k in range(len(atts))]), atts
            nan = json.loads((rd / "attempt-1" / "nan.json").read_text())
            assert nan["iter"] is not None and nan["lr"] == pytest.approx(0.01)
    text = first["res"].report_text
    assert "## Retried runs (NaN, then a lower learning rate)" in text
    retried = [line for line in text.splitlines() if line.startswith("- ssfl-")]
    assert len(retried) == 2
    for line in retried:
        assert "attempt 1 lr 0.01: nan" in line and re.search(r"attempt \d lr 0\.0*1: done$", line), line
    assert not any(line.startswith("- focal-") for line in text.splitlines())


def test_report_written_beside_its_figures_and_printed(first):
    res, ws = first["res"], first["ws"]
    md = ws / "report" / "quickstart.md"
    assert res.report_path == md and md.read_text() == res.report_text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", res.report_text)
    assert figures and all((md.parent / f).is_file() and f.endswith(".png") for f in figures)
    assert res.report_text in first["out"]  # printed on stdout
    assert "ssflctl status quickstart" in first["err"]


def test_second_run_reuses_everything_and_submits_nothing(first, second):
    res = second["res"]
    assert not res.generated and res.converted == []
    assert res.submit.submitted == []
    assert all(p.action == "skip" and p.why == "done" for p in res.submit.plan) and len(res.submit.plan) == 4
    assert len(_run_dirs(first["ws"])) == 4
    assert res.done and res.report_text == first["res"].report_text  # regenerated: the same report
    assert "kept" in second["err"]


def test_other_data_parameters_in_the_same_workspace_are_refused(first):
    with pytest.raises(UserError, match="other parameters"):
        quickstart.ensure_data(first["ws"], dict(SMALL_DATA, n_train=17))
