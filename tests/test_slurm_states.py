"""Slurm's job states and pending reasons (ssflctl.backends.slurm_states) and the squeue/sacct
queries (ssflctl.backends.slurm_query).

``unit`` tests parse text captured from the real cluster of scripts/slurm-cluster.sh (Slurm 22.05.8),
or written in Slurm's exact format where the cluster cannot produce the state. ``slurm`` tests make
the real cluster produce each state and check what the queries say. Everything they change on the
shared cluster (holds, a node set DOWN, slurmdbd stopped) is restored in a ``finally``.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ssflctl.backends import slurm_query as q
from ssflctl.backends import slurm_states as ss
from ssflctl.backends.slurm_states import Clears, Kind

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# unit: the tables
# ------------------------------------------------------------------------------------------------

# Slurm 22.05.8: squeue -t x  ->  "squeue: error: Valid job states include: ..." (captured here)
SQUEUE_2205_VALID = ("PENDING,RUNNING,SUSPENDED,COMPLETED,CANCELLED,FAILED,TIMEOUT,NODE_FAIL,PREEMPTED,BOOT_FAIL,"
                     "DEADLINE,OUT_OF_MEMORY,COMPLETING,CONFIGURING,RESIZING,RESV_DEL_HOLD,REQUEUED,REQUEUE_FED,"
                     "REQUEUE_HOLD,REVOKED,SIGNALING,SPECIAL_EXIT,STAGE_OUT,STOPPED")
# Slurm 25.11 squeue --helpstate (src/squeue/opts.c _job_state_list(), one per line, lower case)
SQUEUE_2511_HELPSTATE = SQUEUE_2205_VALID.lower().replace("configuring,", "configuring,expediting,").replace(",", "\n")
# Slurm 25.11 sacct --helpstate (src/sacct/options.c: job_state_string(0..JOB_END-1), 4 per line, %-19s)
SACCT_2511_HELPSTATE = """\
PENDING             RUNNING             SUSPENDED           COMPLETED
CANCELLED           FAILED              TIMEOUT             NODE_FAIL
PREEMPTED           BOOT_FAIL           DEADLINE            OUT_OF_MEMORY
"""


@pytest.mark.unit
def test_every_state_of_22_05_and_25_11_is_mapped():
    assert ss.unmapped_states(SQUEUE_2205_VALID.split(",")) == []
    assert ss.unmapped_states(SQUEUE_2511_HELPSTATE.split()) == []
    assert ss.unmapped_states(SACCT_2511_HELPSTATE.split()) == []
    assert len(ss.STATES) == 25  # 12 base states + 13 flags (EXPEDITING since 25.11)


@pytest.mark.unit
def test_state_kinds_and_hints():
    k = ss.kind_of
    assert [k("PENDING"), k("REQUEUED"), k("CONFIGURING")] == [Kind.QUEUED] * 3
    assert [k("REQUEUE_HOLD"), k("SPECIAL_EXIT"), k("RESV_DEL_HOLD")] == [Kind.HELD] * 3
    assert [k("RUNNING"), k("COMPLETING"), k("STAGE_OUT")] == [Kind.RUNNING] * 3
    assert [k("SUSPENDED"), k("STOPPED")] == [Kind.SUSPENDED] * 2
    assert k("COMPLETED") is Kind.DONE and k("FAILED") is Kind.FAILED
    assert k("CANCELLED by 0") is Kind.CANCELLED and k("REVOKED") is Kind.CANCELLED
    assert k("PREEMPTED") is Kind.PREEMPTED and k("TIMEOUT") is Kind.TIMEOUT and k("DEADLINE") is Kind.TIMEOUT
    assert k("NODE_FAIL") is Kind.NODE_FAIL and k("BOOT_FAIL") is Kind.NODE_FAIL
    assert k("OUT_OF_MEMORY") is Kind.OOM and k("OOM") is Kind.OOM and k("cd") is Kind.DONE
    for s in ss.STATES.values():  # every held and every terminal state says what to do (except success)
        if s.kind is Kind.HELD or (s.terminal and s.kind is not Kind.DONE):
            assert s.hint, s.name
        assert s.terminal == (s.kind not in ss.ACTIVE_KINDS), s.name
    assert "scontrol release" in ss.STATES["REQUEUE_HOLD"].hint
    assert "ssflctl submit" in ss.STATES["NODE_FAIL"].hint


@pytest.mark.unit
def test_unmapped_state_raises_and_is_reported():
    with pytest.raises(ss.UnmappedState, match="WAITING_FOR_GODOT"):
        ss.state_info("WAITING_FOR_GODOT")
    with pytest.raises(ss.UnmappedState):
        ss.classify("?")
    assert ss.unmapped_states(["RUNNING", "WAITING_FOR_GODOT"]) == ["WAITING_FOR_GODOT"]


@pytest.mark.unit
def test_every_reason_is_mapped_and_classified():
    for name in ss.ALL_REASON_NAMES:
        r = ss.reason_info(name, strict=True)
        assert r.name == name and r.meaning
        if r.clears in (Clears.NEVER, Clears.ADMIN, Clears.HELD):
            assert r.hint, name  # what to do when waiting does not help
    R = ss.REASONS
    waits = ["Resources", "Priority", "Dependency", "BeginTime", "QOSMaxGRESPerUser", "QOSGrpGRES", "AssocGrpCpuLimit",
             "QOSMaxJobsPerUserLimit", "JobArrayTaskLimit", "AssocGrpGRESRunMinutes", "MaxGRESPerAccount"]
    never = ["DependencyNeverSatisfied", "InvalidQOS", "InvalidAccount", "BadConstraints", "PartitionNodeLimit",
             "PartitionTimeLimit", "QOSMaxGRESPerJob", "QOSMaxWallDurationPerJobLimit", "AssocMaxCpuPerJobLimit",
             "QOSMinGRES", "QOSNotAllowed"]
    admin = ["PartitionDown", "ReqNodeNotAvail", "NodeDown", "QOSGrpCPUMinutesLimit", "AssocGrpGRESMinutes"]
    held = ["JobHeldUser", "JobHeldAdmin", "JobHoldMaxRequeue"]
    assert [n for n in waits if not R[n].clears_by_waiting] == []
    assert [n for n in never if R[n].clears is not Clears.NEVER] == []
    assert [n for n in admin if R[n].clears is not Clears.ADMIN] == []
    assert [n for n in held if R[n].clears is not Clears.HELD] == []
    assert "scontrol release" in R["JobHeldUser"].hint


@pytest.mark.unit
def test_reason_text_as_squeue_prints_it():
    # squeue %r prints state_desc when set: the first word decides
    assert ss.reason_info("ReqNodeNotAvail, UnavailableNodes:vm").name == "ReqNodeNotAvail"
    assert ss.reason_info("(Resources)").name == "Resources"
    odd = ss.reason_info("launch failed requeued held")
    assert odd.clears is Clears.ADMIN and "does not know" in odd.meaning  # reported, not guessed
    with pytest.raises(ss.UnmappedState):
        ss.reason_info("launch failed requeued held", strict=True)
    assert ss.unmapped_reasons(["QOSGrp*Limit", "AssocMax*Limit", "Resources", "Nope*Limit"]) == ["Nope*Limit"]


@pytest.mark.unit
def test_classify_state_with_reason():
    v = ss.classify("PENDING", "JobHeldUser")
    assert v.kind is Kind.HELD and v.stuck and "scontrol release 42" in v.line("42")
    v = ss.classify("PENDING", "QOSMaxGRESPerUser")
    assert v.kind is Kind.QUEUED and not v.stuck
    v = ss.classify("PENDING", "DependencyNeverSatisfied")
    assert v.kind is Kind.QUEUED and v.stuck and "scancel 7" in v.line("7")
    v = ss.classify("RUNNING", "JobHeldAdmin")  # scontrol hold on a running job: it keeps running
    assert v.kind is Kind.RUNNING and v.reason is None
    v = ss.classify("TIMEOUT")
    assert v.kind is Kind.TIMEOUT and "resources.time" in v.line()


# ------------------------------------------------------------------------------------------------
# unit: parsers, on text captured from the cluster (Slurm 22.05.8)
# ------------------------------------------------------------------------------------------------

SQUEUE_HELD = "1|PENDING|JobHeldUser|0:00|wrap\n"
SQUEUE_ARRAY_DEFAULT = "2_[2-3%2]|PENDING|JobArrayTaskLimit|0:00|wrap\n2_1|RUNNING|None|0:03|wrap\n2_0|RUNNING|None|0:03|wrap\n"
SQUEUE_QOS = "16|PENDING|QOSMaxGRESPerUser|0:00|wrap\n15|RUNNING|None|0:02|wrap\n"
SQUEUE_REQUEUED = "13|PENDING|BeginTime|0:00|wrap\n14|RUNNING|None|0:01|wrap\n"
SQUEUE_ENDED = "2_0|CANCELLED|None|0:05|wrap\n6|FAILED|NonZeroExitCode|0:05|wrap\n12|PREEMPTED|None|0:03|wrap\n"
SACCT_ENDED = """\
6|FAILED|3:0|None||00:00:05|wrap
6.batch|FAILED|3:0|||00:00:05|batch
7|FAILED|0:9|None||00:00:00|wrap
7.batch|CANCELLED|0:9|||00:00:00|batch
9|COMPLETED|0:0|None||00:00:00|wrap
9.batch|COMPLETED|0:0|||00:00:00|batch
12|PREEMPTED|0:15|None||00:00:03|wrap
12.batch|CANCELLED|0:15||3190784|00:00:03|batch
17|FAILED|3:0|BeginTime||00:00:06|wrap
17.batch|FAILED|3:0||329973760|00:00:06|batch
18|CANCELLED by 0|0:0|BeginTime||00:00:02|wrap
18.batch|CANCELLED|0:15|||00:00:02|batch
"""
# sacct -D of a job requeued after its node went DOWN, and of a job preempted with PreemptMode=REQUEUE
SACCT_DUPLICATES = """\
17|NODE_FAIL|0:0|None||00:00:03|wrap
17.batch|CANCELLED||||00:00:03|batch
17|FAILED|3:0|BeginTime||00:00:06|wrap
17.batch|FAILED|3:0||322240K|00:00:06|batch
"""
SACCT_ARRAY = """\
5_[2-3%2]|PENDING|0:0|JobArrayTaskLimit||00:00:00|wrap
5_0|CANCELLED by 0|0:0|None||00:00:05|wrap
5_1|RUNNING|0:0|None||00:00:05|wrap
5_1.batch|RUNNING|0:0||1048576|00:00:05|batch
"""
# written in sacct -P's format: states this cluster cannot produce
SACCT_WRITTEN = """\
31|OUT_OF_MEMORY|0:125|None||00:01:02|train
31.batch|OUT_OF_MEMORY|0:125||8.5G|00:01:02|batch
32|BOOT_FAIL|0:0|None||00:00:00|train
33|REVOKED|0:0|None||00:00:00|train
34|DEADLINE|0:0|None||00:00:00|train
35|REQUEUE_HOLD|0:0|launch failed requeued held||00:00:00|train
36|SPECIAL_EXIT|3:0|None||00:00:40|train
37|RESV_DEL_HOLD|0:0|ReservationDeleted||00:00:00|train
38|NODE_FAIL|0:0|None||00:10:00|name|with|bars
"""


@pytest.mark.unit
def test_parse_squeue_held_qos_requeued():
    r = q.parse_squeue(SQUEUE_HELD)["1"]
    assert (r.state, r.kind, r.reason, r.elapsed, r.name) == ("PENDING", Kind.HELD, "JobHeldUser", "0:00", "wrap")
    assert r.verdict().kind is Kind.HELD
    r = q.parse_squeue(SQUEUE_QOS)
    assert r["16"].reason == "QOSMaxGRESPerUser" and r["16"].verdict().reason.clears_by_waiting
    assert r["15"].kind is Kind.RUNNING
    assert q.parse_squeue(SQUEUE_REQUEUED)["13"].reason == "BeginTime"
    r = q.parse_squeue(SQUEUE_ENDED)
    assert [r[j].kind for j in ("2_0", "6", "12")] == [Kind.CANCELLED, Kind.FAILED, Kind.PREEMPTED]


@pytest.mark.unit
def test_parse_squeue_legacy_format():
    # launch.slurm's '%i|%T|%M|%j'
    r = q.parse_squeue("4_[1-2]|PENDING|0:00|train-x\n4_0|RUNNING|1:02|train-x\n")
    assert r["4_1"].state == "PENDING" and r["4_1"].elapsed == "0:00" and r["4_1"].name == "train-x"
    assert r["4_0"].elapsed == "1:02" and r["4_0"].reason == ""


@pytest.mark.unit
def test_array_range_never_overrides_a_tasks_own_record():
    text = "5_[0-1%2]|CANCELLED|None|0:00|wrap\n5_0|RUNNING|None|0:05|wrap\n"
    for t in (text, "\n".join(reversed(text.splitlines()))):  # either order
        r = q.parse_squeue(t)
        assert r["5_0"].state == "RUNNING" and not r["5_0"].from_range
        assert r["5_1"].state == "CANCELLED" and r["5_1"].from_range
    r = q.parse_squeue(SQUEUE_ARRAY_DEFAULT)
    assert {j: r[j].state for j in r} == {"2_0": "RUNNING", "2_1": "RUNNING", "2_2": "PENDING", "2_3": "PENDING"}
    r = q.parse_sacct(SACCT_ARRAY)
    assert r["5_0"].state == "CANCELLED" and r["5_0"].state_text == "CANCELLED by 0"
    assert r["5_1"].max_rss_bytes == 1048576 and r["5_1"].steps == {"5_1.batch": "RUNNING"}
    assert r["5_2"].state == r["5_3"].state == "PENDING" and r["5_3"].reason == "JobArrayTaskLimit"


@pytest.mark.unit
def test_parse_sacct_exit_codes_signals_maxrss():
    r = q.parse_sacct(SACCT_ENDED)
    assert (r["6"].exit_code, r["6"].signal, r["6"].exit_text) == (3, None, "exit 3")
    assert (r["7"].exit_code, r["7"].signal, r["7"].signal_name) == (0, 9, "SIGKILL")
    assert r["7"].exit_text == "killed by SIGKILL (signal 9)" and r["7"].kind is Kind.FAILED
    assert r["9"].kind is Kind.DONE and r["9"].exit_text == "exit 0" and r["9"].max_rss_bytes is None
    assert r["12"].kind is Kind.PREEMPTED and r["12"].signal_name == "SIGTERM" and r["12"].max_rss_bytes == 3190784
    assert r["17"].max_rss_bytes == 329973760  # --noconvert: bytes, from the batch step
    assert r["17"].reason == ""  # sacct's Reason is the last PENDING reason: kept for PENDING only
    assert r["18"].state == "CANCELLED" and r["18"].state_text == "CANCELLED by 0"
    assert r["6"].steps == {"6.batch": "FAILED"}
    # sacct -D: the later record (the requeued incarnation) wins
    r = q.parse_sacct(SACCT_DUPLICATES)
    assert r["17"].state == "FAILED" and r["17"].max_rss_bytes == 322240 * 1024


@pytest.mark.unit
def test_parse_sacct_written_formats():
    r = q.parse_sacct(SACCT_WRITTEN)
    assert r["31"].kind is Kind.OOM and r["31"].max_rss_bytes == int(8.5 * 1024 ** 3) and r["31"].signal == 125
    assert r["32"].kind is Kind.NODE_FAIL and r["33"].kind is Kind.CANCELLED and r["34"].kind is Kind.TIMEOUT
    assert r["35"].kind is Kind.HELD and r["36"].kind is Kind.HELD and r["37"].kind is Kind.HELD
    assert r["38"].name == "name|with|bars"
    # the legacy launch.slurm format
    r = q.parse_sacct("40|TIMEOUT|0:0|00:01:00|train-a\n", fields="JobID,State,ExitCode,Elapsed,JobName")
    assert r["40"].kind is Kind.TIMEOUT and r["40"].elapsed == "00:01:00" and r["40"].name == "train-a"


# captured with SSFLCTL_SLURM_MEM_ENFORCE=1 (JobAcctGatherParams=OverMemoryKill, task/none, 22.05.8),
# --mem=100M and 400 MiB touched: no OUT_OF_MEMORY state (that needs task/cgroup), the step is cancelled
# with SIGKILL; the job log says "StepId=31.batch exceeded memory limit (434950144 > 104857600), being killed"
SACCT_OVERMEMORYKILL = """\
31|FAILED|0:9|None||00:00:02|wrap
31.batch|CANCELLED by 0|0:9||434950144|00:00:02|batch
"""


@pytest.mark.unit
def test_overmemorykill_is_a_sigkill_failure_with_its_maxrss():
    r = q.parse_sacct(SACCT_OVERMEMORYKILL)["31"]
    assert r.kind is Kind.FAILED and r.signal_name == "SIGKILL" and r.max_rss_bytes == 434950144
    assert r.steps == {"31.batch": "CANCELLED by 0"}


# captured: `srun python3 ...` in a batch job, the python process killed with `kill -9` (22.05.8)
SACCT_SRUN_KILLED = """\
32|FAILED|9:0|None||00:00:01|ssflctl-k9probe
32.batch|FAILED|9:0|||00:00:01|batch
32.0|CANCELLED|0:9|||00:00:01|python3
"""


@pytest.mark.unit
def test_a_step_killed_by_a_signal_names_it_on_its_job():
    r = q.parse_sacct(SACCT_SRUN_KILLED)["32"]
    assert r.kind is Kind.FAILED and (r.exit_code, r.signal, r.step_signal) == (9, None, 9) and r.signal_name == "SIGKILL"
    assert r.exit_text == "killed by SIGKILL (signal 9)"


@pytest.mark.unit
def test_parsers_refuse_an_unmapped_state():
    with pytest.raises(ss.UnmappedState):
        q.parse_sacct("41|WAITING_FOR_GODOT|0:0|None||00:00:00|x\n")
    with pytest.raises(ss.UnmappedState):
        q.parse_squeue("41|WAITING_FOR_GODOT|None|0:00|x\n")


@pytest.mark.unit
def test_parse_bytes_and_exit_codes():
    assert [q.parse_bytes(x) for x in ("", "0", "322240K", "314.69M", "2G", "1048576")] == \
        [None, 0, 322240 * 1024, int(round(314.69 * 1024 ** 2)), 2 * 1024 ** 3, 1048576]
    assert q.parse_exit_code("0:9") == (0, 9) and q.parse_exit_code("3:0") == (3, None)
    assert q.parse_exit_code("") == (None, None)
    assert q.signal_name(9) == "SIGKILL" and q.signal_name(15) == "SIGTERM"
    assert q.expand_ids("12_[0-3,5%2]") == ["12_0", "12_1", "12_2", "12_3", "12_5"]


def _fake(tmp_path, monkeypatch, name, script):
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    (b / name).write_text("#!/bin/sh\n" + script)
    (b / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{b}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.unit
def test_failed_queries_are_unknown_never_empty(tmp_path, monkeypatch):
    # exact 22.05.8 messages
    _fake(tmp_path, monkeypatch, "sacct", "echo 'sacct: error: Problem talking to the database: Connection refused' >&2; exit 1\n")
    _fake(tmp_path, monkeypatch, "squeue",
          "echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2; exit 1\n")
    got = q.query_sacct(["5"])
    assert isinstance(got, q.QueryFailed) and str(got).startswith("unknown: sacct -P -n --noconvert -j 5 ")
    assert "Problem talking to the database: Connection refused" in str(got)
    merged = q.query(["5", "6_1"])
    assert set(merged) == {"5", "6_1"} and all(isinstance(v, q.QueryFailed) for v in merged.values())
    assert "Unable to contact slurm controller" in merged["5"].message and "database" in merged["5"].message
    st = q.job_states(["5"])
    assert st["5"]["kind"] == "unknown" and st["5"]["state"] == "UNKNOWN" and st["5"]["error"].startswith("unknown: ")


@pytest.mark.unit
def test_timeout_and_missing_command_are_unknown(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, "squeue", "sleep 5\n")
    got = q.query_squeue(["5"], timeout=0.3)
    assert isinstance(got, q.QueryFailed) and got.message == "no answer in 0.3 s"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    got = q.query_sacct(["5"])
    assert isinstance(got, q.QueryFailed) and "could not run" in got.message


@pytest.mark.unit
def test_forgotten_job_is_an_answer_not_a_failure(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, "squeue", "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1\n")
    _fake(tmp_path, monkeypatch, "sacct", "printf '9|COMPLETED|0:0|None||00:00:00|wrap\\n'\n")
    got = q.query(["9", "10"])
    assert got["9"].kind is Kind.DONE and got["9"].source == "sacct"
    assert "10" not in got  # both answered, neither knows it: no record (not "unknown")


@pytest.mark.unit
def test_merge_controller_wins_sacct_adds_exit_and_rss():
    sq = q.parse_squeue("15|RUNNING|None|0:02|wrap\n6|FAILED|NonZeroExitCode|0:05|wrap\n")
    sa = q.parse_sacct("15|PENDING|0:0|None||00:00:00|wrap\n6|FAILED|3:0|None||00:00:05|wrap\n"
                       "6.batch|FAILED|3:0||1024|00:00:05|batch\n")  # sacct lags the controller
    m = q.merge(sq, sa, ["15", "6"])
    assert m["15"].state == "RUNNING" and m["15"].source == "squeue"
    assert m["6"].exit_code == 3 and m["6"].max_rss_bytes == 1024
    fail = q.QueryFailed("sacct -j 15", "exit 1: boom")
    m = q.merge(sq, fail, ["15", "99"])
    assert m["15"].state == "RUNNING" and m["99"] is fail  # not silently absent


@pytest.mark.unit
def test_merge_with_the_controller_down_keeps_only_final_accounting_records():
    down = q.QueryFailed("squeue -j 15,6", "exit 1: slurm_load_jobs error: Unable to contact slurm controller")
    sa = q.parse_sacct("15|RUNNING|0:0|None||00:00:03|wrap\n6|FAILED|3:0|None||00:00:05|wrap\n")
    m = q.merge(down, sa, ["15", "6"])
    # sacct's RUNNING lags the controller and may be stale: don't know; its FAILED is final
    assert isinstance(m["15"], q.QueryFailed) and "sacct's RUNNING may be stale" in m["15"].message
    assert "Unable to contact slurm controller" in m["15"].message
    assert m["6"].state == "FAILED" and m["6"].partial.startswith("unknown: squeue -j 15,6: ")
    # accounting down: the controller's record stands and says which query failed
    dbd = q.QueryFailed("sacct -j 15", "exit 1: sacct: error: Problem talking to the database: Connection refused")
    m = q.merge(q.parse_squeue("15|RUNNING|None|0:02|wrap\n"), dbd, ["15"])
    assert m["15"].state == "RUNNING" and "Problem talking to the database" in m["15"].partial


@pytest.mark.unit
def test_job_states_is_a_superset_of_launch_slurm(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, "squeue", "printf '7|RUNNING|None|0:03|train-s1\\n'\n")
    _fake(tmp_path, monkeypatch, "sacct", "printf '7|RUNNING|0:0|None||00:00:03|train-s1\\n"
          "7.batch|RUNNING|0:0||2048|00:00:03|batch\\n'\n")
    st = q.job_states(["7"])["7"]
    assert {k: st[k] for k in ("state", "exit_code", "elapsed", "name")} == \
        {"state": "RUNNING", "exit_code": "0:0", "elapsed": "0:03", "name": "train-s1"}
    assert st["kind"] == "running" and st["max_rss_bytes"] == "2048" and st["source"] == "squeue"


# ------------------------------------------------------------------------------------------------
# slurm: the real cluster
# ------------------------------------------------------------------------------------------------

_OURS: list = []


def sbatch(*args: str, secs: int = 60) -> str:
    cmd = ["sbatch", "--parsable", "-o", "/dev/null", "-J", "ssflctl-states", *args]
    if not any(a.startswith("--wrap") for a in args):
        cmd.append(f"--wrap=sleep {secs}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    jid = out.stdout.strip().split(";")[0]
    _OURS.append(jid)
    return jid


def wait_for(fn, timeout: float, what: str, every: float = 0.5):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not after {timeout:g} s (last: {last!r})")


def record(jid: str):
    """The merged record of one job (asserting the queries answered)."""
    got = q.query([jid], timeout=20).get(jid)
    assert not isinstance(got, q.QueryFailed), str(got)
    return got


def state_is(jid: str, *states: str):
    def check():
        r = record(jid)
        return r if r is not None and r.state in states else None
    return check


def cancel(*jids: str) -> None:
    if jids:
        subprocess.run(["scancel", *jids], capture_output=True, timeout=30)


def _config(key: str) -> str:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(rf"^{key}\s*=\s*(.*)$", out, re.M)
    return m.group(1).strip() if m else ""


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    """The cluster with this module's test QOS (scripts/slurm-cluster.sh of this tree is what
    slurm_cluster ran); every job this module submitted is cancelled at the end."""
    yield slurm_cluster
    cancel(*_OURS)


def _installed_states() -> dict:
    """State names the installed Slurm prints, from every source it has: ``sacct --helpstate`` /
    ``squeue --helpstate`` (24.05+), squeue's list of valid states (22.05+), and the JOB STATE CODES
    of the installed man pages (code + name)."""
    found: dict = {}
    for cmd in (["sacct", "--helpstate"], ["squeue", "--helpstate"]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if p.returncode == 0 and p.stdout.strip():
            found[" ".join(cmd)] = p.stdout.split()
    p = subprocess.run(["squeue", "-t", "no_such_state"], capture_output=True, text=True, timeout=30)
    m = re.search(r"Valid job states include: *(\S+)", p.stderr)
    if m:
        found["squeue -t no_such_state"] = m.group(1).split(",")
    for page in ("sacct", "squeue"):
        for d in ("/usr/share/man/man1", "/usr/local/share/man/man1"):
            f = Path(d) / f"{page}.1.gz"
            if f.exists():
                text = gzip.open(f, "rt", errors="replace").read()
                sec = re.search(r'\.SH "JOB STATE CODES"(.*?)\n\.SH ', text, re.S)
                if sec:
                    pairs = re.findall(r"\\f[B3]([A-Z]{1,3})\s+([A-Z_]+)\\f[RP]", sec.group(1))
                    found[f"man {page}"] = [f"{c}={n}" for c, n in pairs]
                break
    return found


@pytest.mark.slurm
def test_every_state_the_installed_slurm_prints_is_mapped(cluster):
    found = _installed_states()
    assert "squeue -t no_such_state" in found or "squeue --helpstate" in found, found
    problems = []
    for src, names in found.items():
        for n in names:
            code, _, name = n.rpartition("=")
            if ss.unmapped_states([name]):
                problems.append(f"{src}: {name}")
            elif code and ss.STATE_CODES.get(code) != name:
                problems.append(f"{src}: code {code} is {name}, table says {ss.STATE_CODES.get(code)}")
    assert problems == [], f"unmapped Slurm states ({', '.join(found)}): {problems}"


@pytest.mark.slurm
def test_every_reason_the_installed_slurm_documents_is_mapped(cluster):
    found = []
    p = subprocess.run(["sacct", "--helpreason"], capture_output=True, text=True, timeout=30)
    if p.returncode == 0 and p.stdout.strip():  # 24.05+
        found += p.stdout.split()
    f = Path("/usr/share/man/man1/squeue.1.gz")
    if f.exists():
        text = gzip.open(f, "rt", errors="replace").read()
        sec = re.search(r'\.SH "JOB REASON CODES"(.*?)\n\.SH ', text, re.S)
        assert sec, "squeue(1) has no JOB REASON CODES section"
        found += [n.replace("\\", "") for n in re.findall(r"\.TP[^\n]*\n\\fB([\w*\\]+)\\fR", sec.group(1))]
    if not found:
        pytest.skip("neither sacct --helpreason nor squeue(1) is installed")
    assert len(found) > 20 and ss.unmapped_reasons(found) == []


@pytest.mark.slurm
def test_node_down_under_a_running_job_is_node_fail(cluster):
    """scontrol update state=down kills the node's jobs: only when no one else's job runs there.
    --no-requeue: without it Slurm requeues the batch job (sacct -D keeps the NODE_FAIL record)."""
    node = subprocess.run(["sinfo", "-h", "-N", "-p", "gpulab02", "-o", "%N"], capture_output=True, text=True,
                          timeout=30).stdout.split()[0]
    jid = sbatch("--no-requeue", secs=120)
    wait_for(state_is(jid, "RUNNING"), 120, f"job {jid} running")
    others = subprocess.run(["squeue", "-h", "-t", "running,completing,configuring", "-o", "%i"],
                            capture_output=True, text=True, timeout=30).stdout.split()
    if set(others) - {jid}:
        cancel(jid)
        pytest.skip(f"other jobs run on the shared node ({' '.join(sorted(set(others) - {jid}))}); "
                    "setting it DOWN would kill them")
    try:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=ssflctl-test"],
                       check=True, timeout=30)
        r = wait_for(state_is(jid, "NODE_FAIL"), 120, f"job {jid} NODE_FAIL")
    finally:
        st = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], capture_output=True, text=True,
                            timeout=30).stdout.strip()
        if st.startswith(("down", "drain", "drng", "fail")):
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], timeout=30)
        wait_for(lambda: subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], capture_output=True,
                                        text=True, timeout=30).stdout.strip() in ("idle", "mix", "alloc"),
                 30, f"node {node} back")
    assert r.kind is Kind.NODE_FAIL and "ssflctl submit" in r.verdict().hint


@pytest.fixture(scope="module")
def timeout_job(cluster):
    """A 1-minute job started early (after the node test), so that the module waits for its
    TIMEOUT only once, at the end (Slurm checks time limits about every 30 s)."""
    return sbatch("-t", "1", secs=300), time.monotonic()


@pytest.mark.slurm
def test_held_jobs_report_the_hold_and_release(cluster, timeout_job):
    jid = sbatch("--hold", secs=5)
    r = wait_for(state_is(jid, "PENDING"), 20, f"job {jid} pending")
    assert r.reason == "JobHeldUser" and r.verdict().kind is Kind.HELD
    assert f"scontrol release {jid}" in r.verdict().line(jid)
    subprocess.run(["scontrol", "release", jid], check=True, timeout=30)
    wait_for(lambda: record(jid).reason != "JobHeldUser", 20, f"job {jid} released")
    # scontrol hold by root is an admin hold; uhold is the user's
    jid2 = sbatch("--begin=now+1hour", secs=5)
    subprocess.run(["scontrol", "hold", jid2], check=True, timeout=30)
    r = wait_for(lambda: (lambda x: x if x.reason == "JobHeldAdmin" else None)(record(jid2)), 20, "admin hold")
    assert r.verdict().kind is Kind.HELD and "admin" in r.verdict().hint
    subprocess.run(["scontrol", "release", jid2], check=True, timeout=30)
    subprocess.run(["scontrol", "uhold", jid2], check=True, timeout=30)
    r = wait_for(lambda: (lambda x: x if x.reason == "JobHeldUser" else None)(record(jid2)), 20, "user hold")
    cancel(jid2)
    r = wait_for(state_is(jid2, "CANCELLED"), 20, f"job {jid2} cancelled")
    assert r.kind is Kind.CANCELLED


@pytest.mark.slurm
def test_qos_gpu_limit_pends_with_its_reason(cluster, timeout_job):
    a = sbatch("--qos=gpu1user", "--gres=gpu:1", secs=60)
    b = sbatch("--qos=gpu1user", "--gres=gpu:1", secs=60)
    try:
        wait_for(state_is(a, "RUNNING"), 120, f"job {a} running")
        r = wait_for(lambda: (lambda x: x if x.reason == "QOSMaxGRESPerUser" else None)(record(b)), 30,
                     f"job {b} pending on the QOS limit")
        v = r.verdict()
        assert v.kind is Kind.QUEUED and not v.stuck and v.reason.clears_by_waiting
    finally:
        cancel(a, b)


@pytest.mark.slurm
def test_preemption_cancel_and_requeue(cluster, timeout_job):
    if _config("PreemptType") != "preempt/qos":
        pytest.fail("the cluster has no PreemptType=preempt/qos: run this tree's scripts/slurm-cluster.sh up")
    victim = sbatch("--qos=victim-cancel", "--gres=gpu:2", secs=120)
    requeued = None
    try:
        wait_for(state_is(victim, "RUNNING"), 120, f"job {victim} running")
        hi = sbatch("--qos=preemptor", "--gres=gpu:1", secs=3)
        r = wait_for(state_is(victim, "PREEMPTED"), 120, f"job {victim} preempted")
        assert r.kind is Kind.PREEMPTED and r.verdict().hint
        wait_for(state_is(hi, "COMPLETED"), 40, f"preemptor {hi} done")
        # PreemptMode=REQUEUE: the victim pends again (squeue), sacct -D keeps the PREEMPTED record
        requeued = sbatch("--qos=victim-requeue", "--gres=gpu:2", secs=120)
        wait_for(state_is(requeued, "RUNNING"), 120, f"job {requeued} running")
        sbatch("--qos=preemptor", "--gres=gpu:1", secs=3)
        r = wait_for(state_is(requeued, "PENDING", "REQUEUED"), 120, f"job {requeued} requeued")
        assert r.kind is Kind.QUEUED
        dup = subprocess.run(["sacct", "-D", "-X", "-P", "-n", "-j", requeued, "-o", "JobID,State"],
                             capture_output=True, text=True, timeout=30).stdout
        wait_for(lambda: "PREEMPTED" in subprocess.run(
            ["sacct", "-D", "-X", "-P", "-n", "-j", requeued, "-o", "JobID,State"], capture_output=True, text=True,
            timeout=30).stdout, 20, f"sacct -D PREEMPTED record of {requeued} ({dup!r})")
    finally:
        cancel(victim, *([requeued] if requeued else []))


@pytest.mark.slurm
def test_exit_code_signal_and_maxrss_from_the_real_cluster(cluster, timeout_job):
    a = sbatch("--mem=1G", "--wrap=python3 -c 'x = bytearray(200 << 20); x[::4096] = b\"a\" * len(x[::4096]); "
               "import time; time.sleep(5)'; exit 3")
    b = sbatch("--wrap=kill -9 $$")
    # the controller's record comes first; sacct's exit code and MaxRSS a moment later: wait for both
    ra = wait_for(lambda: (lambda x: x if x and x.state == "FAILED" and x.max_rss_bytes and x.exit_code is not None
                           else None)(record(a)), 120, f"job {a} failed with MaxRSS and its exit code")
    assert ra.exit_code == 3 and ra.signal is None and ra.max_rss_bytes > 150 << 20
    rb = wait_for(lambda: (lambda x: x if x and x.state == "FAILED" and x.signal else None)(record(b)),
                  120, f"job {b} failed with a signal")
    assert rb.signal == 9 and rb.signal_name == "SIGKILL" and rb.exit_text == "killed by SIGKILL (signal 9)"


@pytest.mark.slurm
def test_out_of_memory(cluster, timeout_job):
    if "OverMemoryKill" not in _config("JobAcctGatherParams"):
        pytest.skip("the cluster does not enforce memory (SSFLCTL_SLURM_MEM_ENFORCE=1 scripts/slurm-cluster.sh up)")
    jid = sbatch("--mem=100M", "--wrap=python3 -c 'x = bytearray(400 << 20); x[::4096] = b\"a\" * len(x[::4096]); "
                 "import time; time.sleep(30)'")
    r = wait_for(lambda: (lambda x: x if x and x.kind not in ss.ACTIVE_KINDS else None)(record(jid)), 60,
                 f"job {jid} ended")
    # jobacct_gather's OverMemoryKill cancels the step with SIGKILL (Slurm 22.05 with task/none: no
    # OUT_OF_MEMORY state, which needs task/cgroup): whatever Slurm says is reported as such
    assert r.kind in (Kind.OOM, Kind.FAILED, Kind.CANCELLED), r
    assert r.kind is Kind.OOM or r.signal == 9, r


@pytest.mark.slurm
def test_unreachable_controller_is_unknown(cluster, tmp_path, monkeypatch):
    """squeue against a controller port nothing listens on (a copy of slurm.conf): no daemon is stopped."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    conf = re.sub(r"(?m)^SlurmctldPort=.*$", "", conf) + "\nSlurmctldPort=1\n"
    (tmp_path / "slurm.conf").write_text(conf)
    for f in ("gres.conf",):
        if Path("/etc/slurm", f).exists():
            shutil.copy(Path("/etc/slurm", f), tmp_path / f)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    got = q.query_squeue(["1"], timeout=60)
    assert isinstance(got, q.QueryFailed), got
    assert str(got).startswith("unknown: squeue ") and "Unable to contact slurm controller" in got.message


