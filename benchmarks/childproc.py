"""A measured child process: wall seconds, CPU seconds and its own peak resident memory.

``os.wait4``'s ``ru_maxrss`` is no honest peak for a child of a large process: Linux carries the
forked parent's high-water mark over ``exec`` (``exec_mmap`` keeps the old mm's hiwater in the
signal struct), so a report run from ``benchmarks.run`` after the COCO and loss benchmarks read
1766 MB where the command alone peaks at 277 MB (``/usr/bin/time -f %M``). The child here reads its
own ``VmHWM`` from ``/proc/self/status`` at exit (the current image only) and hands it back.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

_BOOT = r"""
import atexit, os, runpy, sys

def _hwm(path=os.environ["BENCH_HWM_FILE"]):
    with open("/proc/self/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(str(kb))

atexit.register(_hwm)
kind, target, *rest = sys.argv[1:]
if kind == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(target, "<child>", "exec"), {"__name__": "__main__"})
"""


def run(kind: str, target: str, args: List[str], env: Optional[dict] = None, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL) -> dict:
    """Run ``python -m target args`` (kind ``-m``) or ``python -c target args`` (kind ``-c``):
    {"rc", "wall_s", "cpu_s", "peak_mb"} (peak_mb None where /proc is missing)."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        hwm = Path(tmp) / "hwm"
        env = dict(env if env is not None else os.environ, BENCH_HWM_FILE=str(hwm))
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", _BOOT, kind, target, *map(str, args)], env=env, stdout=stdout,
                             stderr=stderr)
        _, status, ru = os.wait4(p.pid, 0)  # CPU time is the child's own
        wall = time.perf_counter() - t0
        peak = int(hwm.read_text()) * 1024 / 1e6 if hwm.exists() else None
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_mb": peak}
