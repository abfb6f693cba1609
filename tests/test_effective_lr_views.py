"""`status` and `report` show the lr a run really trained at (login side, no training).

The job records the base lr of the optimizer in progress.json and outcome.json (``effective_lr``,
tests/test_effective_lr.py measures it on real mmengine runs). Here run directories are written with
the field as the job writes it: text views show ``0.01→0.00125 (auto_scale_lr)`` where it differs
from the config's lr, machine-readable outputs keep ``lr`` (the config's) and add ``lr_effective`` /
``lr_scale``; without the field (or with it equal) every output is what it was (tests/golden/report).
"""
from __future__ import annotations

import io
import json
import shutil

import pytest

import submit_light_job as light
from ssflctl import backends
from ssflctl.backends import JobKind
from ssflctl.control import submit as submit_mod
from ssflctl.registry.store import Registry
from ssflctl.workdir.layout import RunDir
from ssflctl.workdir.records import EffectiveLr, Outcome, Progress

pytestmark = pytest.mark.unit

EXP = """\
name: asl
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [focal]
  seed: [1, 2, 3]
params: {{max_epochs: 1}}
resources: {{cpus: 1, mem: 1G, time: "00:10:00"}}
executor: {{type: local}}
"""
SCALED = EffectiveLr(config=0.01, effective=0.00125, scale=0.125, batch=2, base_batch=16, world_size=1)
SCALED_2 = EffectiveLr(config=0.001, effective=0.000125, scale=0.125, batch=2, base_batch=16, world_size=1)
PLAIN = EffectiveLr(config=0.01, effective=0.01, scale=None, batch=2, base_batch=16, world_size=1)


@pytest.fixture
def fake():
    backends.register("local", "ssflctl.backends.fake:FakeBackend")
    yield backends.get("local")
    backends.register("local", "ssflctl.backends.local:LocalBackend")


def _attempt(run: RunDir, n: int, lr: float, reason="first attempt", progress=None, outcome=None):
    a = run.attempt(n)
    a.path.mkdir(parents=True, exist_ok=True)
    (a.path / "attempt.json").write_text(json.dumps({"run_id": run.run_id, "attempt": n, "lr": lr,
                                                     "reason": reason}))
    if progress is not None:
        a.write_progress(progress)
    if outcome is not None:
        a.write_outcome(outcome)
    return a


