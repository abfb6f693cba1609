"""workdir.layout's reading contract (docs/design.md, "AttemptDir reads each file once"): each file of
an attempt dir or a test cell's dir is read at most once per object, a write through the object
makes the next access read its file again, and a new object reads afresh."""
from __future__ import annotations

import collections
import os

import pytest

from ssflctl.workdir import layout
from ssflctl.workdir.records import AttemptInfo, Outcome, Progress, Recovery

pytestmark = pytest.mark.unit


@pytest.fixture
def reads(monkeypatch):
    counts = collections.Counter()
    real = layout._read

    def counting(path):
        counts[os.path.basename(os.fspath(path))] += 1
        return real(path)

    monkeypatch.setattr(layout, "_read", counting)
    return counts


def _attempt(tmp_path):
    a = layout.RunDir(tmp_path / "run").attempt(1)
    a.write_info(AttemptInfo(run_id="run", attempt=1, lr=0.01))
    a.write_progress(Progress(epoch=1, max_epochs=2, iter=5, max_iters=10))
    a.write_outcome(Outcome(outcome="done"))
    a.write_nan({"loss": "loss_cls", "iter": 3, "lr": 0.01})
    a.append_recovery(Recovery(kind="resumed", cause="preempted"))
    a.write_metrics({"bbox": {"AP": 0.5}})
    return layout.AttemptDir(a.path)


def test_an_attempt_reads_each_file_once(tmp_path, reads):
    a = _attempt(tmp_path)
    reads.clear()
    for _ in range(3):
        assert a.info.lr == 0.01 and a.lr == 0.01
        assert a.progress.epoch == 1 and a.outcome.done
        assert a.nan.iter == 3 and [r.kind for r in a.recovery] == ["resumed"]
        assert a.metrics == {"bbox": {"AP": 0.5}} and a.has_metrics
    assert reads == {name: 1 for name in ("attempt.json", "progress.json", "outcome.json", "nan.json",
                                          "recovery.json", "metrics.json")}

    a.write_metrics({"bbox": {"AP": 0.6}})  # a write through the object: read again, once
    a.write_outcome(Outcome(outcome="failed", reason="x"))
    assert a.metrics["bbox"]["AP"] == 0.6 and a.metrics["bbox"]["AP"] == 0.6
    assert a.outcome.outcome == "failed" and not a.outcome.done
    assert reads["metrics.json"] == 2 and reads["outcome.json"] == 2
    assert layout.AttemptDir(a.path).metrics["bbox"]["AP"] == 0.6 and reads["metrics.json"] == 3


def test_missing_files_read_once_as_nothing(tmp_path, reads):
    a = layout.AttemptDir(tmp_path / "attempt-3")
    for _ in range(2):
        assert a.n == 3 and a.info == AttemptInfo() and a.progress is None and a.outcome is None
        assert a.nan is None and a.recovery == [] and a.metrics is None and not a.has_metrics
    assert set(reads.values()) == {1}


def test_a_test_cell_reads_its_metrics_once(tmp_path, reads):
    t = layout.RunDir(tmp_path / "run").attempt(1).test("cell-1")
    assert t.metrics is None and not t.has_metrics
    t.write_metrics({"bbox": {"AP": 0.25}})  # makes the cell's directory
    for _ in range(3):
        assert t.metrics == {"bbox": {"AP": 0.25}} and t.has_metrics
    assert reads["metrics.json"] == 2
    assert t.test_id == "cell-1"
    assert t.metrics_path == tmp_path / "run" / "attempt-1" / "tests" / "cell-1" / "metrics.json"
    assert repr(t) == f"TestDir({str(t.path)!r})"
    assert repr(layout.AttemptDir(t.path.parents[1])) == f"AttemptDir({str(t.path.parents[1])!r})"
