"""Issue 20.6-10: a crash-consistent workspace, on the real local Slurm cluster.

The CLI (tests/crash_driver.py: the real command line with the LIGHT stand-in job) is killed at
known points (a hook in the driver) and at random ones (a loop with a fixed seed), runs are
cancelled while their submit is in flight, the registry is truncated or overwritten, and after
each step the registry, the run directories and ``squeue`` must agree: no run lost, none
duplicated (never two live train jobs for one run, no job the registry does not know), no ghost
attempt (an attempt row left open, or an attempt directory that never ran counting against the
retry budget).

The jobs are held (``--begin=now+1hour``): nothing runs on the shared cluster, every job these
tests make stays in the queue until they cancel it, and every job is cancelled at the end.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO
from ssflctl.registry.store import Registry
from registry_damage import fold_wal  # noqa: E402  (tests/)

pytestmark = pytest.mark.slurm
TESTS = Path(__file__).resolve().parent
DRIVER = TESTS / "crash_driver.py"

EXP = """\
name: {name}
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [focal, ssfl]
  seed: [1]
params: {{max_epochs: 1}}
resources: {{gpus: 0, cpus: 1, mem: 200M, time: "00:05:00"}}
executor:
  type: slurm
  slurm:
    partition: {partition}
    qos: {qos}
    sbatch: {{begin: now+1hour}}
"""
LIVE = ("PENDING", "RUNNING", "CONFIGURING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
        "SIGNALING", "STAGE_OUT")


@pytest.fixture
def crash(tmp_path, slurm_cluster, monkeypatch):
    """An experiment of 2 runs with a name of its own; every job of it is cancelled afterwards."""
    name = "crash" + uuid.uuid4().hex[:6]
    (tmp_path / "data" / "synth").mkdir(parents=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(EXP.format(name=name, root=tmp_path / "data" / "synth", **slurm_cluster))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("CRASH_HOOK", None)
    monkeypatch.chdir(tmp_path)
    ctx = {"name": name, "path": path, "ws": tmp_path / "ws", "env": env}
    yield ctx
    ids = list(live_jobs(name))
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def cli(ctx, *args, hook=None, **kw):
    env = dict(ctx["env"], **({"CRASH_HOOK": hook} if hook else {}))
    return subprocess.Popen([sys.executable, str(DRIVER), *map(str, args), "--workspace", str(ctx["ws"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def run(ctx, *args, hook=None, timeout=180):
    p = cli(ctx, *args, hook=hook)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def live_jobs(name):
    """{job id: (name, state)} of this experiment's jobs that squeue holds and that may still run."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%j|%T"], capture_output=True, text=True,
                         check=True).stdout
    jobs = {}
    for line in out.splitlines():
        jid, jname, st = line.strip().split("|")
        if f"-{name}-" in jname and st in LIVE:
            jobs[jid] = (jname, st)
    return jobs


def run_of_job(ws, jid, jname):
    """(run id, "train"|"test") of a live job, from its name and its submission's manifest."""
    kind, rest = jname.split("-", 1)
    sid_gi = rest.rsplit("-", 1)
    gi = int(sid_gi[1])
    sid = "-".join(sid_gi[0].split("-")[-3:])
    manifest = json.loads((ws / "submissions" / sid / "manifest.json").read_text())
    run_ids = manifest["groups"][gi]["run_ids"]
    idx = int(jid.split("_")[1]) if "_" in jid else 0
    return run_ids[idx], kind


def reconcile_now(ws, name):
    """What `ssflctl status` does first (fold files and scheduler into the registry)."""
    from ssflctl.control.reconcile import reconcile

    with Registry(ws) as reg:
        reconcile(reg, ws, name)


