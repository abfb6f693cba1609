"""What `ssflctl status` / `submit` / `cancel` say on the REAL local cluster (scripts/slurm-cluster.sh)
for each kind of issue 14: holds, a QOS limit, preemption, a node failure, a time limit, a killed
process, accounting (slurmdbd) and the controller (slurmctld) stopped, and the loop of failures,
submits and restores that must never leave two live train jobs for one run.

Runs use the LIGHT stand-in job (tests/submit_light_job.py); everything a test changes on the shared
cluster (a node DOWN, a daemon stopped) is restored in a ``finally``, and every job is cancelled.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

import submit_light_job as light
from conftest import REPO, run_cli
from ssflctl.control import submit as submit_mod
from ssflctl.registry.store import Registry

pytestmark = pytest.mark.slurm
TESTS = Path(__file__).resolve().parent
CLUSTER = Path("/work/main/scripts/slurm-cluster.sh")
SCRIPT = CLUSTER if CLUSTER.exists() else REPO / "scripts" / "slurm-cluster.sh"
STATE = Path("/var/lib/ssflctl-slurm")
_JOBS: list = []

EXP = """\
name: {name}
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [focal]
  seed: {seeds}
params: {{max_epochs: 1}}
resources: {{gpus: {gpus}, cpus: 1, mem: 300M, time: "{time}"}}
test: false
executor:
  type: slurm
  slurm:
    partition: gpulab02
    qos: {qos}
    max_num_timeout: {max_num_timeout}
    sbatch: {sbatch}
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory, slurm_cluster):
    root = tmp_path_factory.mktemp("status_slurm")
    (root / "data").mkdir()
    old = {k: os.environ.get(k) for k in ("PYTHONPATH", "LIGHT_JOB_SLEEP", "LIGHT_JOB_STEPS")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), old["PYTHONPATH"] or ""])
    os.environ["LIGHT_JOB_SLEEP"], os.environ["LIGHT_JOB_STEPS"] = "40", "6"  # alive for minutes
    yield root
    subprocess.run(["scancel", *_JOBS], capture_output=True, timeout=60) if _JOBS else None
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def exp(root, name, seeds="[1]", gpus=0, qos="gpulab02", time_="00:05:00", sbatch="{}", max_num_timeout=3):
    p = root / f"{name}.yaml"
    p.write_text(EXP.format(name=name, root=root / "data", seeds=seeds, gpus=gpus, qos=qos, time=time_,
                            sbatch=sbatch, max_num_timeout=max_num_timeout))
    return p


def submit(path, ws):
    res = submit_mod.submit(path, ws, fns=light.FNS, render=light.light_render)
    _JOBS.extend(j for p in res.submitted for j in (p.job_id, p.test_job_id) if j)
    return res


def view(ws, name):
    from ssflctl.commands.status import view as v

    with Registry(ws) as reg:
        return {i["run"]: i for i in v(reg, ws, name)}


def wait(fn, timeout, what, every=1.0):
    end, last = time.monotonic() + timeout, None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not after {timeout:g} s (last: {last!r})")


def wait_run(ws, name, pred, timeout, what):
    def check():
        items = view(ws, name)
        return items if items and all(pred(i) for i in items.values()) else None
    return wait(check, timeout, what)


