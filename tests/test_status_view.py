"""`ssflctl status` at scale (issue 21 item 3): the terminal view of 5000 runs lists every run that
needs a look, ``--all`` every run, piped output every run; ``--watch``'s RunDirCache reads a run
directory again only when it changed, and reconcile folds what changed. No timings here: see
benchmarks/bench_status.py."""
from __future__ import annotations

import io
import os
import re

import pytest

from benchmarks.bench_status import make_workspace, start_runner  # noqa: E402  (the benchmark's workspace)
from ssflctl.atomic import write_json
from ssflctl.commands import status as status_mod
from ssflctl.registry.store import Registry
from ssflctl.workdir.layout import RunDirCache, signature

pytestmark = pytest.mark.unit
N = 5000


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("status_view"), N)
    runner = start_runner(ws)
    try:
        with Registry(ws) as reg:
            items = status_mod.view(reg, ws)
        yield ws, items
    finally:
        runner.terminate()
        runner.wait()


def _render(items, show_all=False, width=200) -> str:
    from rich.console import Console

    console = Console(force_terminal=True, width=width, file=io.StringIO(), color_system=None, highlight=False)
    console.print(status_mod.terminal_view("t", items, show_all))
    return console.file.getvalue()


def _listed_ids(text: str) -> set:
    return set(re.findall(r"^(exp\d\d-\S+)", text, re.M))


def test_terminal_view_lists_every_run_that_needs_a_look(big):
    _, items = big
    assert len(items) == N
    states = {i["state"] for i in items}
    assert {"done", "running", "queued", "failed", "unknown", "cancelled"} <= states
    must = {i["run"] for i in items if i["state"] in ("failed", "running", "unknown") or i["attempt"] > 1}
    quiet = {i["run"] for i in items if i["state"] in ("done", "queued", "cancelled") and i["attempt"] == 1}
    assert len(must) > 500 and len(quiet) > 3000
    text = _render(items)
    shown = _listed_ids(text)
    assert must <= shown                       # every failed, running, unknown and retried run, in full
    assert not (shown & quiet)                 # done, queued and cancelled first attempts: counted only
    fail = next(i for i in items if i["state"] == "failed")
    assert fail["note"] in _render(items, width=1000)  # with its reason (wrapped at a narrower width)
    assert re.search(r"│ all\s+│\s+5000 │", text)  # counts by experiment and state, with the total
    assert "`ssflctl status --all` lists every run" in " ".join(text.split())


def test_terminal_view_all_lists_every_run(big):
    _, items = big
    assert _listed_ids(_render(items, show_all=True)) == {i["run"] for i in items}


def test_narrow_terminal_keeps_run_ids_and_notes_whole(big):
    _, items = big
    retried = [i for i in items if i["attempt"] > 1][:3]
    text = _render(retried, width=60)
    for it in retried:
        assert re.search(rf"^{re.escape(it['run'])} ", text, re.M)
        assert " ".join(it["note"].split()) in " ".join(text.split())  # wrapped, not cut


def test_main_in_a_terminal_and_piped(big, capsys, monkeypatch):
    ws, items = big
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stdout is a terminal
    status_mod.main(ws)
    out, err = capsys.readouterr()
    must = {i["run"] for i in items if i["state"] in ("failed", "running", "unknown") or i["attempt"] > 1}
    assert must <= _listed_ids(re.sub(r"\x1b\[[0-9;]*m", "", out))
    assert err.count(" failed: ") == status_mod.FAILURE_TAILS and "more failed runs with a log tail" in err
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # piped: plain, complete
    status_mod.main(ws)
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("run\tloss\tdataset") and "\x1b" not in out
    assert {ln.split("\t")[0] for ln in lines[1:]} == {i["run"] for i in items}


def test_watch_cache_reads_only_changed_runs_and_reconcile_folds_them(big):
    ws, _ = big
    with Registry(ws) as reg:
        cache = RunDirCache()
        first = {i["run"]: i for i in status_mod.view(reg, ws, cache=cache)}
        assert cache.misses == N and cache.hits == 0
        again = {i["run"]: i for i in status_mod.view(reg, ws, cache=cache)}
        assert cache.misses == N and cache.hits == N
        assert {k: (v["state"], v["note"]) for k, v in again.items()} == \
            {k: (v["state"], v["note"]) for k, v in first.items()}
        # a running run writes progress, another finishes: only they are read again
        running = [k for k, v in first.items() if v["state"] == "running" and v["attempt"] == 1][:2]
        ad = [ws / "runs" / k / "attempt-1" for k in running]
        write_json(ad[0] / "progress.json", {"epoch": 7, "max_epochs": 12, "iter": 3500, "max_iters": 5000,
                                             "loss": 0.5})
        write_json(ad[1] / "outcome.json", {"outcome": "done"})
        write_json(ad[1] / "metrics.json", {"bbox": {"AP": 0.3}, "per_class": {}})
        now = {i["run"]: i for i in status_mod.view(reg, ws, cache=cache)}
        assert cache.misses == N + 2 and cache.hits == 2 * N - 2
        assert now[running[0]]["progress"] == "epoch 7/12 iter 3500/5000" and now[running[0]]["loss_val"] == 0.5
        assert now[running[1]]["state"] == "done"
        row = {a["attempt"]: a for a in reg.attempts(running[1])}
        assert row[1]["state"] == "done"  # folded into the registry


def test_signature_sees_atomic_rewrites_and_new_attempts(tmp_path):
    rd = tmp_path / "runs" / "r1"
    (rd / "attempt-1").mkdir(parents=True)
    write_json(rd / "run.json", {"run_id": "r1"})
    write_json(rd / "attempt-1" / "progress.json", {"epoch": 1})
    s0 = signature(rd)
    assert signature(rd) == s0
    (rd / "attempt-1" / "epoch_1.pth").write_bytes(b"x")  # not a watched file, but the directory changed
    s1 = signature(rd)
    assert s1 != s0
    st = os.stat(rd / "attempt-1" / "progress.json")
    write_json(rd / "attempt-1" / "progress.json", {"epoch": 1})  # same bytes, a new file (rename)
    os.utime(rd / "attempt-1" / "progress.json", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert signature(rd) != s1
    s2 = signature(rd)
    (rd / "attempt-2").mkdir()
    assert signature(rd) != s2
    assert signature(tmp_path / "runs" / "nope") == ("missing",)
