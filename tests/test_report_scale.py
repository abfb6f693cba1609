"""The report's tables at many configurations (issue 21 item 2): per-class AP tables keep the
columns the AP figure shows (the best TOP_N by mean AP and the baseline) with a note of what was
left out, in every format; up to TOP_N + MAX_BASELINES configurations every one is a column (small
reports do not change: tests/golden/report); notes that name values stay bounded."""
from __future__ import annotations

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


def test_per_class_columns_follow_the_ap_figure_at_many_configurations(tmp_path):
    from ssflctl.report import plots, render

    ws = make_workspace(tmp_path, n_losses=200, n_seeds=1, one_dataset=True)
    rep = _report(ws)
    sel = plots.ap_selection(rep)
    labels = dict(zip(rep.cfg_keys, [c[0] for c in rep.configs]))
    assert len(rep.cfg_keys) == 200 and {t.title for t in rep.per_class} == \
        {"Per-class AP — cityscapes (%)", "Per-class AP — coco (%)"}
    for t in rep.per_class:
        ds = t.title.split(" — ")[1].split(" ")[0]
        shown, total, bkeys = sel[ds]
        cols = t.groups[0][1]
        assert len(cols) == len(shown) <= plots.TOP_N + plots.MAX_BASELINES
        assert set(cols) == {labels[k] for k in shown}                      # the AP figure's configurations
        assert cols == [labels[k] for k in rep.cfg_keys if k in set(shown)]  # in table order
        assert all(len(cells) == len(cols) for _, cells in t.rows) and len(t.rows) == (80 if ds == "coco" else 8)
        nb = len([k for k in shown if k in bkeys])
        assert t.notes == [f"Columns: the best {plots.TOP_N} of the {total} configurations with AP on {ds} by mean "
                           f"AP{' and the baseline' if nb else ''}, as in the AP figure; {200 - len(cols)} "
                           "configurations left out (every one is in the main table)."]
    assert len(rep.main.rows) == 200  # the main table keeps every configuration
    md, page, tex = render(rep, "markdown"), render(rep, "html"), render(rep, "latex")
    for t in rep.per_class:
        assert f"- {t.notes[0]}" in md and t.notes[0] in page
    assert "as in the AP figure" in tex


def test_few_configurations_keep_every_column(tmp_path):
    from ssflctl.report import plots

    n = plots.TOP_N + plots.MAX_BASELINES
    ws = make_workspace(tmp_path, n_losses=n, n_seeds=1, one_dataset=True)
    rep = _report(ws)
    for t in rep.per_class:
        assert len(t.groups[0][1]) == n and not t.notes  # every configuration, "—" where it has no numbers


def test_no_baseline_note_names_a_bounded_number_of_values(tmp_path):
    from ssflctl.report import aggregate

    ws = make_workspace(tmp_path, n_losses=300, n_seeds=1, one_dataset=True)
    rep = _report(ws, baseline="loss=focal")
    (note,) = [n for n in rep.notes if n.startswith("No baseline")]
    assert note.startswith("No baseline: no configuration has loss=focal (loss values: loss0, loss1, ")
    assert f", … (300 in all)); pass --baseline loss=<one of them>." in note
    assert note.count(", ") <= aggregate.NAMED_VALUES + 1


def test_a_misspelled_experiment_gets_a_did_you_mean(tmp_path):
    from ssflctl.errors import UserError
    from ssflctl.report import make_report

    ws = make_workspace(tmp_path, n_losses=2, n_seeds=1, datasets=("coco",))
    with pytest.raises(UserError, match=r"no runs of experiment\(s\) bnech; known experiments: bench; "
                                        r"did you mean 'bench'\?"):
        make_report(ws, ["bnech"])