def check_consistent(ctx, expect_runs=2):
    """The registry, the run directories and squeue agree (no CLI process of ours is alive)."""
    ws, name = ctx["ws"], ctx["name"]
    reconcile_now(ws, name)
    with Registry(ws) as reg:
        rows = {r["run_id"]: r for r in reg.run_rows(name)}
        attempts = {rid: reg.attempts(rid) for rid in rows}
    # no run lost
    assert len(rows) == expect_runs, rows.keys()
    for rid, r in rows.items():
        if not (ws / "runs" / rid / "run.json").is_file():  # claimed by a submit killed before it rendered
            assert r["state"] in ("pending", "failed") and not r["job_id"] and not attempts[rid], dict(r)
        assert r["state"] != "submitting", (rid, r["reason"])  # no claim of a dead submit is left
        assert r["claim_pid"] is None, (rid, dict(r))
    # none duplicated, no job the registry does not know, none alive for a run not queued/running
    live = live_jobs(name)
    seen = {}
    for jid, (jname, _) in live.items():
        rid, kind = run_of_job(ws, jid, jname)
        assert (rid, kind) not in seen, f"two live {kind} jobs for {rid}: {seen[(rid, kind)]} and {jid}"
        seen[(rid, kind)] = jid
        r = rows[rid]
        assert r["state"] in ("queued", "running"), f"{kind} job {jid} alive for {rid} in state {r['state']}"
        assert jid == (r["job_id"] if kind == "train" else r["test_job_id"]), (jid, dict(r))
    for rid, r in rows.items():
        if r["state"] in ("queued", "running"):  # held jobs: a queued run has both of its jobs in the queue
            assert seen.get((rid, "train")) == r["job_id"] and seen.get((rid, "test")) == r["test_job_id"], \
                (rid, dict(r), live)
    # no ghost attempt: open rows only for the current attempt of an active run; no job ever ran, so a
    # run has at most one attempt directory (attempts that never ran gave their number back)
    for rid, atts in attempts.items():
        r = rows[rid]
        for a in atts:
            if a["state"] in ("pending", "queued", "running", "submitting"):
                assert r["state"] in ("queued", "running") and a["attempt"] == r["attempt"], (rid, dict(a), dict(r))
        dirs = sorted(p.name for p in (ws / "runs" / rid).glob("attempt-*"))
        assert dirs in ([], ["attempt-1"]), (rid, dirs)
        assert {a["attempt"] for a in atts} <= {1}, (rid, [dict(a) for a in atts])
    return rows, live


def wait_out(p, timeout=120):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


# ---------------------------------------------------------------------------------------------- 6

def test_cancel_during_submit_after_sbatch_wins_and_its_jobs_are_cancelled(crash):
    """Cancel while the submit holds job ids it has not recorded yet: cancel's transaction decides,
    the submit cancels the jobs it sent, and both say so."""
    t0 = time.time()
    sub = cli(crash, "submit", crash["path"], hook="pause_after_send:4")
    assert sub.stdout.readline().strip() == "sent"
    assert len(live_jobs(crash["name"])) == 4  # 2 train + 2 test, not yet in the registry
    rc, out, err = run(crash, "cancel", crash["name"])
    assert rc == 0, err
    assert out.startswith("cancelled 2 runs"), out
    src, sout, serr = wait_out(sub)
    assert src == 0, serr
    assert "submitted 0 runs" in sout and sout.count("cancelled by `ssflctl cancel` while being submitted") == 2, sout
    assert live_jobs(crash["name"]) == {}
    rows, _ = check_consistent(crash)
    assert {r["state"] for r in rows.values()} == {"cancelled"}
    with Registry(crash["ws"]) as reg:
        for rid in rows:
            assert [(a["attempt"], a["state"]) for a in reg.attempts(rid)] == [(1, "cancelled")]
    # submit again: the cancelled runs go out with attempt 1 again (it never ran)
    rc, out, err = run(crash, "submit", crash["path"])
    assert rc == 0 and "submitted 2 runs" in out, (out, err)
    rows, live = check_consistent(crash)
    assert {r["state"] for r in rows.values()} == {"queued"} and len(live) == 4
    assert {r["attempt"] for r in rows.values()} == {1}
    print(f"\ncancel during submit (after sbatch): {time.time() - t0:.1f}s")


