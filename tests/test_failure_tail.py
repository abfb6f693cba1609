"""A failed run says where it failed: the exception's own traceback (innermost frames, chained
causes included) in outcome.json and at the end of the attempt's text log, shown by `status` and
`logs` instead of the end of mmengine's config dump; `logs -f` stops once the run has ended;
`status --watch` on an ended workspace returns at once."""
from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from ssflctl.node import job
from ssflctl.workdir.layout import AttemptDir
from ssflctl.workdir.records import Outcome, OutcomeKind

pytestmark = pytest.mark.unit
TESTS = Path(__file__).resolve().parent
CONFIG_DUMP = ("2026/01/01 12:00:00 - mmengine - INFO - Config:\n"
               "visualizer = dict(name='visualizer', type='DetLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')])\n"
               "work_dir = '/ws/runs/r/attempt-1'\n")


class AnchorHead:
    def __init__(self, num_classes):
        self.num_classes = num_classes


def _build(cfg):  # mmengine's build_from_cfg: re-raises with the class's location
    try:
        return AnchorHead(**cfg)
    except Exception as e:
        raise type(e)(f"class `RetinaHead` in mmdet/models/dense_heads/retina_head.py: {e}")


def _deep(n, cfg):
    return _build(cfg) if n == 0 else _deep(n - 1, cfg)


def _failure():
    try:
        _deep(8, {"num_classes": 3, "anchor_generatr": {}})
    except TypeError as err:
        return err
    raise AssertionError("no error")


def test_format_failure_keeps_where_each_chained_exception_was_raised():
    err = _failure()
    text = job.format_failure(err)
    lines = text.splitlines()
    assert len(lines) <= job.TRACEBACK_LINES
    # the root cause first, where it was raised, then the re-raise: both exceptions, innermost frames
    assert "return AnchorHead(**cfg)" in text and "in _build" in text
    assert "During handling of the above exception, another exception occurred:" in text
    assert lines[-1].startswith("TypeError: class `RetinaHead` in mmdet/models/dense_heads/retina_head.py: "
                                "AnchorHead.__init__() got an unexpected keyword argument 'anchor_generatr'")
    assert "outer frames]" in text and "in _deep" not in text.split("During handling")[0]
    assert job.exception_reason(ValueError("two\nlines")) == "ValueError: two lines"
    assert "\n" not in job.exception_reason(err)


def test_format_failure_with_an_explicit_cause_and_without_a_traceback():
    try:
        try:
            raise KeyError("anchor_generatr")
        except KeyError as inner:
            raise RuntimeError("could not build the model") from inner
    except RuntimeError as err:
        text = job.format_failure(err)
    assert "KeyError: 'anchor_generatr'" in text
    assert "The above exception was the direct cause of the following exception:" in text
    assert text.rstrip().endswith("RuntimeError: could not build the model")
    assert job.format_failure(ValueError("never raised")) == "ValueError: never raised\n"


def test_outcome_traceback_field_round_trips_and_is_left_out_when_empty():
    out = Outcome.from_json({"outcome": "failed", "reason": "TypeError: x", "log_tail": CONFIG_DUMP,
                             "traceback": "Traceback...\nTypeError: x\n"})
    assert out.tail == "Traceback...\nTypeError: x\n"
    assert Outcome.from_json(out.to_json()).traceback == out.traceback
    old = {"outcome": "done", "reason": "finished", "nan": None, "checkpoint": None, "log_tail": "x",
           "finished_at": None}
    assert Outcome.from_json(old).to_json() == old and Outcome.from_json(old).tail == "x"


def test_append_text_log_ends_the_newest_log_or_makes_one(tmp_path):
    a = AttemptDir(tmp_path / "attempt-1")
    made = a.append_text_log("Traceback\nTypeError: x", stamp="20260101_000000")
    assert made == a.path / "20260101_000000" / "20260101_000000.log" and a.text_logs() == [made]
    (a.path / "20260102_000000").mkdir()
    newer = a.path / "20260102_000000" / "20260102_000000.log"
    newer.write_text(CONFIG_DUMP)
    assert a.append_text_log("TypeError: y\n") == newer
    assert newer.read_text().endswith("work_dir = '/ws/runs/r/attempt-1'\nTypeError: y\n")
    assert a.log_tail(1) == "TypeError: y\n"
    assert a.append_text_log("rank one", rank=1, stamp="20260102_000000").name == "20260102_000000.rank1.log"


# --------------------------------------------------------------------------------------------
# logs -f
# --------------------------------------------------------------------------------------------
def test_follow_prints_what_is_written_until_the_run_ends(tmp_path, capsys, monkeypatch):
    from ssflctl.commands import logs as logs_mod

    log = tmp_path / "a.log"
    log.write_text("line 1\n")
    states = iter([None, None, "done"])
    calls = []

    def ended():
        st = next(states)
        if st is None and len(calls) == 1:
            with open(log, "a") as fh:
                fh.write("line 2\n")
        calls.append(st)
        if st == "done":  # the job's last words, written just before it ended
            with open(log, "a") as fh:
                fh.write("Traceback\nTypeError: x\n")
        return st

    monkeypatch.setattr(logs_mod, "STATE_CHECK_S", 0.0)
    monkeypatch.setattr(logs_mod.time, "sleep", lambda s: None)
    logs_mod._print([log], True, lambda: [log], "missing", ended=ended, what="run r")
    out, err = capsys.readouterr()
    assert out == "line 1\nline 2\nTraceback\nTypeError: x\n"
    assert calls == [None, None, "done"] and "run r is done; stopped following" in err


