"""`ssflctl report`: golden outputs, statistics against pandas, gaps, --strict, the registry, outside
mmdet work dirs (hand-made and written by a real mmengine run), plots, and the HTML page in Chromium.

Regenerate the golden files (then READ the diff) with:
    SSFLCTL_REGEN_GOLDEN=1 pytest tests/test_report.py -k golden
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

GOLDEN = REPO / "tests" / "golden" / "report"
GOLDEN_WS = GOLDEN / "ws"
EXPECTED = GOLDEN / "expected"
REGEN = os.environ.get("SSFLCTL_REGEN_GOLDEN") == "1"

unit = pytest.mark.unit

SUMMARY_002 = """
 Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.224
 Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = 0.413
 Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ] = 0.223
 Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = 0.005
 Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ] = 0.064
 Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = 0.290
 Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 0.300
 Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ] = 0.397
 Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.400
 Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = -1.000
 Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ] = 0.212
 Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = 0.494
"""


# ------------------------------------------------------------------------------------ golden


@unit
@pytest.mark.parametrize("fmt,suffix", [("markdown", "md"), ("latex", "tex"), ("csv", "csv"), ("json", "json")])
def test_golden_outputs(fmt, suffix):
    from ssflctl.report import build_report

    text = build_report(GOLDEN_WS, fmt=fmt)
    path = EXPECTED / f"report.{suffix}"
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} missing: run with SSFLCTL_REGEN_GOLDEN=1 once and read it"
    assert text == path.read_text(encoding="utf-8")


def _direct_frame():
    """The fixture's numbers read straight from the files with pandas (no ssflctl code)."""
    import pandas as pd

    rows = []
    for run_dir in sorted((GOLDEN_WS / "runs").iterdir()):
        rj = json.loads((run_dir / "run.json").read_text())
        attempts = sorted(run_dir.glob("attempt-*/metrics.json"), key=lambda p: int(p.parent.name[8:]))
        if not attempts:
            continue
        m = json.loads(attempts[-1].read_text())
        rows.append({**rj["axes"], "run_id": rj["run_id"], **m["bbox"]})
    return pd.DataFrame(rows)


@unit
def test_means_and_stds_equal_direct_pandas():
    from ssflctl.report import make_report

    df = _direct_frame()
    direct = df.groupby(["loss", "dataset"])[["AP", "AP75", "ARl"]].agg(["mean", "std", "count"])
    rep = make_report(GOLDEN_WS)
    rows = {tuple(stub): cells for stub, cells in rep.main.rows}
    cols = rep.main.flat_columns()
    checked = 0
    for (loss, ds), r in direct.iterrows():
        for metric in ("AP", "AP75", "ARl"):
            mean, std, n = r[(metric, "mean")], r[(metric, "std")], int(r[(metric, "count")])
            cell = rows[(loss,)][cols.index(f"{ds} {metric}")]
            assert cell.value == pytest.approx(mean, rel=1e-12, abs=0)
            want = f"{mean * 100:.1f}" if n == 1 else f"{mean * 100:.1f} ± {std * 100:.1f}"
            assert cell.text == want, (loss, ds, metric)
            checked += 1
    assert checked == 3 * 5  # five (loss, dataset) cells have numbers; gfl/coco has none
    # the failed/running/pending runs are not averaged in: gfl/cityscapes has 2 of 3 seeds
    assert rows[("gfl",)][cols.index("cityscapes n")].text == "2/3"
    assert rows[("focal",)][cols.index("coco n")].text == "2/3"  # seed 3 never submitted
    # the delta is the difference of the means, in points
    d = (direct.loc[("ssfl", "coco"), ("AP", "mean")] - direct.loc[("focal", "coco"), ("AP", "mean")]) * 100
    assert rows[("ssfl",)][cols.index("coco ΔAP")].text == f"{d:+.1f}"


@unit
def test_long_csv_and_json_keep_full_precision():
    import pandas as pd
    from io import StringIO

    from ssflctl.report import build_report

    df = _direct_frame()
    csv = pd.read_csv(StringIO(build_report(GOLDEN_WS, fmt="csv")))
    js = pd.DataFrame(json.loads(build_report(GOLDEN_WS, fmt="json")))
    for frame in (csv, js):
        ap = frame[(frame["metric"] == "AP") & frame["value"].notna()].set_index("run_id")["value"]
        assert len(ap) == len(df) == 13
        for _, r in df.iterrows():
            assert ap[r["run_id"]] == r["AP"]  # exact, not rounded
        # every run is there, with or without numbers: 18 runs x 12 metrics
        assert len(frame[frame["metric"] == "AP"]) == 18
        states = frame[frame["metric"] == "AP"]["state"].value_counts().to_dict()
        assert states == {"done": 13, "failed": 2, "running": 1, "pending": 1, "missing": 1}
        assert set(frame[frame["metric"] == "class_AP"]["class"]) == {"person", "car", "train", "dog"}


