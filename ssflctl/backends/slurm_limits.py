"""What the Slurm cluster lets one submission send: read once per submission (issue 15.4).

* ``scontrol show config``: ``MaxArraySize`` (an array's task indices are 0..MaxArraySize-1, so
  at most MaxArraySize tasks per array) and ``MaxJobCount`` (jobs slurmctld holds at once; every
  array task counts once it is split off, so it is counted per task here), against ``squeue -r``.
* ``sacctmgr show assoc`` (``MaxSubmit`` of the user's association) and ``sacctmgr show qos``
  (``MaxSubmitPU`` of the QOS the jobs go to), against the user's jobs in the queue (``squeue -r
  -u``, per QOS and account where the limit is).

A limit that cannot be read (no accounting, a command missing or slow) is left out with a note:
the submission is then split and checked by what is known, and sbatch still has the last word
(a refusal leaves the runs pending with its reason). Tests inject limits by replacing
:func:`read_limits` (the cluster is shared: its slurm.conf is not changed for a test).
"""
from __future__ import annotations

import getpass
import os
import re
import subprocess
from typing import Any, Dict, List, Optional, Tuple

from ssflctl.backends.base import Limits

TIMEOUT_S = 20.0


def _run(cmd: List[str]) -> Tuple[Optional[str], str]:
    """(stdout, "") or (None, why)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        return None, f"{cmd[0]} is not installed"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{' '.join(cmd[:3])}: {exc}"
    if p.returncode != 0:
        return None, f"{' '.join(cmd[:3])}: {(p.stderr or p.stdout).strip()[:200]}"
    return p.stdout, ""


def parse_config(text: str) -> Dict[str, str]:
    """``scontrol show config`` as {key: value}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _int(v: Any) -> Optional[int]:
    try:
        n = int(str(v).strip())
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


def user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry (containers)
        return os.environ.get("USER", "")


def read_limits(options: Dict[str, Any]) -> Limits:
    """The cluster's limits for a submission with these executor options (partition, qos, account)."""
    lim = Limits()
    text, why = _run(["scontrol", "show", "config"])
    conf = parse_config(text) if text is not None else {}
    if text is None:
        lim.notes.append(f"MaxArraySize/MaxJobCount not read ({why})")
    lim.max_array_size = _int(conf.get("MaxArraySize"))
    lim.max_job_count = _int(conf.get("MaxJobCount"))
    me = user()
    queue, why = _run(["squeue", "-h", "-r", "-o", "%u|%q|%a"])
    rows = [line.split("|") for line in (queue or "").splitlines() if line.strip()]
    if queue is None:
        lim.notes.append(f"jobs in the queue not read ({why})")
    else:
        lim.jobs_in_system = len(rows)
    cluster = conf.get("ClusterName")
    where = [f"user={me}"] + ([f"cluster={cluster}"] if cluster else [])
    assoc, why = _run(["sacctmgr", "-n", "-P", "show", "assoc", "where", *where,
                       "format=account,partition,defaultqos,maxsubmit"])
    if assoc is None:
        lim.notes.append(f"MaxSubmitJobs not read ({why})")
        return lim
    account, qos = options.get("account"), options.get("qos")
    arows = [line.split("|") for line in assoc.splitlines() if line.count("|") >= 3]
    if account:
        arows = [r for r in arows if r[0] == account] or arows
    partition = options.get("partition")
    arows = [r for r in arows if not r[1] or not partition or r[1] == partition] or arows
    candidates: List[Tuple[int, str, int]] = []   # (limit, source, my jobs it counts)
    mine = [r for r in rows if r and r[0] == me]
    for acct, _part, defqos, maxsubmit in (r[:4] for r in arows):
        n = _int(maxsubmit)
        if n is not None and maxsubmit.strip():
            candidates.append((n, f"the association of account {acct} (MaxSubmit)",
                               sum(1 for r in mine if len(r) > 2 and r[2] == acct)))
        qos = qos or defqos or None
    if qos:
        q, why = _run(["sacctmgr", "-n", "-P", "show", "qos", "where", f"name={qos}", "format=name,maxsubmitpu"])
        if q is None:
            lim.notes.append(f"QOS {qos} MaxSubmitPU not read ({why})")
        for line in (q or "").splitlines():
            name, _, val = line.partition("|")
            n = _int(val)
            if name == qos and n is not None and val.strip():
                candidates.append((n, f"QOS {qos} (MaxSubmitJobsPerUser)",
                                   sum(1 for r in mine if len(r) > 1 and r[1] == qos)))
    if candidates:
        # the tightest room decides
        n, source, used = min(candidates, key=lambda c: c[0] - c[2])
        lim.max_submit_jobs, lim.submit_source, lim.jobs_queued = n, source, used
    return lim