# --------------------------------------------------------------------------------------------
# end to end: a local workspace with a failed run (the light stand-in job)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def ended_ws(tmp_path, monkeypatch):
    """A local workspace whose runs have all ended: one done, one failed with an exception (its
    outcome.json and text log as the job now writes them, the log otherwise ending in the config dump)."""
    import submit_light_job as light
    from test_submit_local import experiment, wait_all, wait_jobs_ended

    from ssflctl.control import submit as submit_mod

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LIGHT_JOB_SLEEP", "0.05")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "synth").mkdir(parents=True)
    ws = tmp_path / "ws"
    (ws / "fail").mkdir(parents=True)
    (ws / "fail" / "ssfl-s1").write_text("")
    submit_mod.submit(experiment(tmp_path, seeds="[1]"), ws, fns=light.FNS, render=light.light_render)
    items = wait_all(ws, "light")
    wait_jobs_ended(ws, "light")
    failed = next(r for r, i in items.items() if i["state"] == "failed")
    adir = AttemptDir(ws / "runs" / failed / "attempt-1")
    log = adir.text_logs()[-1]
    log.write_text(CONFIG_DUMP)
    err = _failure()
    trace = job._record_failure(adir.path, err)  # what train_attempt does on an exception
    out = json.loads((adir.path / "outcome.json").read_text())
    out.update(reason=job.exception_reason(err), traceback=trace, log_tail=adir.log_tail(40))
    (adir.path / "outcome.json").write_text(json.dumps(out))
    return ws, failed, items


def test_status_and_logs_show_the_exception_not_the_config_dump(ended_ws):
    ws, failed, _ = ended_ws
    proc = run_cli("status", "--workspace", ws, timeout=120)
    assert proc.returncode == 0, proc.stderr
    block = proc.stderr.split(f"{failed} failed: ", 1)[1]
    assert block.startswith("TypeError: class `RetinaHead`")  # the reason: the exception in one line
    assert "return AnchorHead(**cfg)" in block and "unexpected keyword argument 'anchor_generatr'" in block
    assert "work_dir" not in block and "DetLocalVisualizer" not in block
    proc = run_cli("status", "--json", "--workspace", ws, timeout=120)
    item = next(i for i in json.loads(proc.stdout) if i["run"] == failed)
    assert item["traceback"] and item["log_tail"].rstrip().endswith("'anchor_generatr'")
    proc = run_cli("logs", failed, "--workspace", ws, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1].startswith("TypeError: class `RetinaHead`")


def test_logs_follow_and_status_watch_return_once_every_run_has_ended(ended_ws):
    ws, failed, items = ended_ws
    for run in items:
        t0 = time.time()
        proc = run_cli("logs", run, "-f", "--workspace", ws, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert time.time() - t0 < 30 and f"is {items[run]['state']}; stopped following" in proc.stderr
    assert proc.stdout.strip()  # what the log holds is printed before it stops
    t0 = time.time()
    proc = run_cli("status", "--watch", "--interval", "30", "--workspace", ws, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 20  # no refresh waited for: nothing can change
    assert proc.stdout.count("run\tloss\tdataset") == 1 and failed in proc.stdout
    assert "TypeError: class `RetinaHead`" in proc.stderr  # the failed run's traceback, as plain status shows it


def test_watch_stops_for_every_state_that_is_not_active(monkeypatch, tmp_path):
    """done, failed, cancelled, unknown and pending end --watch (piped and in a terminal) without a wait."""
    from ssflctl.commands import status as status_mod

    items = [{"run": f"r{k}", "experiment": "e", "state": s, "note": "", "attempt": 1, "tests": [], "log_tail": None}
             for k, s in enumerate(("done", "failed", "cancelled", "unknown", "pending"))]
    assert not status_mod.any_active(items)
    assert all(status_mod.any_active([dict(items[0], state=s)]) for s in ("queued", "running", "submitting"))

    class Reg:
        def close(self):
            pass

    monkeypatch.setattr(status_mod, "open_registry", lambda ws: Reg())
    monkeypatch.setattr(status_mod, "view", lambda *a, **k: [dict(i, loss="", dataset="", seed="", lr=None, job="",
                                                                     gpus="", progress="", loss_val=None, elapsed="")
                                                              for i in items])

    def no_sleep(s):
        raise AssertionError("--watch waited on an ended workspace")

    monkeypatch.setattr(status_mod.time, "sleep", no_sleep)
    for terminal in (False, True):
        monkeypatch.setattr("rich.console.Console.is_terminal", property(lambda self, t=terminal: t))
        assert len(status_mod.main(tmp_path, watch=True, interval=30)) == 5