def test_cancel_during_submit_before_sbatch_sends_nothing(crash):
    sub = cli(crash, "submit", crash["path"], hook="pause_before_send:3")
    assert sub.stdout.readline().strip() == "sending"
    rc, out, err = run(crash, "cancel", crash["name"])
    assert rc == 0 and out.startswith("cancelled 2 runs"), (out, err)
    src, sout, serr = wait_out(sub)
    assert src == 0 and sout.count("cancelled by `ssflctl cancel` before it was sent") == 2, (sout, serr)
    assert live_jobs(crash["name"]) == {}
    rows, _ = check_consistent(crash)
    assert {r["state"] for r in rows.values()} == {"cancelled"}
    assert not list(crash["ws"].glob("runs/*/attempt-*"))  # rendered, never sent: discarded
    assert not list(crash["ws"].glob("submissions/*/manifest.json"))  # sbatch never called


# ---------------------------------------------------------------------------------------------- 7

def _damage(ws, how, rng=None):
    path = ws / "registry.sqlite"
    fold_wal(path)
    if how == "truncate":  # a killed copy, a full disk
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate((rng or random).randrange(0, size // 2))
    else:
        path.write_bytes(b"this is not a database\n" * 300)


def test_damaged_registry_is_rebuilt_from_the_run_directories(crash):
    ws = crash["ws"]
    rc, out, err = run(crash, "submit", crash["path"])
    assert rc == 0, err
    before, live = check_consistent(crash)
    jobs = {rid: (r["job_id"], r["test_job_id"]) for rid, r in before.items()}
    for how in ("truncate", "garbage"):
        _damage(ws, how, random.Random(7))
        rc, out, err = run(crash, "status", "--json")
        assert rc == 0 and "Traceback" not in err, err
        notes = [ln for ln in err.splitlines() if " was damaged (" in ln or "no registry row" in ln]
        assert len(notes) == 1, err
        assert len(json.loads(out)) == 2  # never a silent empty state
        if " was damaged (" in notes[0]:
            aside = notes[0].split("kept it as ")[1].split(";")[0]
            assert (ws / aside).is_file(), notes[0]
        rows, live2 = check_consistent(crash)
        assert {rid: (r["job_id"], r["test_job_id"]) for rid, r in rows.items()} == jobs
        assert {r["state"] for r in rows.values()} == {"queued"} and live2 == live
        # the next submit sends nothing again
        rc, out, err = run(crash, "submit", crash["path"])
        assert rc == 0 and "submitted 0 runs" in out, (out, err)
        assert live_jobs(crash["name"]) == live
    assert len(list(ws.glob("registry.sqlite.damaged-*"))) >= 1


def test_damaged_registry_is_rebuilt_with_its_test_cells(crash):
    """test_matrix: the cells come back with their test jobs (runs/<id>/test_jobs.json); the next submit
    asks Slurm about them first: the cell whose job was cancelled is sent again, once, after its run's
    train job; the others, still queued, are not."""
    ws, name = crash["ws"], crash["name"]
    crash["path"].write_text(crash["path"].read_text() + "test_matrix:\n  model.test_cfg.score_thr: [0.05, 0.5]\n")
    rc, out, err = run(crash, "submit", crash["path"])
    assert rc == 0, err
    with Registry(ws) as reg:
        before = {r["test_id"]: (r["job_id"], r["after_job_id"]) for r in reg.test_rows(name)}
    cells = {j for j, (n, _) in live_jobs(name).items() if n.startswith("testcell-")}
    assert len(before) == 4 and {j for j, _ in before.values()} == cells
    gone = sorted(before)[0]
    subprocess.run(["scancel", before[gone][0]], check=True)  # ended without results
    _damage(ws, "garbage")
    rc, out, err = run(crash, "status", "--json")
    assert rc == 0 and " was damaged (" in err and "Traceback" not in err, err
    with Registry(ws) as reg:
        rows = {r["test_id"]: r for r in reg.test_rows(name)}
    assert {t: (r["job_id"], r["after_job_id"]) for t, r in rows.items()} == before
    assert {t: r["state"] for t, r in rows.items()} == {t: "cancelled" if t == gone else "queued" for t in before}
    rc, out, err = run(crash, "submit", crash["path"])
    assert rc == 0 and "submitted 0 runs" in out, (out, err)
    with Registry(ws) as reg:
        rows = {r["test_id"]: r for r in reg.test_rows(name)}
        train = {r["run_id"]: r["job_id"] for r in reg.run_rows(name)}
    live = {j for j, (n, _) in live_jobs(name).items() if n.startswith("testcell-")}
    assert {t: r["job_id"] for t, r in rows.items() if t != gone} == {t: j for t, (j, _) in before.items() if t != gone}
    assert rows[gone]["job_id"] not in cells and rows[gone]["after_job_id"] == train[rows[gone]["run_id"]]
    assert live == cells - {before[gone][0]} | {rows[gone]["job_id"]}  # one live job per cell


# ---------------------------------------------------------------------------------------------- 8

def test_attempts_of_killed_or_cancelled_submits_are_closed_and_spend_no_budget(crash):
    ws = crash["ws"]
    for _ in range(3):  # killed after rendering, before sbatch
        p = cli(crash, "submit", crash["path"], hook="pause_before_send:30")
        assert p.stdout.readline().strip() == "sending"
        p.kill()
        p.wait()
        check_consistent(crash)  # its rendered attempts are closed (never ran)
    with Registry(ws) as reg:
        states = [(a["attempt"], a["state"], a["reason"]) for r in reg.run_rows(crash["name"])
                  for a in reg.attempts(r["run_id"])]
    assert all(s == "cancelled" and r.startswith("never ran") for _, s, r in states), states
    # a cancelled queued run: its attempt closed; submitted again, it starts again at attempt 1
    rc, out, err = run(crash, "submit", crash["path"])
    assert rc == 0 and "submitted 2 runs" in out, (out, err)
    rc, out, err = run(crash, "cancel", crash["name"])
    assert rc == 0 and out.startswith("cancelled 2 runs"), (out, err)
    rows, _ = check_consistent(crash)
    assert {r["state"] for r in rows.values()} == {"cancelled"}
    rc, out, err = run(crash, "submit", crash["path"])
    assert rc == 0 and "submitted 2 runs" in out, (out, err)
    rows, _ = check_consistent(crash)
    assert {(r["state"], r["attempt"]) for r in rows.values()} == {("queued", 1)}


# ---------------------------------------------------------------------------------------------- 9

def test_job_without_its_pickle_is_not_adopted_but_cancelled_and_resubmitted(crash):
    """Killed between the train sbatch and submitit's rename of the pickle: the train array exists
    but cannot run, and no test array was sent. The next submit cancels it and sends both again."""
    ws = crash["ws"]
    rc, out, err = run(crash, "submit", crash["path"], hook="kill_at_pickle")
    assert rc == -signal.SIGKILL, (rc, err)
    orphans = live_jobs(crash["name"])
    assert len(orphans) == 2 and all(n.startswith("train-") for n, _ in orphans.values()), orphans
    rc, out, err = run(crash, "submit", crash["path"])
    assert rc == 0 and "submitted 2 runs" in out, (out, err)
    rows, live = check_consistent(crash)
    assert not set(orphans) & set(live)
    for rid, r in rows.items():
        sub = ws / "submissions" / r["submission_id"] / "train"
        assert (sub / f"{r['job_id']}_submitted.pkl").is_file() and r["test_job_id"]
        with Registry(ws) as reg:
            assert any(e["kind"] == "not adopted" and "no submission file" in (e["message"] or "")
                       for e in reg.events(rid)), reg.events(rid)
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join({j.split("_")[0] for j in orphans}),
                          "-o", "JobID,State"],
                         capture_output=True, text=True).stdout
    assert out and all("CANCELLED" in ln for ln in out.splitlines() if ln), out


