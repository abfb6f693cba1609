"""Recovery on the local Slurm cluster with the REAL job (tiny RetinaNet on the CPU):

* nan       SSFL* at lr 0.01 goes NaN within a few iterations; the guard stops it; the job itself
            retries at lr 0.001 (no ssflctl process alive after `submit` returned) and finishes.
* interrupt requeued with `scontrol requeue` after its first checkpoint, then signalled like a time
            limit (`scancel -s USR2`: submitit checkpoints and requeues, as ~60 s before a real
            limit) after a later one; each time it resumes from its own checkpoint at the same lr.
* timelimit a run with `--time=1` (one minute) that needs several minutes: before each limit Slurm
            sends SIGUSR2, submitit checkpoints and requeues it (max_num_timeout), and it resumes from
            its last checkpoint at the same lr until it finishes — a real time limit, no signal sent
            by the test.
* spent     the same with max_num_timeout: 0: the first limit ends the job, `status` says the
            requeues are spent and what to raise, and submitting again continues the run from its
            checkpoint at the same lr in attempt 2 (then the test cancels it).
* fail      the model raises at iteration 1 (a string as the focal loss' alpha): failed, with the
            reason and the log tail, and no lower-lr attempt.

All runs go out at once (2 CPUs: two train jobs at a time); the module fixture drives the
interruptions and waits, the tests read the files, the mmengine logs, the registry and `status`.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_cli
from ssflctl.control import submit as submit_mod
from ssflctl.registry.store import Registry

pytestmark = [pytest.mark.slurm, pytest.mark.training, pytest.mark.slow]

EPOCHS = 12          # 2 iterations per epoch (8 images, batch 4); a checkpoint every epoch
INTERRUPT_PARAMS = ", img_scale: [224, 224]"   # ~1 s per epoch: slow enough to be interrupted twice
LR = 0.01
NAN_EPOCHS = 3     # SSFL* at lr 0.01 goes NaN at iteration 3 here (seed 0)

EXP = """\
name: {name}
template: retinanet_tiny
datasets:
  synth: {{root: {root}}}
matrix:
  loss: [{loss}]
  seed: [0]
params: {{max_epochs: {epochs}, batch_size: 4, log_interval: 1, lr: {lr}, val_interval: 100{params}}}
{extra}
resources: {{gpus: 0, cpus: 1, mem: 3G, time: "{time}"}}
retry: {{on_nan: lower_lr, factor: 0.1, max_attempts: 3}}
executor:
  type: slurm
  slurm: {{partition: {partition}, qos: {qos}{slurm}}}