def status_json(ws, *args):
    proc = run_cli("status", *args, "--json", "--workspace", ws, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {d["run"]: d for d in json.loads(proc.stdout)}, proc.stderr


def squeue_live(*ids):
    """Live (not ended) records of these jobs: {id: state}."""
    bases = sorted({str(j).split("_")[0] for j in ids})
    out = subprocess.run(["squeue", "-h", "--array", "-j", ",".join(bases), "-o", "%i|%T"], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise AssertionError(out.stderr)
    return dict(ln.split("|", 1) for ln in out.stdout.split())


def cluster_up():
    up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr


def stop(daemon: str) -> int:
    """SIGTERM one of the cluster's daemons (pid file of scripts/slurm-cluster.sh); its pid."""
    pidfile = STATE / "run" / f"{daemon}.pid"
    if os.geteuid() != 0 or not pidfile.exists():
        pytest.skip(f"needs root and the cluster of scripts/slurm-cluster.sh ({pidfile})")
    pid = int(pidfile.read_text().strip())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == daemon
    os.kill(pid, 15)
    wait(lambda: not Path(f"/proc/{pid}").exists(), 120, f"{daemon} stopped", every=0.2)
    return pid


@pytest.fixture(scope="module")
def timeout_run(base):
    """A run that ignores Slurm's SIGUSR2 warning and has no requeue left, started first: the module
    waits for its TIMEOUT (Slurm checks time limits every 30 s) only once, in the last test."""
    ws = base / "ws-timeout"
    os.environ["LIGHT_JOB_IGNORE_USR2"] = "1"
    try:
        res = submit(exp(base, "timelimit", time_="00:01:00", max_num_timeout=0), ws)
    finally:
        os.environ.pop("LIGHT_JOB_IGNORE_USR2", None)
    return ws, res.submitted[0].job_id, time.monotonic()


# ------------------------------------------------------------------------------------------------


def test_held_run_shows_the_hold_and_how_to_release_it(base, timeout_run):
    ws = base / "ws-held"
    jid = submit(exp(base, "held", sbatch="{hold: true}"), ws).submitted[0].job_id
    (item,) = wait_run(ws, "held", lambda i: "JobHeldUser" in i["note"], 120, "held by the user").values()
    assert item["state"] == "queued" and f"scontrol release {jid}" in item["note"]
    got, _ = status_json(ws, "held")
    (d,) = got.values()
    assert d["scheduler"]["reason"] == "JobHeldUser" and d["scheduler"]["known"] is True
    assert f"scontrol release {jid}" in d["scheduler"]["hint"] and d["job_ids"] == [jid]
    # an admin's hold (scontrol hold by root) on a job waiting for its begin time
    jid2 = submit(exp(base, "adminheld", sbatch='{begin: "now+1hour"}'), ws).submitted[0].job_id
    wait_run(ws, "adminheld", lambda i: "BeginTime" in i["note"], 120, "waiting for its begin time")
    subprocess.run(["scontrol", "hold", jid2], check=True, timeout=30)
    (item,) = wait_run(ws, "adminheld", lambda i: "JobHeldAdmin" in i["note"], 120, "held by an admin").values()
    assert item["state"] == "queued" and f"scontrol release {jid2}" in item["note"]
    assert submit(exp(base, "held", sbatch="{hold: true}"), ws).submitted == []  # queued: never sent twice
    proc = run_cli("cancel", "held", "--workspace", ws)
    assert proc.returncode == 0 and f"(jobs {jid})" in proc.stdout, proc.stdout + proc.stderr
    run_cli("cancel", "adminheld", "--workspace", ws)


def test_qos_limit_shows_its_reason(base, timeout_run):
    ws = base / "ws-qos"
    res = submit(exp(base, "qoslimit", seeds="[1, 2]", gpus=1, qos="gpu1user"), ws)
    try:
        items = wait_run(ws, "qoslimit", lambda i: i["state"] in ("running", "queued"), 120, "submitted")
        items = wait(lambda: (lambda it: it if sorted(i["state"] for i in it.values()) == ["queued", "running"]
                              and any("QOSMaxGRESPerUser" in i["note"] for i in it.values()) else None)(
            view(ws, "qoslimit")), 180, "one run running, the other pending on the QOS GPU limit")
        (waiting,) = [i for i in items.values() if i["state"] == "queued"]
        assert waiting["note"] == "QOSMaxGRESPerUser"  # clears by waiting: no hint
        got, _ = status_json(ws, "qoslimit")
        assert got[waiting["run"]]["scheduler"]["reason"] == "QOSMaxGRESPerUser"
    finally:
        run_cli("cancel", "qoslimit", "--workspace", ws)
    wait(lambda: not squeue_live(*(p.job_id for p in res.submitted)), 120, "cancelled")


def test_preempted_run_is_failed_and_the_next_submit_resubmits_it(base, timeout_run):
    ws = base / "ws-preempt"
    path = exp(base, "preempted", gpus=2, qos="victim-cancel")
    jid = submit(path, ws).submitted[0].job_id
    wait_run(ws, "preempted", lambda i: i["state"] == "running", 180, "victim running")
    hi = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "-J", "ssflctl-preemptor", "--qos=preemptor",
                         "--gres=gpu:1", "--wrap=sleep 2"], capture_output=True, text=True, timeout=30)
    assert hi.returncode == 0, hi.stderr
    _JOBS.append(hi.stdout.strip())
    (item,) = wait_run(ws, "preempted", lambda i: i["state"] == "failed", 180, "victim preempted").values()
    assert f"train job {jid} PREEMPTED" in item["note"] and "`ssflctl submit` again" in item["note"]
    again = submit(path, ws)
    assert [p.run.run_id for p in again.submitted] == [item["run"]]
    assert again.submitted[0].job_id != jid and "PREEMPTED" in again.submitted[0].why
    run_cli("cancel", "preempted", "--workspace", ws)


