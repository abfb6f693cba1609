"""CLI start-up: `ssflctl --help` against `python -c pass` (the interpreter's own floor).

Target from issue 2: `ssflctl --help` under 0.3 s here. The ratio printed is
(target budget 0.3 s) / (measured median); the note gives the overhead over bare Python.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

TARGET_S = 0.3


def _median_time(cmd: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    n = 5 if quick else 21
    bare = _median_time([sys.executable, "-c", "pass"], n)
    ours = _median_time([sys.executable, "-m", "ssflctl.cli", "--help"], n)
    return [
        {
            "name": "ssflctl --help start-up (median)",
            "value": ours,
            "reference": TARGET_S,
            "ratio": TARGET_S / ours,
            "unit": "s",
            "note": f"python -c pass: {bare:.3f} s; overhead {ours - bare:.3f} s; target < {TARGET_S} s",
        }
    ]
