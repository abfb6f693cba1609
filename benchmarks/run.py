"""Run every benchmark and print each figure as a ratio against its reference.

    python -m benchmarks.run            # full sizes
    python -m benchmarks.run --quick    # small sizes (a smoke run)
    python -m benchmarks.run cli report # only some

Each ``benchmarks/bench_<name>.py`` exposes ``run(quick: bool) -> list[dict]`` with keys
``name, value, reference, ratio, unit, note``; ratio > 1 means ssflctl is better than the
reference measured in the same run (or than the target, where the reference is a budget).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))


def machine_facts() -> dict:
    facts = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load": round(os.getloadavg()[0], 2),  # 1-min load average when the run started
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return facts


def discover() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(discover())})")
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--json", type=Path, help="also write all results here")
    args = ap.parse_args(argv)
    names = args.names or discover()
    facts = machine_facts()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    results, failed = [], []
    for name in names:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"benchmarks.bench_{name}")
            rows = mod.run(quick=args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        for row in rows:
            row.setdefault("bench", name)
            results.append(row)
            if row.get("ratio") is None:
                print(f"{row['bench']:>8} | {row['name']:<44} {row.get('note', '')}")
                continue
            print(
                f"{row['bench']:>8} | {row['name']:<44} ratio {row['ratio']:>8.2f}x  "
                f"(ours {row['value']:.4g} {row.get('unit', '')} vs ref {row['reference']:.4g})  {row.get('note', '')}"
            )
        print(f"{'':>8} | ({name} took {time.perf_counter() - t0:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps({"machine": facts, "results": results}, indent=2))
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