"""
# the time-limit run: 1 minute per job, ~2 minutes of training here (a checkpoint every 2 epochs of
# 2 iterations at 224x224): Slurm signals a job between 20 and 50 s after it starts (its 30-s
# time-limit tick), so the limit interrupts the run at least once even on a machine twice as fast
TL_EPOCHS = 120
TL_PARAMS = ", img_scale: [224, 224], ckpt_interval: 2"


def _write(tmp: Path, cluster, name, loss="focal", epochs=EPOCHS, extra="", params="", time="00:10:00",
           slurm=""):
    p = tmp / f"{name}.yaml"
    p.write_text(EXP.format(name=name, root=tmp / "data", loss=loss, epochs=epochs, lr=LR, extra=extra,
                            params=params, time=time, slurm=slurm, **cluster))
    return p


def _wait_file(path: Path, timeout: float, what: str):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"timed out waiting for {what} ({path})"
        time.sleep(0.3)


def _view(ws, exp=None):
    from ssflctl.commands.status import view

    with Registry(ws) as reg:
        return view(reg, ws, exp)


@pytest.fixture(scope="module")
def recovered(tmp_path_factory, slurm_cluster):
    from ssflctl.convert import synth_coco

    tmp = tmp_path_factory.mktemp("recovery")
    synth_coco.generate(tmp / "data", n_train=8, n_val=4, seed=0)
    ws = tmp / "ws"
    paths = {
        "interrupt": _write(tmp, slurm_cluster, "recinterrupt", params=INTERRUPT_PARAMS),
        "nan": _write(tmp, slurm_cluster, "recnan", loss="ssfl", epochs=NAN_EPOCHS),
        "timelimit": _write(tmp, slurm_cluster, "rectimelimit", epochs=TL_EPOCHS, params=TL_PARAMS,
                            time="00:01:00", slurm=", max_num_timeout: 12"),
        "spent": _write(tmp, slurm_cluster, "recspent", epochs=TL_EPOCHS, params=TL_PARAMS,
                        time="00:01:00", slurm=", max_num_timeout: 0"),
        "fail": _write(tmp, slurm_cluster, "recfail", epochs=1,
                       extra='overrides: {model.bbox_head.loss_cls.reduction: "bogus"}'),  # passes the plan, raises on the node
    }
    t0 = time.time()
    runs = {}
    for key, p in paths.items():
        res = submit_mod.submit(p, ws)
        (item,) = res.submitted
        runs[key] = {"run_id": item.run.run_id, "job_id": item.job_id, "test_job_id": item.test_job_id,
                     "run_dir": ws / "runs" / item.run.run_id, "exp": res.experiment.name}
    # no ssflctl process is needed from here on: only the scheduler and this test's signals
    a1 = runs["interrupt"]["run_dir"] / "attempt-1"
    job = runs["interrupt"]["job_id"]
    _wait_file(a1 / "epoch_1.pth", 400, "the first checkpoint")
    time.sleep(1)
    subprocess.run(["scontrol", "requeue", job], check=True)
    _wait_file(a1 / "recovery.json", 200, "the resume after the requeue")
    # the requeued job saves a new checkpoint, then gets SIGUSR2 as before a time limit
    first_resume = json.loads((a1 / "recovery.json").read_text())[0]
    n_ckpt = int(re.search(r"epoch_(\d+)", first_resume["checkpoint"]).group(1))
    _wait_file(a1 / f"epoch_{n_ckpt + 1}.pth", 300, "a checkpoint after the resume")
    time.sleep(1)
    assert not (a1 / "outcome.json").exists(), "the run finished before it could be interrupted twice"
    subprocess.run(["scancel", "-s", "USR2", job], check=True)
    deadline = time.time() + 900
    while True:
        items = {i["run"]: i for i in _view(ws)}
        if all(i["state"] in ("done", "failed", "cancelled", "unknown") for i in items.values()):
            break
        assert time.time() < deadline, items
        time.sleep(2)
    # requeues spent: submit again; attempt 2 resumes attempt 1's checkpoint, then it is cancelled
    spent = runs["spent"]
    spent["status_before"] = items[spent["run_id"]]
    res = submit_mod.submit(paths["spent"], ws)
    spent["resubmitted"] = [(p.run.run_id, p.attempt) for p in res.submitted]
    a2 = spent["run_dir"] / "attempt-2"
    deadline = time.time() + 300
    while not _train_lines(a2):  # attempt 2 resumed and trained an iteration
        assert time.time() < deadline, "attempt 2 never trained"
        time.sleep(1)
    assert run_cli("cancel", spent["run_id"], "--workspace", ws).returncode == 0
    print(f"\nrecovery scenarios on Slurm: {time.time() - t0:.0f}s")
    return {"ws": ws, "runs": runs, "items": items}


def _train_lines(adir: Path):
    """(log file, epoch, iter-in-epoch, lr) of every mmengine train line, oldest log first."""
    out = []
    for log in sorted(adir.glob("*/*.log")):
        for m in re.finditer(r"Epoch\(train\)\s+\[(\d+)\]\[\s*(\d+)/\d+\]\s+lr: (\S+)", log.read_text()):
            out.append((log.parent.name, int(m.group(1)), int(m.group(2)), float(m.group(3))))
    return out


def _events(ws, run_id):
    with Registry(ws) as reg:
        return reg.events(run_id)


def test_requeue_and_time_limit_resume_from_the_checkpoint_at_the_same_lr(recovered):
    r = recovered["runs"]["interrupt"]
    item = recovered["items"][r["run_id"]]
    assert item["state"] == "done", item
    assert [p.name for p in r["run_dir"].glob("attempt-*")] == ["attempt-1"]  # no new attempt, no lr change
    a1 = r["run_dir"] / "attempt-1"
    rec = json.loads((a1 / "recovery.json").read_text())
    kinds = [x["kind"] for x in rec]
    assert kinds == ["resumed", "interrupted", "resumed"], rec
    assert "requeue (SLURM_RESTART_COUNT=1)" in rec[0]["message"] and rec[0]["restart_count"] == 1
    assert "SIGUSR2" in rec[1]["message"] and "SIGUSR2" in rec[2]["message"]
    # submitit counts a signal as a time limit once the job ran min(80% of its limit, limit - 10 min):
    # always, with a 10-minute limit; the note says which rule decided (tests/test_launch_slurm.py)
    assert "by submitit's rule (ran" in rec[1]["message"] and "of 10 min)" in rec[1]["message"]
    assert rec[2]["restart_count"] == 2 and all(x.get("lr", LR) == LR for x in rec)
    # three mmengine logs; each resumed one continues after its checkpoint, none restarts at epoch 1
    lines = _train_lines(a1)
    logs = sorted({ln[0] for ln in lines})
    assert len(logs) == 3, logs
    starts = [min(e for lg, e, _, _ in lines if lg == name) for name in logs]
    ck = [int(re.search(r"epoch_(\d+)", x["checkpoint"]).group(1)) for x in rec if x["kind"] == "resumed"]
    assert starts == [1, ck[0] + 1, ck[1] + 1] and ck[1] > ck[0] >= 1
    # the same lr schedule as an uninterrupted run: lr until the x0.1 step after 3/4 of the epochs
    for _, epoch, _, lr in lines:
        assert lr == pytest.approx(LR if epoch <= int(0.75 * EPOCHS) else LR * 0.1), (epoch, lr)
    assert max(e for _, e, _, _ in lines) == EPOCHS
    out = json.loads((a1 / "outcome.json").read_text())
    assert out["outcome"] == "done" and out["checkpoint"] == f"epoch_{EPOCHS}.pth"
    metrics = json.loads((a1 / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox"]["AP"] <= 1.0 and metrics["checkpoint"] == f"epoch_{EPOCHS}.pth"
    # Slurm ran the same job three times
    assert item["job"] == r["job_id"]
    assert item["note"] == f"resumed 2× (last from epoch_{ck[1]}.pth)"
    # every step is in the registry's event log
    ev = _events(recovered["ws"], r["run_id"])
    msgs = [(e["kind"], e["message"]) for e in ev]
    assert [k for k, _ in msgs if k in ("resumed", "interrupted")] == kinds, msgs
    assert any(k == "attempt" and e["new_state"] == "done" for e, (k, _) in zip(ev, msgs))


def test_a_run_past_its_time_limit_is_requeued_and_resumes_at_the_same_lr(recovered):
    r = recovered["runs"]["timelimit"]
    item = recovered["items"][r["run_id"]]
    assert item["state"] == "done", item
    assert [p.name for p in r["run_dir"].glob("attempt-*")] == ["attempt-1"]  # same attempt, same lr
    a1 = r["run_dir"] / "attempt-1"
    rec = json.loads((a1 / "recovery.json").read_text())
    kinds = [x["kind"] for x in rec]
    n = kinds.count("resumed")
    assert n >= 1 and kinds == ["interrupted", "resumed"] * n, rec
    for k, x in enumerate(rec):  # submitit's own rule said "timed out" each time (not a preemption)
        assert "SIGUSR2, a time limit by submitit's rule" in x["message"] and "of 1 min" in x["message"], x
        assert x["restart_count"] == k // 2 + (k % 2), x
    # each job of the chain resumed after the checkpoint it found; none started over at epoch 1
    lines = _train_lines(a1)
    logs = sorted({ln[0] for ln in lines})
    assert len(logs) == n + 1, logs
    starts = [min(e for lg, e, _, _ in lines if lg == name) for name in logs]
    ck = [int(re.search(r"epoch_(\d+)", x["checkpoint"]).group(1)) for x in rec if x["kind"] == "resumed"]
    assert starts == [1] + [c + 1 for c in ck] and ck == sorted(ck), (starts, ck)
    step = int(re.search(r"milestones=\[\s*(\d+)", (a1 / "config.py").read_text()).group(1))
    assert 0.7 * TL_EPOCHS <= step < TL_EPOCHS
    for _, epoch, _, lr in lines:  # the lr schedule of an uninterrupted run
        assert lr == pytest.approx(LR if epoch <= step else LR * 0.1), (epoch, lr)
    assert max(e for _, e, _, _ in lines) == TL_EPOCHS
    out = json.loads((a1 / "outcome.json").read_text())
    assert out["outcome"] == "done" and out["checkpoint"] == f"epoch_{TL_EPOCHS}.pth"
    assert (a1 / "metrics.json").is_file()
    # Slurm: one job id, a one-minute limit, requeued n times (sacct --duplicates keeps each run)
    assert item["job"] == r["job_id"]
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", r["job_id"], "-o", "JobID,State,Timelimit"],
                         capture_output=True, text=True, check=True).stdout
    rows = [ln.split("|") for ln in out.splitlines() if ln]
    assert {row[2] for row in rows} == {"00:01:00"}, rows
    assert [row[1] for row in rows].count("REQUEUED") == n and rows[-1][1] == "COMPLETED", rows
    assert item["note"] == f"resumed {n}× (last from epoch_{ck[-1]}.pth)"


def test_spent_requeues_are_explained_and_a_new_submit_continues_the_checkpoint(recovered):
    r = recovered["runs"]["spent"]
    before = r["status_before"]
    assert before["state"] == "failed", before
    a1 = r["run_dir"] / "attempt-1"
    assert not (a1 / "outcome.json").exists()   # stopped from outside, not an ending of the job's own
    (rec,) = json.loads((a1 / "recovery.json").read_text())
    assert rec["kind"] == "interrupted" and rec["checkpoint"]
    # the latest checkpoint on disk (seen in CI: after the signal's note the job may train on, saving
    # more, until Slurm kills it at the limit)
    from ssflctl.workdir.checkpoints import latest_checkpoint as last_checkpoint

    ck = Path(last_checkpoint(a1)).name
    assert int(re.search(r"epoch_(\d+)", ck).group(1)) >= int(re.search(r"epoch_(\d+)", rec["checkpoint"]).group(1))
    assert f"after 0 requeues; raise resources.time or executor.slurm.max_num_timeout, then `ssflctl submit` " \
           f"again: it continues from {ck}" in before["note"], before["note"]
    assert r["resubmitted"] == [(r["run_id"], 2)]
    a2 = r["run_dir"] / "attempt-2"
    info = json.loads((a2 / "attempt.json").read_text())
    assert info["resume_from"] == str(a1 / ck) and info["lr"] == pytest.approx(LR)
    assert info["reason"].endswith(f"; resumes attempt-1/{ck} at lr {LR:g}")
    n = int(re.search(r"epoch_(\d+)", ck).group(1))
    lines = _train_lines(a2)
    assert lines and min(e for _, e, _, _ in lines) == n + 1 and all(lr == pytest.approx(LR) for *_, lr in lines)
    assert any(f"resumed epoch: {n}," in log.read_text() for log in a2.glob("*/*.log"))


def test_nan_is_retried_at_a_tenth_of_the_lr_inside_the_job(recovered):
    r = recovered["runs"]["nan"]
    check_nan_run(recovered["ws"], r, recovered["items"][r["run_id"]])


def check_nan_run(ws, r, item):
    """The NaN run's files, registry rows, events and status (shared with test_recovery_local.py).

    SSFL* at lr 0.01 goes NaN at iteration 4 here and finishes at lr 0.001; should a platform's
    float rounding make lr 0.001 diverge too, lr 0.0001 (attempt 3) must finish: every attempt
    but the last is a NaN at a tenth of the previous lr."""
    assert item["state"] == "done", item
    n = item["attempt"]
    assert n in (2, 3) and [p.name for p in sorted(r["run_dir"].glob("attempt-*"))] == \
        [f"attempt-{k}" for k in range(1, n + 1)]
    for k in range(1, n + 1):
        adir = r["run_dir"] / f"attempt-{k}"
        lr_k = LR * 0.1 ** (k - 1)
        info = json.loads((adir / "attempt.json").read_text())
        assert info["lr"] == pytest.approx(lr_k) and (k == 1 or "NaN" in info["reason"]), info
        out = json.loads((adir / "outcome.json").read_text())
        lines = _train_lines(adir)
        for _, epoch, _, lr in lines:  # the attempt's lr took effect (and its schedule)
            assert lr == pytest.approx(lr_k * (1 if epoch <= int(0.75 * NAN_EPOCHS) else 0.1)), (k, epoch, lr)
        if k < n:
            assert out["outcome"] == "nan", out
            nan_iter = out["nan"]["iter"]
            assert nan_iter < 2 * NAN_EPOCHS  # within a few iterations
            # the guard stopped it within one iteration of the first NaN: nothing trained after it
            assert all((e - 1) * 2 + i <= nan_iter for _, e, i, _ in lines), (nan_iter, lines)
            assert json.loads((adir / "progress.json").read_text())["iter"] <= nan_iter
            assert not (adir / "metrics.json").exists()
        else:
            assert out["outcome"] == "done" and max(e for _, e, _, _ in lines) == NAN_EPOCHS
            assert (adir / "metrics.json").is_file()
    # one job did it all (the retry ran inside the train job's own process)
    assert item["job"] == r["job_id"]
    # registry: every attempt with its lr, state and reason
    with Registry(ws) as reg:
        (run,) = reg.list_runs(r["exp"])
    atts = run["attempts"]
    assert [a["state"] for a in atts] == ["nan"] * (n - 1) + ["done"]
    assert [a["lr"] for a in atts] == [pytest.approx(LR * 0.1 ** k) for k in range(n)]
    assert all("NaN" in a["reason"] for a in atts)  # attempt 1: the NaN it ended with; later: what they answer
    ev = [e for e in _events(ws, r["run_id"]) if e["kind"] == "attempt"]
    assert any(e["new_state"] == "nan" and e["message"].startswith("attempt 1 · lr 0.01") for e in ev), ev
    assert any(e["new_state"] == "done" and e["message"].startswith(f"attempt {n} · lr {LR * 0.1 ** (n - 1):g} · "
                                                                       "after NaN") for e in ev), ev
    # status shows the lineage
    proc = run_cli("status", r["exp"], "--json", "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    (st,) = json.loads(proc.stdout)
    assert st["state"] == "done"
    assert st["note"].startswith(f"attempt {n}/3 · lr {LR * 0.1 ** (n - 1):g} · after NaN in loss_"), st["note"]
    assert [a["state"] for a in st["attempts"]] == ["nan"] * (n - 1) + ["done"]


def test_code_that_raises_is_failed_not_retried(recovered):
    ws, r = recovered["ws"], recovered["runs"]["fail"]
    item = recovered["items"][r["run_id"]]
    assert item["state"] == "failed", item
    assert [p.name for p in r["run_dir"].glob("attempt-*")] == ["attempt-1"]
    out = json.loads((r["run_dir"] / "attempt-1" / "outcome.json").read_text())
    assert out["outcome"] == "failed" and out["reason"].startswith("ValueError") and out["nan"] is None
    assert "Epoch(train)" in out["log_tail"] or "Checkpoints will be saved" in out["log_tail"]
    assert "ValueError" in item["note"]  # the attempt is in the registry's lineage below
    with Registry(ws) as reg:
        (run,) = reg.list_runs(r["exp"])
    assert [(a["attempt"], a["state"]) for a in run["attempts"]] == [(1, "failed")]
    assert run["attempts"][0]["lr"] == pytest.approx(LR)
    ev = _events(ws, r["run_id"])
    assert any(e["kind"] == "attempt" and e["new_state"] == "failed" for e in ev), ev
    assert any(e["new_state"] == "failed" and "ValueError" in (e["message"] or "") for e in ev if e["kind"] == "state")
    # status: the reason and the log tail
    proc = run_cli("status", r["exp"], "--workspace", ws)
    assert proc.returncode == 0, proc.stderr
    assert "failed" in proc.stdout and "ValueError" in proc.stdout
    assert f"{r['run_id']} failed: ValueError" in proc.stderr
    assert out["log_tail"].strip().splitlines()[-1].strip()[-60:] in proc.stderr