@unit
def test_gaps_are_shown_never_dropped():
    from ssflctl.report import build_report

    md = build_report(GOLDEN_WS)
    assert "—, failed: NaN after 3 attempts; running: epoch 7/12; pending: not submitted" in md
    assert ("| gfl-cityscapes-s3-71be12f6 | gfl | cityscapes | 3 | failed | RuntimeError: CUDA out of memory — GPU out "
            "of memory: lower batch\\_size or use a larger GPU, then submit again |") in md
    assert "| — | focal | coco | 3 | missing | no run in the workspace |" in md
    # the retried run is marked and explained
    assert "3†" in md
    assert ("ssfl-cityscapes-s2-6a7a524f: attempt 1 lr 0.01: nan (NaN in loss\\_cls at iter 340) → "
            "attempt 2 lr 0.001: done") in md
    # best values bold; baseline row first
    lines = [ln for ln in md.splitlines() if ln.startswith("| focal") or ln.startswith("| ssfl")]
    assert lines[0].startswith("| focal") and "baseline" in lines[0]
    assert "**36.8 ± 0.5**" in md


@unit
def test_state_text_and_single_seed():
    from ssflctl.report.aggregate import _state_text

    f = {"state": "failed", "reason": "NaN after 3 attempts"}
    assert _state_text([f]) == "failed: NaN after 3 attempts"
    assert _state_text([f, dict(f)]) == "2 failed: NaN after 3 attempts"
    assert _state_text([f, {"state": "queued", "reason": ""}]) == "failed: NaN after 3 attempts; queued"


def _copy_ws(tmp_path, keep):
    ws = tmp_path / "ws"
    for d in (GOLDEN_WS / "runs").iterdir():
        if keep(d.name):
            shutil.copytree(d, ws / "runs" / d.name)
    return ws


@unit
def test_strict_exit_code(tmp_path, capsys):
    from ssflctl.report import main

    assert main(GOLDEN_WS, [], fmt="csv", strict=True) == 1
    assert "--strict: " in capsys.readouterr().err
    ws = _copy_ws(tmp_path, lambda n: n.startswith(("focal-cityscapes", "ssfl-cityscapes")))
    assert main(ws, [], fmt="markdown", strict=True) == 0
    out = capsys.readouterr().out
    assert "| focal |" in out and "| ssfl |" in out and "Runs without results" not in out


@unit
def test_trained_but_untested_is_not_done(tmp_path):
    from ssflctl.report.collect import collect_workspace

    ws = _copy_ws(tmp_path, lambda n: n.startswith("focal-cityscapes-s1"))
    (ws / "runs" / "focal-cityscapes-s1-1796d5be" / "attempt-1" / "metrics.json").unlink()
    (rec,) = collect_workspace(ws)
    assert rec["state"] == "running" and "no metrics.json" in rec["reason"] and rec["metrics"] is None


@unit
def test_options_baseline_metrics_by():
    from ssflctl.errors import UserError
    from ssflctl.report import make_report
    from ssflctl.report.writers import markdown

    rep = make_report(GOLDEN_WS, baseline="loss=ssfl", metrics="ap,AP50")
    assert rep.main.flat_columns() == ["cityscapes AP", "cityscapes AP50", "cityscapes ΔAP", "cityscapes n",
                                       "coco AP", "coco AP50", "coco ΔAP", "coco n"]
    assert rep.main.rows[0][0] == ["ssfl"]
    rep = make_report(GOLDEN_WS, baseline="loss=nope", metrics="AP")
    assert "ΔAP" not in " ".join(rep.main.flat_columns())
    assert "No baseline: no configuration has loss=nope" in markdown(rep)
    rep = make_report(GOLDEN_WS, by=["loss", "lr"], metrics="AP")
    assert rep.main.stub == ["loss", "lr"] and rep.main.rows[0][0] == ["focal", "0.01"]
    rep = make_report(GOLDEN_WS, by=["loss", "dataset"], metrics="AP")
    assert rep.main.flat_columns() == ["AP", "ΔAP", "n"] and len(rep.main.rows) == 6
    rows = {tuple(stub): [c.text for c in cells] for stub, cells in rep.main.rows}
    assert rows[("ssfl", "coco")][1] == "+1.0" and rows[("focal", "coco")][1:] == ["baseline", "2/3"]
    for kw in ({"baseline": "focal"}, {"metrics": "mAP"}, {"by": ["optimizer"]}):
        with pytest.raises(UserError):
            make_report(GOLDEN_WS, **kw)
    with pytest.raises(UserError, match="known experiments: ssfl_vs_fl"):
        make_report(GOLDEN_WS, ["other"])


