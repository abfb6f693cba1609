"""Cityscapes → COCO conversion: `ssflctl convert cityscapes` against MMDetection's converter.

Both run in one go on the same generated full-size (2048×1024) data, made by
``ssflctl.convert.synth_cityscapes`` with cityscapesscripts (cached under $SSFLCTL_CACHE or
/tmp/ssflctl-cache). The reference is ``mmdet/.mim/tools/dataset_converters/cityscapes.py`` from the
installed mmdet, run as users run it (``python cityscapes.py ROOT --nproc N -o OUT``); its images/s
come from its own "It took Xs" timers (import time excluded), summed over train, val and test.
Ours is ``ssflctl.convert.cityscapes.convert`` timed around the whole call (listing, checks,
decoding, encoding, JSON writing). The floor is decoding every instanceIds PNG and nothing else,
one process, with the decoder the converter uses.

    python benchmarks/bench_convert.py            # 120 + 2 + 2 images, --nproc 1 and 2
    python benchmarks/bench_convert.py --quick    # 40 + 2 + 2 images
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

SIZE = (2048, 1024)


def reference_script() -> Path:
    try:
        import mmdet
    except ImportError as exc:
        raise RuntimeError(f"the reference needs mmdet (the training stack): {exc}") from exc
    path = Path(mmdet.__file__).parent / ".mim" / "tools" / "dataset_converters" / "cityscapes.py"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the mmdet install")
    return path


def dataset(n_train: int) -> Path:
    from ssflctl.convert.synth_cityscapes import cached

    # val and test must exist for the reference ("No images found" otherwise)
    return cached(n_train, 2, 2, SIZE, seed=0, nproc=max(1, min(4, os.cpu_count() or 1)))


def count_images(root: Path) -> int:
    return sum(1 for _ in (root / "leftImg8bit").glob("*/*/*_leftImg8bit.png"))


def time_floor(root: Path) -> float:
    """Seconds to decode every instanceIds PNG (one process, the converter's decoder)."""
    from ssflctl.convert.cityscapes import read_png

    files = sorted(str(p) for p in (root / "gtFine").glob("*/*/*_gtFine_instanceIds.png"))
    for f in files[:3]:
        read_png(f)  # warm up the decoder import
    t0 = time.perf_counter()
    for f in files:
        read_png(f)
    return time.perf_counter() - t0


def time_reference(root: Path, nproc: int, out: Path) -> float:
    proc = subprocess.run(
        [sys.executable, str(reference_script()), str(root), "--nproc", str(nproc), "-o", str(out)],
        capture_output=True, text=True, cwd=out.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"reference converter failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    took = [float(x) for x in re.findall(r"It took ([0-9.eE+-]+)s", proc.stdout)]
    if len(took) != 3:
        raise RuntimeError(f"could not read the reference's timers:\n{proc.stdout[-2000:]}")
    return sum(took)


def time_ours(root: Path, nproc: int, out: Path) -> float:
    from ssflctl.convert.cityscapes import convert

    t0 = time.perf_counter()
    summary = convert(root, out, nproc=nproc, force=True, progress=False)
    time_ours.annotations = sum(s.annotations for s in summary.splits)
    return time.perf_counter() - t0


def run(quick: bool = False, nprocs=(1, 2), repeats: int | None = None) -> list[dict]:
    from ssflctl.convert.cityscapes import _decoder, convert

    n_train = 40 if quick else 120
    repeats = repeats or (1 if quick else 2)  # interleaved; the best of each (the machine may be shared)
    root = dataset(n_train)
    n = count_images(root)
    decoder = _decoder()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        convert(root, tmp / "warm", splits=["val"], progress=False)  # imports, page cache
        floor_s = float("inf")
        ref = {p: float("inf") for p in nprocs}
        ours = {p: float("inf") for p in nprocs}
        for _ in range(repeats):  # interleaved, so a busy spell hurts both sides alike
            floor_s = min(floor_s, time_floor(root))
            for nproc in nprocs:
                ref[nproc] = min(ref[nproc], time_reference(root, nproc, tmp / f"ref{nproc}"))
                ours[nproc] = min(ours[nproc], time_ours(root, nproc, tmp / f"ours{nproc}"))
        ours_1 = ours.get(1)
        for nproc in nprocs:
            ref_s, ours_s = ref[nproc], ours[nproc]
            ref_ips, ours_ips = n / ref_s, n / ours_s
            results.append({
                "name": f"convert cityscapes --nproc {nproc}",
                "value": ours_ips,
                "reference": ref_ips,
                "ratio": ours_ips / ref_ips,
                "unit": "images/s",
                "note": (f"{n} images {SIZE[0]}x{SIZE[1]}; mmdet converter {1000 * ref_s / n:.1f} ms/image, "
                         f"ours {1000 * ours_s / n:.1f} ms/image (best of {repeats}); "
                         f"{time_ours.annotations / n:.1f} annotations/image; "
                         f"target ratio >= 5"),
            })
        if ours_1 is not None:
            results.append({
                "name": "convert cityscapes --nproc 1 vs PNG-decode floor",
                "value": n / ours_1,
                "reference": n / floor_s,
                "ratio": floor_s / ours_1,
                "unit": "images/s",
                "note": (f"decoding the instanceIds PNG alone ({decoder}): {1000 * floor_s / n:.1f} ms/image; "
                         f"ours {1000 * ours_1 / n:.1f} ms/image = {ours_1 / floor_s:.2f}x the floor (best of {repeats})"),
            })
    return results


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nproc", default="1,2", help="comma-separated process counts (default 1,2)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats, best kept (default 2; 1 with --quick)")
    args = ap.parse_args(argv)
    rows = run(args.quick, nprocs=[int(x) for x in args.nproc.split(",") if x], repeats=args.repeats)
    for r in rows:
        print(f"{r['name']:<50} ours {r['value']:8.1f} {r['unit']}  reference {r['reference']:8.1f}  "
              f"ratio {r['ratio']:5.2f}  ({r['note']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