@pytest.mark.slurm
def test_slurmdbd_down_makes_sacct_unknown(cluster):
    pidfile = Path("/var/lib/ssflctl-slurm/run/slurmdbd.pid")
    if not pidfile.exists() or os.geteuid() != 0:
        pytest.skip("needs root and the cluster of scripts/slurm-cluster.sh")
    pid = int(pidfile.read_text().strip())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "slurmdbd"
    try:
        os.kill(pid, 15)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 20, "slurmdbd stopped")
        got = q.query_sacct(["1"], timeout=20)
        assert isinstance(got, q.QueryFailed), got
        assert str(got).startswith("unknown: sacct ") and "Problem talking to the database" in got.message
        st = q.job_states(["999999"])  # neither knows it; sacct failed: unknown, not absent
        assert st["999999"]["kind"] == "unknown" and "database" in st["999999"]["error"]
    finally:
        up = subprocess.run(["bash", str(REPO / "scripts" / "slurm-cluster.sh"), "up"], capture_output=True,
                            text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
    assert isinstance(q.query_sacct(["1"]), dict)


@pytest.mark.slurm
def test_time_limit_is_timeout(cluster, timeout_job):
    jid, t0 = timeout_job
    r = wait_for(state_is(jid, "TIMEOUT"), max(10.0, 150 - (time.monotonic() - t0)), f"job {jid} TIMEOUT", every=2)
    assert r.kind is Kind.TIMEOUT and "resources.time" in r.verdict().hint
