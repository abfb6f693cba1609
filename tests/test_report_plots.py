"""ssflctl.report.plots: figures stay bounded and readable at any number of configurations (issue 21
item 2): PNG pixel sizes, no figure without numbers, the note of what was left out, the baseline kept."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_report import make_workspace  # noqa: E402  (the benchmark's synthetic workspace)

pytestmark = pytest.mark.unit


def _report(ws, baseline="loss=loss0"):
    from ssflctl.report import make_report

    return make_report(ws, baseline=baseline)


def _count_figures(monkeypatch):
    import matplotlib.pyplot as plt

    made = []
    real = plt.subplots

    def counting(*a, **k):
        made.append(k.get("figsize"))
        return real(*a, **k)

    monkeypatch.setattr(plt, "subplots", counting)
    return made


@pytest.mark.parametrize("n_cfgs", [10, 1000])
def test_ap_figure_pixel_size_is_bounded(tmp_path, n_cfgs):
    from PIL import Image

    from ssflctl.report import plots

    # 10: every configuration on both datasets, 3 seeds; 1000: each on one dataset, one seed
    ws = make_workspace(tmp_path, n_losses=n_cfgs, n_seeds=3 if n_cfgs == 10 else 1, one_dataset=n_cfgs > 10)
    rep = _report(ws)
    drawn = plots.draw(rep, tmp_path / "fig")
    caps = {Path(p).name: cap for cap, p in drawn}
    assert "ap_by_config.png" in caps
    with Image.open(tmp_path / "fig" / "ap_by_config.png") as im:
        w, h = im.size
    # two dataset panels side by side; the old layout was 1.1 inch per configuration (~156k px at 1000)
    assert 500 <= w <= plots.MAX_WIDTH_IN * plots.DPI
    rows = plots.TOP_N + plots.MAX_BASELINES
    assert h <= (plots.ROW_IN * rows + 1.3) * plots.DPI + 1
    sel = plots.ap_selection(rep)
    assert set(sel) == {"cityscapes", "coco"}
    if n_cfgs == 10:
        assert all(len(shown) == total == 10 for shown, total, _ in sel.values())
        assert "left out" not in caps["ap_by_config.png"]
    else:
        for ds, (shown, total, bkeys) in sel.items():
            with_ap = {r["_cfg"] for r in rep.records
                       if r["_ds"] == ds and r["state"] == "done" and r.get("metrics")}
            assert total == len(with_ap) > 400  # ~500 configurations per dataset, a few failed/running
            nb = len([k for k in shown if k in bkeys])
            assert len(shown) == plots.TOP_N + nb
            assert f"{ds}: the best {plots.TOP_N} of {total} configurations by mean AP" in caps["ap_by_config.png"]
            assert f"{total - len(shown)} left out" in caps["ap_by_config.png"]
        assert caps["ap_by_config.png"].endswith("(all are in the tables)")


def test_ap_panels_note_left_out_and_keep_the_baseline(tmp_path):
    from ssflctl.report import plots

    plt = plots._plt()
    ws = make_workspace(tmp_path, n_losses=60, n_seeds=1, datasets=("coco",))
    rep = _report(ws)  # loss0 (the baseline) has the lowest AP of all: ranked, it would be left out
    fig = plots.ap_figure(plt, rep)
    try:
        (ax,) = [a for a in fig.axes if a.get_visible()]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels[0] == "loss0 (baseline)" and len(labels) == plots.TOP_N + 1
        total = len({r["_cfg"] for r in rep.records if r["state"] == "done" and r.get("metrics")})
        assert ax.get_title() == f"coco: best {plots.TOP_N} of {total} configurations ({total - plots.TOP_N - 1} left out)"
        means = {k: sum(v) / len(v) for (k, ds), v in rep.seedvals.items()}
        shown = plots.ap_selection(rep)["coco"][0][1:]
        worst_shown = min(means[k] for k in shown)
        assert all(means[k] <= worst_shown for k in means if k not in shown and k != ("loss0",))
    finally:
        plt.close(fig)


def test_no_figure_for_a_dataset_without_numbers(tmp_path, monkeypatch):
    from ssflctl.report import plots

    ws = make_workspace(tmp_path, n_losses=4, n_seeds=2)
    for mp in (ws / "runs").glob("*-cityscapes-*/attempt-*/metrics.json"):
        mp.unlink()
        (mp.parent / "outcome.json").write_text(json.dumps({"outcome": "failed", "reason": "CUDA OOM"}))
    rep = _report(ws)
    assert "cityscapes" in rep.datasets and set(plots.ap_selection(rep)) == {"coco"}
    made = _count_figures(monkeypatch)
    monkeypatch.setenv("SSFLCTL_WORKERS", "1")  # figures counted in this process (not in forked workers)
    drawn = plots.draw(rep, tmp_path / "fig")
    # attempt dirs without logs: no loss figure is drawn, and none is even created
    assert [Path(p).name for _, p in drawn] == ["ap_by_config.png"] and len(made) == 1
    plt = plots._plt()
    fig = plots.ap_figure(plt, rep)
    assert [a.get_title() for a in fig.axes if a.get_visible()] == ["coco"]
    plt.close(fig)
    for mp in (ws / "runs").glob("*/attempt-*/metrics.json"):  # no numbers anywhere: no AP figure
        mp.unlink()
    rep = _report(ws)
    assert not [p for p in plots.planned_files(rep) if p[0] == "ap"]
    assert plots.draw(rep, tmp_path / "fig2") == []


def test_loss_figures_bounded_with_a_note(tmp_path):
    from ssflctl.report import write_report

    from ssflctl.report import plots

    ws = make_workspace(tmp_path, n_losses=200, n_seeds=1, datasets=("coco",), logs=True)
    rep = _report(ws)
    paths = write_report(rep, "markdown", tmp_path / "out" / "index.md")
    pngs = sorted(p.name for p in paths if p.suffix == ".png")
    assert "ap_by_config.png" in pngs and "loss_loss0_coco.png" in pngs  # the baseline's curves
    assert len(pngs) == 1 + 1 + plots.LOSS_TOP
    md = (tmp_path / "out" / "index.md").read_text()
    cands = len({r["_cfg"] for r in rep.records})
    note = (f"Loss curves on coco for {1 + plots.LOSS_TOP} of {cands} configurations (the baseline and the best "
            f"{plots.LOSS_TOP} by mean AP); {cands - 1 - plots.LOSS_TOP} left out")
    assert md.count(note) == 1
    from PIL import Image

    for name in pngs:
        with Image.open(tmp_path / "out" / name) as im:
            assert im.size[0] <= plots.MAX_WIDTH_IN * plots.DPI


def test_few_configurations_keep_every_loss_figure(tmp_path):
    from ssflctl.report import plots

    ws = make_workspace(tmp_path, n_losses=3, n_seeds=2, logs=True)
    rep = _report(ws)
    drawn = plots.draw(rep, tmp_path / "fig")
    names = sorted(Path(p).name for _, p in drawn)
    assert names == ["ap_by_config.png"] + sorted(f"loss_loss{i}_{ds}.png" for i in range(3)
                                                  for ds in ("cityscapes", "coco"))
    assert not any("left out" in cap for cap, _ in drawn)


def test_figures_drawn_in_forked_workers_equal_those_drawn_here(tmp_path, monkeypatch):
    """report.fanout: the same files, bytes and captions (with the left-out note on the first loss
    figure of each dataset) whether the figures are drawn in two forked workers or in this process."""
    from ssflctl.report import fanout, plots

    ws = make_workspace(tmp_path, n_losses=40, n_seeds=1, logs=True)
    rep = _report(ws)
    plan = plots.planned_files(rep)
    assert len(plan) >= plots.FORKED_FIGURES  # the forked path is the default at this size
    out = {}
    for workers in ("1", "2"):
        monkeypatch.setenv("SSFLCTL_WORKERS", workers)
        drawn = plots.draw(rep, tmp_path / f"w{workers}", plan)
        out[workers] = [(cap, Path(p).name, Path(p).read_bytes()) for cap, p in drawn]
    assert out["1"] == out["2"]
    assert sum("left out" in cap for cap, name, _ in out["2"] if name != "ap_by_config.png") == 2  # a note per dataset


def _square(x):
    if x == 13:
        raise ValueError("13 is unlucky")
    return x * x + fanout_shared()


def fanout_shared():
    from ssflctl.report import fanout

    return fanout.shared()


def test_fork_map_keeps_order_reads_shared_and_raises_the_workers_error(monkeypatch):
    from ssflctl.report import fanout

    done = []
    assert fanout.fork_map(_square, range(12), shared=100, n=2, on_done=done.append) == [x * x + 100 for x in range(12)]
    assert sum(done) == 12 and fanout.shared() is None  # progress for every item; nothing left shared
    with pytest.raises(ValueError, match="13 is unlucky"):
        fanout.fork_map(_square, range(20), shared=0, n=2)
    monkeypatch.setenv("SSFLCTL_WORKERS", "1")
    assert fanout.workers() == 1
    assert fanout.fork_map(_square, [1, 2], shared=1) == [2, 5]  # serial, same answer