def test_killed_process_names_sigkill_and_shows_the_log_tail(base, timeout_run):
    ws = base / "ws-kill"
    submit(exp(base, "killed"), ws)
    (item,) = wait_run(ws, "killed", lambda i: i["state"] == "running", 180, "running").values()
    env = wait(lambda: (lambda p: json.loads(p.read_text()) if p.exists() else None)(
        ws / "runs" / item["run"] / "attempt-1" / "env.json"), 120, "env.json")
    os.kill(env["pid"], 9)  # as the kernel's OOM killer would
    # sacct writes the batch step's signal a moment after the job's own record: wait for both
    (item,) = wait_run(ws, "killed", lambda i: i["state"] == "failed" and "SIGKILL" in i["note"], 180,
                       "failed with the signal named").values()
    assert "killed by SIGKILL (signal 9)" in item["note"], item["note"]
    assert "raise resources.mem or lower batch_size" in item["note"]
    assert item["log_tail"] and "Killed" in item["log_tail"]
    proc = run_cli("status", "killed", "--workspace", ws, timeout=120)
    assert proc.returncode == 0 and f"{item['run']} failed: " in proc.stderr and "  | " in proc.stderr


def test_accounting_stopped_keeps_the_state_and_names_sacct(base, timeout_run):
    ws = base / "ws-dbd"
    jid = submit(exp(base, "dbddown"), ws).submitted[0].job_id
    wait_run(ws, "dbddown", lambda i: i["state"] == "running", 180, "running")
    try:
        stop("slurmdbd")
        got, err = status_json(ws, "dbddown")
        (d,) = got.values()
        # the controller still answers: the state is known from squeue; sacct's failure is said
        assert d["state"] == "running" and d["scheduler"]["known"] is True and d["scheduler"]["source"] == "squeue"
        assert "Problem talking to the database" in d["scheduler"]["error"]
        notes = [ln for ln in err.splitlines() if "could not be asked" in ln]
        assert len(notes) == 1 and "sacct -P -n --noconvert -j" in notes[0] and "database" in notes[0]
        # a job the controller has forgotten (ended before MinJobAge): nobody can say; the state is kept
        with Registry(ws) as reg:
            rid = reg.list_runs("dbddown")[0]["run_id"]
            reg.update_run(rid, job_id="999999", submitted_at="2000-01-01T00:00:00+00:00")
        got, err = status_json(ws, "dbddown")
        (d,) = got.values()
        assert d["state"] == "running" and d["scheduler"]["known"] is False
        assert "Problem talking to the database" in d["scheduler"]["error"] and "last known state kept" in d["note"]
        assert submit(exp(base, "dbddown"), ws).submitted == []  # may still exist: never sent again
        with Registry(ws) as reg:
            reg.update_run(rid, job_id=jid)
    finally:
        cluster_up()
    got, err = status_json(ws, "dbddown")
    assert list(got.values())[0]["scheduler"]["known"] is True and "could not be asked" not in err
    run_cli("cancel", "dbddown", "--workspace", ws)


def test_controller_stopped_is_unknown_and_keeps_the_state(base, timeout_run):
    ws = base / "ws-ctld"
    jid = submit(exp(base, "ctlddown"), ws).submitted[0].job_id
    wait_run(ws, "ctlddown", lambda i: i["state"] == "running", 180, "running")
    try:
        stop("slurmctld")
        got, err = status_json(ws, "ctlddown")
        (d,) = got.values()
        assert d["state"] == "running" and d["scheduler"]["known"] is False
        assert "Unable to contact slurm controller" in d["scheduler"]["error"]
        assert "last known state kept" in d["note"] and d["job_ids"] == [jid]
        notes = [ln for ln in err.splitlines() if "could not be asked" in ln]
        assert len(notes) == 1 and "squeue" in notes[0] and "Unable to contact slurm controller" in notes[0]
        assert submit_mod.submit(exp(base, "ctlddown"), ws, dry_run=True).submitted == []
    finally:
        cluster_up()
    (item,) = wait_run(ws, "ctlddown", lambda i: (i.get("scheduler") or {}).get("known"), 180, "known again").values()
    assert item["state"] == "running" and item["job"] == jid
    run_cli("cancel", "ctlddown", "--workspace", ws)