@pytest.fixture
def ws(tmp_path, monkeypatch, fake):
    """Three running runs: seed 1 trains with auto_scale_lr (0.01 → 0.00125), seed 2 was retried after
    a NaN (attempt 2 at config lr 0.001 → 0.000125), seed 3 without auto_scale_lr (recorded, equal)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    path = tmp_path / "asl.yaml"
    path.write_text(EXP.format(root=tmp_path / "data"))
    ws = tmp_path / "ws"
    res = submit_mod.submit(path, ws, render=light.light_render)
    by_seed = {p.run.axes["seed"]: p.run.run_id for p in res.submitted}
    for got in fake.submitted[0]["ids"].values():
        fake.set(got["job_id"], JobKind.RUNNING)
    for seed, rid in by_seed.items():
        run = RunDir.of(ws, rid)
        shutil.rmtree(run.attempt(1).path)
        run = run.refresh()
        if seed == 1:
            _attempt(run, 1, 0.01, progress=Progress(epoch=1, max_epochs=12, iter=50, lr=0.00125, effective_lr=SCALED))
        elif seed == 2:
            nan = {"iter": 3, "epoch": 1, "loss_key": "loss_cls", "nonfinite": {"loss_cls": "nan"}, "lr": 0.000156}
            _attempt(run, 1, 0.01, outcome=Outcome.from_json({"outcome": "nan", "nan": nan, "effective_lr": SCALED.to_json(),
                                                              "reason": "NaN in loss_cls at epoch 1 iter 3 (lr 0.000156)"}))
            _attempt(run, 2, 0.001, reason="after NaN in loss_cls at epoch 1 iter 3 (lr 0.01→0.00125 by auto_scale_lr); "
                     "the config lr is lowered (auto_scale_lr ×0.125 applies to it again)",
                     progress=Progress(epoch=1, max_epochs=12, iter=50, lr=0.000125, effective_lr=SCALED_2))
        else:
            _attempt(run, 1, 0.01, progress=Progress(epoch=1, max_epochs=12, iter=50, lr=0.01, effective_lr=PLAIN))
    return ws, by_seed


def test_status_shows_the_effective_lr_beside_the_config_lr(ws, capsys):
    from ssflctl.commands import status as status_mod

    ws, by_seed = ws
    with Registry(ws) as reg:
        items = {it["run"]: it for it in status_mod.view(reg, ws)}
    scaled, retried, plain = (items[by_seed[s]] for s in (1, 2, 3))
    # machine-readable: `lr` keeps its meaning (the config's), the effective lr and scale beside it
    assert (scaled["lr"], scaled["lr_effective"], scaled["lr_scale"]) == (0.01, 0.00125, 0.125)
    assert (retried["lr"], retried["lr_effective"], retried["lr_scale"]) == (0.001, 0.000125, 0.125)
    assert (plain["lr"], plain["lr_effective"], plain["lr_scale"]) == (0.01, 0.01, None)
    # text: the lr column and the retry's lineage
    assert status_mod.lr_cell(scaled) == "0.01→0.00125 (auto_scale_lr)"
    assert status_mod.lr_cell(retried) == "0.001→0.000125 (auto_scale_lr)"
    assert status_mod.lr_cell(plain) == "0.01"
    assert retried["note"].startswith("attempt 2/3 · lr 0.001→0.000125 (auto_scale_lr) · after NaN in loss_cls at "
                                      "epoch 1 iter 3 (lr 0.01→0.00125 by auto_scale_lr); the config lr is lowered")
    rows = {r[0]: r for r in status_mod._rows(list(items.values()))}
    assert rows[by_seed[1]][status_mod.COLUMNS.index("lr")] == "0.01→0.00125 (auto_scale_lr)"
    assert rows[by_seed[3]][status_mod.COLUMNS.index("lr")] == "0.01"

    status_mod.main(ws, as_json=True)
    got = {it["run"]: it for it in json.loads(capsys.readouterr().out)}
    assert (got[by_seed[1]]["lr"], got[by_seed[1]]["lr_effective"], got[by_seed[1]]["lr_scale"]) == (0.01, 0.00125, 0.125)
    status_mod.main(ws)  # piped: the plain table
    out = capsys.readouterr().out
    assert "0.01→0.00125 (auto_scale_lr)" in out and "0.001→0.000125 (auto_scale_lr)" in out


def test_status_without_the_record_shows_the_config_lr(ws):
    """An attempt without effective_lr (an older ssflctl, or before the first logging point)."""
    from ssflctl.commands import status as status_mod

    ws, by_seed = ws
    a = RunDir.of(ws, by_seed[1]).attempt(1)
    a.write_progress(Progress(epoch=1, max_epochs=12, iter=50, lr=0.00125))
    assert "effective_lr" not in json.loads(a.path.joinpath("progress.json").read_text())
    with Registry(ws) as reg:
        it = next(i for i in status_mod.view(reg, ws) if i["run"] == by_seed[1])
    assert (it["lr"], it["lr_effective"], it["lr_scale"]) == (0.01, None, None)
    assert status_mod.lr_cell(it) == "0.01"


def _golden_copy(tmp_path):
    from test_report import GOLDEN_WS

    ws = tmp_path / "ws"
    shutil.copytree(GOLDEN_WS, ws)
    (rid,) = [p.name for p in (ws / "runs").iterdir() if p.name.startswith("ssfl-cityscapes-s2-")]
    return ws, RunDir.of(ws, rid)


def test_report_shows_the_effective_lr_and_keeps_lr_in_csv_and_json(tmp_path):
    """The golden workspace's retried run (ssfl/cityscapes/s2: NaN at lr 0.01, done at 0.001), as if
    trained with auto_scale_lr ×0.125: the retried list and the loss-curve legend name both lrs; CSV
    and JSON keep ``lr`` (config) and add ``lr_effective``/``lr_scale`` for every row."""
    import pandas as pd

    from ssflctl.report import build_report, make_report
    from ssflctl.report import collect

    ws, run = _golden_copy(tmp_path)
    for a, eff in ((run.attempt(1), SCALED), (run.attempt(2), SCALED_2)):
        body = json.loads((a.path / "outcome.json").read_text())
        a.write_outcome(Outcome.from_json({**body, "effective_lr": eff.to_json()}))
    run = run.refresh()

    rec = collect.read_run_dir(run.path)
    assert [(x["lr"], x["lr_effective"], x["lr_scale"]) for x in rec["attempts"]] == \
        [(0.01, 0.00125, 0.125), (0.001, 0.000125, 0.125)]
    assert collect.lr_text(rec["attempts"][1]) == "0.001→0.000125 (auto_scale_lr)"

    rep = make_report(ws)
    (line,) = [ln for ln in rep.retries if ln.startswith(f"{run.run_id}:")]
    assert "attempt 1 lr 0.01→0.00125 (auto_scale_lr): nan" in line
    assert "attempt 2 lr 0.001→0.000125 (auto_scale_lr): done" in line
    md = build_report(ws, fmt="markdown")  # markdown escapes the underscores
    assert "attempt 2 lr 0.001→0.000125 (auto\\_scale\\_lr): done" in md

    df = pd.read_csv(io.StringIO(build_report(ws, fmt="csv")))
    cols = list(df.columns)
    assert cols[cols.index("lr") + 1:cols.index("lr") + 3] == ["lr_effective", "lr_scale"]
    mine = df[df["run_id"] == run.run_id]
    assert set(mine["lr"]) == {0.001} and set(mine["lr_effective"]) == {0.000125} and set(mine["lr_scale"]) == {0.125}
    others = df[(df["run_id"] != run.run_id) & df["lr"].notna()]
    assert len(others) and others["lr_effective"].isna().all()  # not recorded: empty, never the config lr
    rows = json.loads(build_report(ws, fmt="json"))
    row = next(r for r in rows if r["run_id"] == run.run_id)
    assert (row["lr"], row["lr_effective"], row["lr_scale"]) == (0.001, 0.000125, 0.125)
    assert next(r for r in rows if r["run_id"] != run.run_id)["lr_effective"] is None

    # the loss curves' legend (the figure's labels, drawn without a file)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssflctl.report import plots

    recs = [r for r in rep.records if r["run_id"] == run.run_id]
    fig = plots.loss_figure(plt, recs)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)
    assert any("attempt 2 · lr 0.001→0.000125 (auto_scale_lr)" in t for t in labels), labels


def test_report_equal_effective_lr_changes_nothing(tmp_path):
    """A run recorded without auto_scale_lr (effective == config): the outputs are the golden ones."""
    from test_report import EXPECTED

    from ssflctl.report import build_report

    ws, run = _golden_copy(tmp_path)
    a = run.attempt(2)
    body = json.loads((a.path / "outcome.json").read_text())
    a.write_outcome(Outcome.from_json({**body, "effective_lr": EffectiveLr(config=0.001, effective=0.001).to_json()}))
    for fmt, suffix in (("markdown", "md"), ("csv", "csv"), ("json", "json")):
        assert build_report(ws, fmt=fmt) == (EXPECTED / f"report.{suffix}").read_text(encoding="utf-8"), fmt