@unit
def test_voc_studies_get_a_delta_of_their_headline_metric(tmp_path):
    """With VOC mAP@0.5 in the table, the baseline delta is given for it too, not only for COCO AP."""
    import statistics

    from ssflctl.report import make_report
    from ssflctl.report.writers import markdown

    ws = tmp_path / "ws"
    shutil.copytree(GOLDEN_WS, ws)
    voc = {}
    for k, f in enumerate(sorted(ws.glob("runs/*/attempt-*/metrics.json"))):
        m = json.loads(f.read_text())
        m["voc"] = {"mAP50": 0.40 + 0.01 * k, "eval_mode": "11points"}
        f.write_text(json.dumps(m))
        voc[f.parts[-3]] = m["voc"]["mAP50"]
    rep = make_report(ws, by=["loss", "dataset"], metrics="voc,AP")
    assert rep.main.flat_columns() == ["VOC mAP@0.5", "AP", "ΔVOC mAP@0.5", "ΔAP", "n"]
    rows = {tuple(stub): cells for stub, cells in rep.main.rows}
    assert rows[("focal", "coco")][2].text == "baseline" and rows[("focal", "coco")][3].text == "baseline"

    def mean(loss, ds):  # straight from the files: every run of the cell with metrics is done here
        return statistics.mean(v for run, v in voc.items() if run.startswith(f"{loss}-{ds}-"))

    assert rows[("ssfl", "coco")][0].value == pytest.approx(mean("ssfl", "coco"))
    delta = 100 * (mean("ssfl", "coco") - mean("focal", "coco"))
    assert rows[("ssfl", "coco")][2].text == f"{delta:+.1f}" and abs(delta) >= 0.05
    assert rows[("ssfl", "coco")][2].value == pytest.approx(delta / 100)
    assert "ΔVOC mAP@0.5: VOC mAP@0.5 points and ΔAP: AP points against the baseline loss=focal" in markdown(rep)