def test_loop_of_query_failures_submits_and_restores_never_duplicates(base, timeout_run, tmp_path):
    """submit, break the queries (a failing or hanging sacct/squeue first on PATH), status, submit,
    restore, status: never two live train jobs for one run; cancel leaves nothing behind."""
    ws = base / "ws-loop"
    path = exp(base, "loop", seeds="[1, 2]")
    first = submit(path, ws)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    broken = {
        "sacct down": {"sacct": "echo 'sacct: error: Problem talking to the database: Connection refused' >&2; exit 1"},
        "squeue down": {"squeue": "echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)'"
                                  " >&2; exit 1"},
        "both down": {"sacct": "echo 'sacct: error: slurmdbd: Connection refused' >&2; exit 1",
                      "squeue": "echo 'squeue: error: Socket timed out on send/recv operation' >&2; exit 1"},
    }
    rng = random.Random(14)
    every = set()
    for it in range(3):
        kind = rng.choice(sorted(broken))
        for f in bin_.iterdir():
            f.unlink()
        for cmd, body in broken[kind].items():
            (bin_ / cmd).write_text("#!/bin/sh\n" + body + "\n")
            (bin_ / cmd).chmod(0o755)
        old_path = os.environ["PATH"]
        os.environ["PATH"] = f"{bin_}{os.pathsep}{old_path}"
        try:
            with Registry(ws) as reg:
                from ssflctl.commands.status import view as v
                items = v(reg, ws, "loop")
            assert all(i["state"] in ("queued", "running") for i in items), (kind, items)
            again = submit(path, ws)
            assert again.submitted == [], (kind, [(p.run.run_id, p.why) for p in again.plan])
        finally:
            os.environ["PATH"] = old_path
        items = view(ws, "loop")
        assert all(i["state"] in ("queued", "running", "done") for i in items.values()), (kind, items)
        with Registry(ws) as reg:
            ids = {r["run_id"]: {j for j, _, _ in reg.job_ids_ever(r["run_id"])} for r in reg.run_rows("loop")}
        every |= {j for s in ids.values() for j in s}
        live = squeue_live(*every)
        for rid, jobs in ids.items():
            assert len([j for j in jobs if j in live]) <= 1, (kind, rid, jobs, live)
    assert {j for s in ids.values() for j in s} == {p.job_id for p in first.submitted}
    proc = run_cli("cancel", "loop", "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    wait(lambda: not squeue_live(*every), 120, "no leftovers")


def test_time_limit_is_timeout(base, timeout_run):
    ws, jid, t0 = timeout_run
    (item,) = wait_run(ws, "timelimit", lambda i: i["state"] == "failed", max(10.0, 180 - (time.monotonic() - t0)),
                       "TIMEOUT").values()
    assert f"train job {jid} TIMEOUT" in item["note"] and "resources.time" in item["note"]


def test_node_failure_under_a_running_run_is_explained(base, timeout_run):
    """Last: a node set DOWN kills every job on it (the time-limit run has ended by now)."""
    ws = base / "ws-node"
    jid = submit(exp(base, "nodefail", sbatch="{no-requeue: true}"), ws).submitted[0].job_id
    wait_run(ws, "nodefail", lambda i: i["state"] == "running", 180, "running")
    node = subprocess.run(["sinfo", "-h", "-N", "-p", "gpulab02", "-o", "%N"], capture_output=True, text=True,
                          timeout=30).stdout.split()[0]
    mine = {jid, timeout_run[1]}

    def others():
        ids = subprocess.run(["squeue", "-h", "-t", "running,completing,configuring", "-o", "%i"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return set(ids) - mine
    try:
        wait(lambda: not others(), 120, "the node free of other users' jobs")
    except AssertionError:
        run_cli("cancel", "nodefail", "--workspace", ws)
        pytest.skip(f"other jobs run on the shared node ({' '.join(sorted(others()))}); DOWN would kill them")
    try:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=ssflctl-test"],
                       check=True, timeout=30)
        (item,) = wait_run(ws, "nodefail", lambda i: i["state"] == "failed", 180, "NODE_FAIL").values()
    finally:
        st = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], capture_output=True, text=True,
                            timeout=30).stdout.strip()
        if st.startswith(("down", "drain", "drng", "fail")):
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], timeout=30)
        wait(lambda: subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], capture_output=True, text=True,
                                    timeout=30).stdout.strip() in ("idle", "mix", "alloc"), 180, f"node {node} back")
    assert f"train job {jid} NODE_FAIL" in item["note"] and "nothing wrong in the run" in item["note"]