def test_test_array_left_held_is_not_adopted_but_cancelled_and_sent_again(crash):
    """test_matrix: killed after the test-cell array was sent (held) and before it was released: its
    jobs would never start. The next submit does not adopt them: it cancels them and sends the cells
    again (the trainings, recorded before, are not sent again)."""
    ws = crash["ws"]
    crash["path"].write_text(crash["path"].read_text() + "test_matrix:\n  model.test_cfg.score_thr: [0.05, 0.5]\n")
    rc, out, err = run(crash, "submit", crash["path"], hook="kill_at_release")
    assert rc == -signal.SIGKILL, (rc, err)
    orphans = {j: n for j, (n, _) in live_jobs(crash["name"]).items() if n.startswith("testcell-")}
    assert len(orphans) == 4, live_jobs(crash["name"])
    rc, out, err = run(crash, "submit", crash["path"])
    assert rc == 0 and "submitted 0 runs" in out, (out, err)
    live = live_jobs(crash["name"])
    assert not set(orphans) & set(live)
    with Registry(ws) as reg:
        cells = reg.test_rows(crash["name"])
        train = {r["run_id"]: r["job_id"] for r in reg.run_rows(crash["name"])}
        assert {r["state"] for r in cells} == {"queued"} and len(cells) == 4
        assert {r["job_id"] for r in cells} == {j for j, (n, _) in live.items() if n.startswith("testcell-")}
        assert all(r["after_job_id"] == train[r["run_id"]] for r in cells)
        assert all(any(e["kind"] == "not adopted" and "left held" in (e["message"] or "") for e in reg.events(rid))
                   for rid in train)
        ever = {j for rid in train for _, j, _, _ in reg.test_job_ids_ever(rid)}
    assert set(orphans) <= ever  # cancel can still reach them
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join({j.split("_")[0] for j in orphans}),
                          "-o", "JobID,State"], capture_output=True, text=True).stdout
    assert out and all("CANCELLED" in ln for ln in out.splitlines() if ln), out