@unit
def test_cli_out_writes_figures_and_refuses_overwrite(tmp_path):
    out = tmp_path / "report" / "index.md"
    proc = run_cli("report", "-w", GOLDEN_WS, "--out", out, "--metrics", "AP,AP50")
    assert proc.returncode == 0, proc.stderr
    md = out.read_text()
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert "ap_by_config.png" in pngs and "loss_ssfl_cityscapes.png" in pngs
    for name in pngs:
        assert f"]({name})" in md
    from PIL import Image

    with Image.open(out.parent / "loss_ssfl_cityscapes.png") as im:
        hist = im.convert("L").histogram()
        assert im.size[0] > 300 and sum(1 for h in hist if h) > 10  # drawn, not blank
    again = run_cli("report", "-w", GOLDEN_WS, "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    forced = run_cli("report", "-w", GOLDEN_WS, "--out", out, "--force", "--metrics", "AP")
    assert forced.returncode == 0 and out.read_text() != md
    stdout = run_cli("report", "-w", GOLDEN_WS, "--metrics", "AP")
    assert stdout.returncode == 0 and stdout.stdout.startswith("# ssflctl report: ssfl_vs_fl")
    tex = run_cli("report", "-w", GOLDEN_WS, "--out", tmp_path / "t" / "table.tex", "--metrics", "AP")
    assert tex.returncode == 0 and (tmp_path / "t" / "table.tex").read_text().startswith("% ssflctl report")
    assert not list((tmp_path / "t").glob("*.png"))
    bad = run_cli("report", "-w", tmp_path / "empty")
    assert bad.returncode == 2 and "no runs" in bad.stderr


@unit
def test_importing_report_is_light():
    code = ("import sys, ssflctl.report, ssflctl.report.collect, ssflctl.report.writers, ssflctl.report.plots; "
            "print([m for m in ('pandas', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ registry


@unit
def test_registry_fixture(tmp_path):
    store = pytest.importorskip("ssflctl.registry.store")
    from ssflctl.report import make_report

    ws = _copy_ws(tmp_path, lambda n: n.startswith(("focal-", "ssfl-")))
    with store.Registry(ws) as reg:
        reg.upsert_experiment("ssfl_vs_fl")
        for d in sorted((ws / "runs").iterdir()):
            rj = json.loads((d / "run.json").read_text())
            reg.ensure_run(rj["run_id"], "ssfl_vs_fl", rj["name"], rj["axes"])
            reg.update_run(rj["run_id"], state="done")
            for a in sorted(d.glob("attempt-*")):
                meta = json.loads((a / "attempt.json").read_text())
                reg.upsert_attempt(rj["run_id"], meta["attempt"], lr=meta["lr"], state="done")
        # a run the registry knows but that has no directory yet (queued on Slurm)
        reg.ensure_run("gfl-coco-s1-deadbeef", "ssfl_vs_fl", "gfl-coco-s1",
                       {"loss": "gfl", "dataset": "coco", "seed": 1, "lr": 0.01})
        reg.update_run("gfl-coco-s1-deadbeef", state="queued", reason="slurm job 4242 pending (Priority)",
                       job_id="4242")
        # the registry says done but the files have no metrics: must not pass as done
        reg.update_run("focal-cityscapes-s1-1796d5be", state="done")
    shutil.rmtree(ws / "runs" / "focal-cityscapes-s1-1796d5be" / "attempt-1")
    rep = make_report(ws, metrics="AP")
    gaps = {r[0][0]: [c.text for c in r[1]] for r in rep.gaps.rows}
    assert gaps["gfl-coco-s1-deadbeef"][3:] == ["queued", "slurm job 4242 pending (Priority)"]
    assert gaps["focal-cityscapes-s1-1796d5be"][3] == "failed"
    assert gaps["focal-cityscapes-s1-1796d5be"][4].startswith("results missing: no outcome.json")
    cols = rep.main.flat_columns()
    row = {tuple(s): c for s, c in rep.main.rows}
    # seeds 2 and 3 of gfl/coco were never registered: they show up as missing, not as nothing
    assert row[("gfl",)][cols.index("coco AP")].text == ("—, queued: slurm job 4242 pending (Priority); "
                                                         "2 missing: no run in the workspace")
    assert row[("focal",)][cols.index("cityscapes n")].text == "2/3"


# ------------------------------------------------------------------------------- outside work dirs


@unit
def test_parse_pycocotools_summary_and_scalars(tmp_path):
    from ssflctl.report.collect import parse_coco_summaries, read_scalars

    sums = parse_coco_summaries("epoch 1\n" + SUMMARY_002 + "\nepoch 2\n" + SUMMARY_002.replace("0.224", "0.229"))
    assert len(sums) == 2 and len(sums[1]) == 12
    assert sums[1]["AP"] == 0.229 and sums[0]["AR1"] == 0.3 and sums[0]["ARs"] is None and sums[0]["ARl"] == 0.494
    p = tmp_path / "scalars.json"
    p.write_text('{"loss": NaN, "iter": 1}\n{"loss": nan, "lr": 0.01, "iter": 2}\n{"loss": -inf, "iter": 3}\n'
                 'not json\n{"loss": 1.5, "iter": 4}\n')
    recs = read_scalars(p)
    assert [r["iter"] for r in recs] == [1, 2, 3, 4]
    assert math.isnan(recs[0]["loss"]) and math.isnan(recs[1]["loss"]) and recs[2]["loss"] == -math.inf


@unit
def test_loss_curves_prefer_the_runners_own_text_log(tmp_path):
    from ssflctl.report.collect import loss_curves, parse_train_log

    log = (
        "2026/11/21 12:44:08 - mmengine - INFO - Epoch(train) [1][1/4]  lr: 1.0000e-02  eta: 0:00:17  "
        "time: 5.8359  data_time: 0.0848  loss: 77.6643  loss_cls: 76.9337  loss_bbox: 0.7306\n"
        "2026/11/21 12:44:10 - mmengine - INFO - Epoch(train) [2][3/4]  lr: 1.0000e-02  eta: 0:00:02  "
        "time: 2.6650  data_time: 0.0437  loss: 67.9126  loss_cls: 67.1873  loss_bbox: 0.7252\n"
        "2026/11/21 12:44:12 - mmengine - INFO - Epoch(train) [2][4/4]  lr: 1.0000e-02  eta: 0:00:00  "
        "time: 2.5216  data_time: 0.0400  loss: nan  loss_cls: nan  loss_bbox: 0.7197\n"
        "2026/11/21 12:44:12 - mmengine - ERROR - guard.py - trip - 200 - NanGuard: stopping; "
        "Iter(train) [8]  loss: nan  loss_cls: nan\n"
        "2026/11/21 12:50:00 - mmengine - INFO - Iter(train) [  50/1000]  lr: 1.0000e-03  loss: 1.5e-01\n")
    pts = parse_train_log(log)
    assert [p[0] for p in pts] == [1, 7, 8, 50]
    assert pts[0][1] == 77.6643 and math.isnan(pts[2][1]) and pts[3][1] == 0.15
    # attempt-1's scalars.json also holds a later runner's lines (mmengine's visualizer singleton):
    # the text log wins
    ts = tmp_path / "attempt-1" / "20260101_000000"
    (ts / "vis_data").mkdir(parents=True)
    (ts / "20260101_000000.log").write_text(log)
    (ts / "vis_data" / "scalars.json").write_text('{"loss": 1.0, "iter": 1}\n{"loss": 9.0, "iter": 1}\n')
    rec = {"attempts": [{"attempt": 1, "lr": 0.01, "dir": str(tmp_path / "attempt-1"), "nan": {"iter": 8}}]}
    ((att, lr, got, nan_iter),) = loss_curves(rec)
    assert got[:2] == [(1, 77.6643), (7, 67.9126)] and nan_iter == 8


def _handmade_workdir(root: Path, name: str, summary_in=None, ap=0.224) -> Path:
    """An mmdet-style work dir: CocoMetric numbers in scalars.json (AP = `ap`), the classwise table in
    the text log, and the pycocotools summary (AP 0.224) in the log (`summary_in="ts"`), in a file the
    user tee'd stdout into (`"tee"`), or nowhere (mmdet 3.x prints it to stdout only)."""
    wd = root / name
    ts = wd / "20240101_101010"
    (ts / "vis_data").mkdir(parents=True)
    log = ["2024/01/01 10:10:10 - mmengine - INFO - \n    seed: 3407\n",
           "Epoch(train) [1][50/100] lr: 1.0000e-02 loss: 1.2"]
    if summary_in == "ts":
        log.append(SUMMARY_002)
    log.append("+----------+-------+--------+\n| category | mAP   | mAP_50 |\n+----------+-------+--------+\n"
               "| person   | 0.31  | 0.5    |\n| car      | nan   | nan    |\n+----------+-------+--------+")
    (ts / "20240101_101010.log").write_text("\n".join(log) + "\n")
    if summary_in == "tee":
        (wd / "test.log").write_text("loading annotations into memory...\n" + SUMMARY_002)
    (ts / "vis_data" / "scalars.json").write_text(
        '{"lr": 0.01, "loss": 1.2, "iter": 50, "epoch": 1, "step": 50}\n'
        '{"lr": 0.01, "loss": NaN, "iter": 100, "epoch": 1, "step": 100}\n'
        f'{{"coco/bbox_mAP": {ap}, "coco/bbox_mAP_50": 0.413, "coco/bbox_mAP_75": 0.223, "coco/bbox_mAP_s": 0.005, '
        '"coco/bbox_mAP_m": 0.064, "coco/bbox_mAP_l": 0.29, "coco/person_precision": 0.31, '
        '"coco/car_precision": NaN, "step": 1}\n')
    return wd


@unit
def test_handmade_workdirs(tmp_path):
    from ssflctl.errors import UserError
    from ssflctl.report import make_report

    wds = [_handmade_workdir(tmp_path, "in_log", "ts"), _handmade_workdir(tmp_path, "teed", "tee"),
           _handmade_workdir(tmp_path, "cocometric", None),
           _handmade_workdir(tmp_path, "other_eval", "tee", ap=0.301)]  # summary of another evaluation
    rep = make_report(tmp_path / "nows", workdirs=wds)
    cols = rep.main.flat_columns()
    rows = {s[0]: {c: cell.text for c, cell in zip(cols, cells)} for s, cells in rep.main.rows}
    for name in ("in_log", "teed"):
        assert rows[name]["AP"] == "22.4" and rows[name]["AR1"] == "30.0" and rows[name]["ARl"] == "49.4"
        assert rows[name]["ARs"] == "n/a (no GT)"  # -1 in the summary: no ground truth of that size
    assert rows["cocometric"]["AP"] == "22.4" and rows["cocometric"]["APs"] == "0.5"
    assert rows["cocometric"]["AR1"] == rows["cocometric"]["ARl"] == "n/a (CocoMetric)"
    assert rows["other_eval"]["AP"] == "30.1" and rows["other_eval"]["AR1"] == "n/a (CocoMetric)"
    pcs = {r[0][0]: [c.text for c in r[1]] for r in rep.per_class[0].rows}
    assert pcs["person"] == ["31.0"] * 4 and pcs["car"][0] == "n/a (no GT)"
    assert {r["axes"].get("seed") for r in rep.records} == {3407}
    # --strict: "no ground truth" is a value, a number the evaluator never produced is a gap
    from ssflctl.report import main

    assert main(tmp_path / "nows", [], fmt="csv", workdirs=wds[:1], strict=True) == 0
    assert main(tmp_path / "nows", [], fmt="csv", workdirs=wds[2:3], strict=True) == 1
    assert main(tmp_path / "nows", [], fmt="csv", workdirs=wds[2:3], strict=True, metrics="AP,AP50,APl") == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    (rec,) = make_report(tmp_path / "nows", workdirs=[empty]).records  # a row with its reason (issue 16)
    assert rec["state"] == "unreadable" and "not an MMDetection work dir" in rec["reason"]
    with pytest.raises(UserError, match="does not exist"):
        make_report(tmp_path / "nows", workdirs=[tmp_path / "absent"])


@unit
def test_workdirs_beside_a_study(tmp_path):
    from ssflctl.report import make_report

    wd = _handmade_workdir(tmp_path, "their_retinanet", "tee")
    rep = make_report(GOLDEN_WS, workdirs=[wd], metrics="AP,AR1")
    assert rep.main.stub == ["experiment", "workdir", "loss"]  # lr is constant where it exists
    cols = rep.main.flat_columns()
    rows = {tuple(s): {c: cell.text for c, cell in zip(cols, cells)} for s, cells in rep.main.rows}
    theirs = rows[("workdirs", "their_retinanet", "")]
    assert theirs["AP"] == "22.4" and theirs["AR1"] == "30.0" and theirs["n"] == "1"
    assert theirs["cityscapes AP"] == "" and theirs["coco n"] == ""  # not applicable, not a gap
    focal = rows[("ssfl_vs_fl", "", "focal")]
    assert focal["AP"] == "" and focal["cityscapes ΔAP"] == "baseline"
    assert not any("their_retinanet" in m for m in rep.missing)


# --------------------------------------------------------------------- a real mmengine work dir

MMENGINE_SCRIPT = r'''
import json, sys, io, contextlib
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from mmengine.model import BaseModel
from mmengine.evaluator import BaseMetric
from mmengine.runner import Runner
from mmengine.logging import MMLogger
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

GT = {"images": [{"id": i, "width": 100, "height": 100} for i in range(4)],
      "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}],
      "annotations": [{"id": i + 1, "image_id": i, "category_id": 1 + i % 2, "bbox": [10, 10, 30 + i, 40],
                       "area": (30 + i) * 40, "iscrowd": 0} for i in range(4)]}


class Toy(Dataset):
    def __len__(self):
        return 16
    def __getitem__(self, i):
        x = torch.tensor([float(i % 4)])
        return dict(inputs=x, target=2 * x + 1)


class ToyModel(BaseModel):
    def __init__(self, nan_after=None):
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.nan_after, self.calls = nan_after, 0
    def forward(self, inputs, target=None, mode="tensor"):
        x = torch.stack(inputs) if isinstance(inputs, list) else inputs
        t = torch.stack(target) if isinstance(target, list) else target
        y = self.lin(x)
        if mode == "loss":
            self.calls += 1
            loss = ((y - t) ** 2).mean()
            if self.nan_after is not None and self.calls > self.nan_after:
                loss = loss * float("nan")  # what a diverging run logs: bare NaN in scalars.json
            return {"loss": loss}
        return [float(v) for v in torch.nan_to_num((y - t).abs(), nan=9.0).flatten()]


class ToyCocoMetric(BaseMetric):
    """Reports CocoMetric-style keys; with summary=True logs pycocotools' summary like mmdet does."""
    default_prefix = "coco"
    def __init__(self, summary, **kw):
        super().__init__(**kw)
        self.summary = summary
    def process(self, data_batch, data_samples):
        self.results.extend(data_samples)
    def compute_metrics(self, results):
        err = float(np.mean(results))
        gt = COCO()
        gt.dataset = GT
        gt.createIndex()
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                 "bbox": [a["bbox"][0] + min(err, 5.0), a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
                for a in GT["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.evaluate(); ev.accumulate(); ev.summarize()
        if self.summary:
            MMLogger.get_current_instance().info("\n" + buf.getvalue())
        s = ev.stats
        return {"bbox_mAP": round(float(s[0]), 3), "bbox_mAP_50": round(float(s[1]), 3),
                "bbox_mAP_75": round(float(s[2]), 3), "bbox_mAP_s": round(float(s[3]), 3),
                "bbox_mAP_m": round(float(s[4]), 3), "bbox_mAP_l": round(float(s[5]), 3)}


work_dir, summary, nan_after = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]) if len(sys.argv) > 3 else None
loader = dict(dataset=Toy(), batch_size=4, sampler=dict(type="DefaultSampler", shuffle=False),
              collate_fn=dict(type="default_collate"))
runner = Runner(model=ToyModel(nan_after), work_dir=work_dir, train_dataloader=loader, val_dataloader=loader,
                optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01)),
                train_cfg=dict(by_epoch=True, max_epochs=2, val_interval=1), val_cfg=dict(),
                val_evaluator=[ToyCocoMetric(summary)],
                default_hooks=dict(logger=dict(type="LoggerHook", interval=1), checkpoint=dict(type="CheckpointHook", interval=10)),
                randomness=dict(seed=3407), env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")),
                launcher="none")
runner.train()
'''


@pytest.fixture(scope="module")
def mmengine_workdirs(tmp_path_factory):
    pytest.importorskip("mmengine")
    root = tmp_path_factory.mktemp("mmengine_wd")
    script = root / "toy_train.py"
    script.write_text(MMENGINE_SCRIPT)
    out = {}
    # two runs (each a fresh process: mmengine names its logger after the start second):
    # toy_nan logs pycocotools' summary (as mmdet 2.x did) and its loss turns NaN after 5 iterations;
    # toy_cocometric reports CocoMetric keys only (as mmdet 3.x's log and scalars.json have them)
    for name, args in (("toy_nan", ["1", "5"]), ("toy_cocometric", ["0"])):
        proc = subprocess.run([sys.executable, str(script), str(root / name), *args], capture_output=True,
                              text=True, cwd=root, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = root / name
    return out


@pytest.mark.training
def test_real_mmengine_workdirs(mmengine_workdirs, tmp_path):
    from ssflctl.report import make_report, render
    from ssflctl.report.collect import read_scalars

    a, b = mmengine_workdirs["toy_nan"], mmengine_workdirs["toy_cocometric"]
    ts = sorted(p for p in b.iterdir() if p.is_dir())[-1]
    recs = read_scalars(ts / "vis_data" / "scalars.json")
    last = [r for r in recs if "coco/bbox_mAP" in r][-1]
    rep = make_report(tmp_path / "nows", workdirs=[a, b])
    cols = rep.main.flat_columns()
    rows = {tuple(s): c for s, c in rep.main.rows}
    assert rows[("toy_cocometric",)][cols.index("AP")].text == f"{last['coco/bbox_mAP'] * 100:.1f}"
    assert rows[("toy_cocometric",)][cols.index("AR10")].text == "n/a (CocoMetric)"
    with_sum = rows[("toy_nan",)]
    # the pycocotools summary in the text log gives all 12 numbers, AR@1 included, and agrees with
    # the CocoMetric value the same run wrote to scalars.json
    ts_a = sorted(p for p in a.iterdir() if p.is_dir())[-1]
    last_a = [r for r in read_scalars(ts_a / "vis_data" / "scalars.json") if "coco/bbox_mAP" in r][-1]
    assert with_sum[cols.index("AP")].text == f"{last_a['coco/bbox_mAP'] * 100:.1f}"
    assert all(c.text != "n/a (CocoMetric)" for c in with_sum)
    assert with_sum[cols.index("AR1")].text.replace(".", "").isdigit()
    assert {r["axes"].get("seed") for r in rep.records} == {3407}
    md = render(rep, "markdown")
    assert "toy\\_nan" in md and "n/a (CocoMetric)" in md


@pytest.mark.training
def test_real_mmengine_nan_workdir_curves(mmengine_workdirs, tmp_path):
    from ssflctl.report import collect, make_report, write_report

    rec = collect.read_workdir(mmengine_workdirs["toy_nan"])
    (att, lr, pts, _nan), = collect.loss_curves(rec)
    assert lr == 0.01 and len(pts) == 8
    assert all(math.isfinite(y) for _, y in pts[:5]) and all(math.isnan(y) for _, y in pts[5:])
    rep = make_report(tmp_path / "nows", workdirs=[mmengine_workdirs["toy_nan"], mmengine_workdirs["toy_cocometric"]])
    assert "toy_nan: training loss NaN from iter 6; results come from a diverged model." in rep.notes
    paths = write_report(rep, "markdown", tmp_path / "out" / "index.md")
    assert {p.name for p in paths} >= {"index.md", "loss_toy-nan.png", "ap_by_config.png"}


# -------------------------------------------------------------------------------------- browser

_PROBE = """<script>window.addEventListener('load', function () {
  var d = document.createElement('pre'); d.id = 'probe';
  d.textContent = JSON.stringify({images: Array.from(document.images).map(function (i) {
    return i.complete ? i.naturalWidth : 0; }), tables: document.querySelectorAll('table').length});
  document.body.appendChild(d); });</script></body>"""


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chrome_args(tmp_path):
    return [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1400,2000"]


@pytest.mark.browser
def test_html_report_in_headless_chromium(tmp_path):
    out = tmp_path / "site" / "index.html"
    proc = run_cli("report", "-w", GOLDEN_WS, "--format", "html", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert not list(out.parent.glob("*.png"))  # self-contained: figures inline
    page = out.read_text()
    assert page.count("data:image/png;base64,") >= 2 and "<style>" in page and "http" not in page.lower()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE, 1))
    dom = subprocess.run(_chrome_args(tmp_path) + ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    start = dom.stdout.index('<pre id="probe">') + len('<pre id="probe">')
    info = json.loads(dom.stdout[start: dom.stdout.index("</pre>", start)])
    assert info["tables"] >= 4  # main, gaps, two per-class
    assert len(info["images"]) >= 2 and all(w > 0 for w in info["images"]), info
    assert 'id="main"' in dom.stdout and "ssfl_vs_fl" in dom.stdout
    shot = tmp_path / "shot.png"
    proc = subprocess.run(_chrome_args(tmp_path) + [f"--screenshot={shot}", out.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        gray = im.convert("L")
        assert im.size == (1400, 2000)
        lo, hi = gray.getextrema()
        assert hi - lo > 100  # text and figures, not a blank page
        assert sum(gray.histogram()[:128]) > 2000  # enough dark pixels: tables and plots drawn
    if os.environ.get("SSFLCTL_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["SSFLCTL_KEEP_SCREENSHOT"])


# ------------------------------------------------------------- a real ssflctl workspace (job.py)


@pytest.fixture(scope="module")
def real_ws(tmp_path_factory):
    """Three runs trained and tested by ssflctl.node.job on the synthetic dataset (1 epoch each, CPU):
    focal seeds 0 and 1, and SSFL* at lr 0.01, which diverges and is retried at lr 0.001."""
    from ssflctl.node import job
    from ssflctl.convert import synth_coco

    root = tmp_path_factory.mktemp("real")
    data = root / "synth"
    synth_coco.generate(data, n_train=16, n_val=8, seed=0)
    ws = root / "ws"
    runs = [("focal", 0, 0.01), ("focal", 1, 0.01), ("ssfl", 0, 0.01)]
    for loss, seed, lr in runs:
        rid = f"{loss}-synth-s{seed}-00000000"
        rd = ws / "runs" / rid
        rd.mkdir(parents=True)
        (rd / "run.json").write_text(json.dumps({
            "run_id": rid, "name": rid[:-9], "experiment": "real", "template": "retinanet_tiny",
            "axes": {"loss": loss, "dataset": "synth", "seed": seed},
            "params": {"loss": loss, "lr": lr, "seed": seed, "data_root": str(data) + "/", "max_epochs": 1,
                       "batch_size": 4, "log_interval": 1},
            "overrides": {}, "retry": {"on_nan": "lower_lr", "factor": 0.1, "max_attempts": 2}, "test": True}))
        try:
            job.train_and_test(rd)
        except Exception as exc:  # a run that fails must show up as failed, not break the fixture
            print(f"{rid}: {exc}")
    return ws


@pytest.mark.training
def test_report_on_real_job_output(real_ws, tmp_path):
    """Whatever the jobs achieved, the report says it: numbers where metrics.json exists (equal to a
    direct computation), the run's state and reason where it does not."""
    import statistics

    from ssflctl.report import build_report, make_report, write_report

    rep = make_report(real_ws, metrics="AP,AP50,AR100")
    recs = {r["run_id"]: r for r in rep.records if r["run_id"]}
    assert set(recs) == {"focal-synth-s0-00000000", "focal-synth-s1-00000000", "ssfl-synth-s0-00000000"}
    gaps = {row[0][0] for row in rep.gaps.rows}
    for rid, r in recs.items():
        tested = any((Path(a["dir"]) / "metrics.json").exists() for a in r["attempts"] if a["dir"])
        assert (r["state"] == "done") == tested, (rid, r["state"], r["reason"])
        assert (rid in gaps) == (not tested)
    ssfl = recs["ssfl-synth-s0-00000000"]
    if len(ssfl["attempts"]) > 1:  # diverged at lr 0.01 (as in test_job): the retry is reported
        assert ssfl["attempts"][0]["state"] == "nan" and ssfl["attempts"][1]["lr"] == pytest.approx(0.001)
        assert any(line.startswith("ssfl-synth-s0-00000000: attempt 1 lr 0.01: nan") for line in rep.retries)
    cols = rep.main.flat_columns()
    focal = [cells for stub, cells in rep.main.rows if stub == ["focal"]][0]
    aps = [r["metrics"]["bbox"]["AP"] for r in recs.values() if r["state"] == "done" and r["axes"]["loss"] == "focal"]
    if len(aps) == 2:
        want = f"{statistics.mean(aps) * 100:.1f} ± {statistics.stdev(aps) * 100:.1f}"
    elif len(aps) == 1:
        want = f"{aps[0] * 100:.1f}"
    else:
        want = "—, 2 " + recs["focal-synth-s0-00000000"]["state"]
    assert focal[cols.index("synth AP")].text.startswith(want)
    paths = write_report(rep, "markdown", tmp_path / "r" / "index.md")
    assert any(p.name.startswith("loss_ssfl") for p in paths)  # real scalars.json of both attempts
    assert "focal-synth-s0" in build_report(real_ws, fmt="csv")
