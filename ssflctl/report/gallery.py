"""The HTML report's gallery: for one run of each configuration (and dataset), a few test images
drawn by `ssflctl show` (ground truth | predictions), shrunk and embedded as JPEG data.

The run shown is the finished run with the lowest seed (then run id) whose result attempt has a
detections dump. Configurations without one get a line saying why instead of pictures; a gallery
never fails the report.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import List, Tuple

from ssflctl.errors import UserError
from ssflctl.workdir.layout import AttemptDir

MAX_WIDTH = 960     # px of one GT | predictions picture in the page
JPEG_QUALITY = 85
DEFAULT_SCORE_THR = 0.3


def _seed_key(r: dict):
    from ssflctl.report.aggregate import SEED_AXIS, _sort_key

    return (_sort_key(r["axes"].get(SEED_AXIS)), str(r.get("run_id") or ""))


def _result_dir(r: dict):
    for a in r.get("attempts") or []:
        if a.get("attempt") == r.get("final") and a.get("dir"):
            return a["dir"]
    return None


def pick_runs(rep) -> List[Tuple[str, object, str]]:
    """[(caption, attempt dir or None, why none)] for every configuration x dataset with runs."""
    from ssflctl.report.aggregate import _fmt_value

    out = []
    for key, (label, axes) in zip(rep.cfg_keys, rep.configs):
        named = " ".join(f"{a}={_fmt_value(v)}" for a, v in axes.items() if v is not None) or label
        for ds in rep.datasets:
            recs = [r for r in rep.records if r["_cfg"] == key and r["_ds"] == ds]
            if not recs:
                continue
            cap = f"{named}{' on ' + ds if ds else ''}"
            done = sorted((r for r in recs if r["state"] == "done" and r.get("metrics")), key=_seed_key)
            if not done:
                out.append((cap, None, "no finished run"))
                continue
            tested = [(r, d) for r in done for d in [_result_dir(r)]
                      if d and AttemptDir(d).has_detections]
            if not tested:
                out.append((cap, None, "no detections.bbox.json in its runs' result attempts"))
                continue
            r, d = tested[0]
            out.append((f"{cap}: {r['run_id'] or r['name']} ({os.path.basename(d)})", d, ""))
    return out


def _shrink(png_path: Path) -> bytes:
    from PIL import Image

    with Image.open(png_path) as im:
        im = im.convert("RGB")
        if im.width > MAX_WIDTH:
            im = im.resize((MAX_WIDTH, max(1, round(im.height * MAX_WIDTH / im.width))), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def draw(rep, n: int, score_thr: float = DEFAULT_SCORE_THR, progress: bool = False) -> list:
    """[(caption, [(image name, JPEG bytes)], why-empty)] for the report's configurations."""
    from ssflctl.report import show

    if n < 1:
        return []
    picks = pick_runs(rep)
    out = []
    with tempfile.TemporaryDirectory(prefix="ssflctl-gallery-") as tmp:
        from rich.progress import track

        for i, (cap, adir, why) in enumerate(track(picks, description="gallery", disable=not progress,
                                                   transient=True)):
            if adir is None:
                out.append((cap, [], why))
                continue
            try:
                paths = show.show(adir, n=n, score_thr=score_thr, out_dir=Path(tmp) / str(i), force=True)
            except (UserError, OSError) as exc:
                out.append((cap, [], str(exc)))
                continue
            out.append((cap, [(p.stem, _shrink(p)) for p in paths], ""))
    return out