# ---------------------------------------------------------------------------------------------- the loop

def test_killed_at_random_points_the_workspace_stays_consistent(crash):
    """Submit and cancel, each SIGKILLed after a random delay (or left to finish), sometimes at the
    same time, and now and then a truncated or garbage registry: after every round the registry,
    the run directories and squeue agree."""
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20")))
    ws, t0 = crash["ws"], time.time()
    rounds = int(os.environ.get("CRASH_ROUNDS", "24"))
    kinds = []
    for i in range(rounds):
        kill = (lambda: None if rng.random() < 0.3 else rng.uniform(0.3, 2.5))  # a submit takes ~1.5-2.5 s here
        procs = [("submit", cli(crash, "submit", crash["path"]), kill())]
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.0, 2.0))
            procs.append(("cancel", cli(crash, "cancel", crash["name"]), kill()))
        start = time.time()
        results = {}
        for what, p, kill_after in procs:
            if kill_after is not None:
                try:
                    p.wait(timeout=max(0.0, start + kill_after - time.time()))
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
            out, err = p.communicate(timeout=150)
            assert "Traceback" not in err, (what, err)
            results[what] = (p.returncode, out, err)
        kinds.append("+".join(f"{w}:{'killed' if r[0] == -9 else r[0]}" for w, r in results.items()))
        rows, live = check_consistent(crash)
        rc, out, _ = results.get("cancel", (None, "", ""))
        if rc == 0:  # what cancel reported is what happened, unless a later submit claimed the run again
            with Registry(ws) as reg:
                for rid in [x.strip() for x in out.split(":", 1)[1].split("(")[0].split(",")] if ":" in out else []:
                    ev = [e["kind"] for e in reg.events(rid)]
                    if "claimed" not in ev[len(ev) - ev[::-1].index("cancel"):]:
                        assert rows[rid]["state"] == "cancelled" and all(
                            run_of_job(ws, j, n)[0] != rid for j, (n, _) in live.items()), (rid, ev)
        if rng.random() < 0.25:
            _damage(ws, rng.choice(["truncate", "garbage"]), rng)
            kinds[-1] += "+damaged"
    rc, out, err = run(crash, "cancel", crash["name"])
    assert rc == 0, err
    check_consistent(crash)
    assert live_jobs(crash["name"]) == {}
    print(f"\n{rounds} rounds in {time.time() - t0:.0f}s: {kinds}")
