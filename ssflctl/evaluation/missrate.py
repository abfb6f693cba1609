"""Pedestrian metrics: miss rate against false positives per image (FPPI) and the log-average
miss rate MR⁻² of the Caltech protocol, from COCO ground truth and a COCO results dump
(``detections.bbox.json``, the file ssflctl's test step writes).

The protocol follows Piotr Dollár's Computer Vision Matlab Toolbox (v3.26, ``bbGt.m`` and the
Caltech ``dbEval.m``), the reference implementation used for Caltech and KAIST results:

* matching (``bbGt>evalRes``): detections of the class, sorted by score (descending), are matched
  greedily, each to the unmatched ground-truth box of highest IoU ≥ 0.5; a detection with no such
  box that overlaps an *ignore* region (COCO ``iscrowd: 1`` or an ``ignore: 1`` annotation) by
  intersection/detection-area ≥ 0.5 is ignored (neither TP nor FP); ignore regions may absorb any
  number of detections; the rest are false positives;
* the curve (``bbGt>compRoc`` with ``roc=1``): after each detection in score order,
  FPPI = cumulative FP / number of images, recall = cumulative TP / number of (non-ignored) boxes;
* the reference points: ``ref = 10.^(-2:.25:0)``, nine FPPI values evenly spaced in log space over
  [10⁻², 10⁰]; at each, the recall of the *last* curve point whose FPPI ≤ ref is taken (with a
  sentinel point (FPPI −∞, recall 0), so a reference point left of the whole curve has miss rate 1):
  ``xs1=[-inf; xs]; ys1=[0; ys]; for i=1:m, j=find(xs1<=ref(i)); ref(i)=ys1(j(end)); end``;
* the summary (``dbEval.m``): ``miss = exp(mean(log(max(1e-10, 1 - recall_at_ref))))`` — the
  geometric mean of the nine miss rates, with 1e-10 standing in for a miss rate of 0.

Optionally (``height_range``, ``--min-height``) the Caltech experiment filter of ``dbEval.m``
(``defineExps``): boxes outside the height range become ignore regions and detections outside it
by more than a factor 1.25 are dropped ("reasonable": height >= 50 px). dbEval's other steps
(visibility filter, resizing boxes to aspect ratio 0.41) are not applied.

Subsets (e.g. KAIST day/night) are evaluated as separate image sets: the FPPI denominator is the
number of images in the subset.

Pure Python + numpy; matplotlib only inside ``plot``.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ssflctl.atomic import load_json
from ssflctl.errors import UserError
from ssflctl.workdir.layout import AttemptDir

REF_FPPI = tuple(10.0 ** (-2.0 + 0.25 * k) for k in range(9))
EPS = 1e-10
IOU_THR = 0.5


@dataclass
class MissRate:
    """One miss-rate evaluation (a class on a set of images)."""

    name: str
    lamr: Optional[float]                 # MR⁻² (None when the subset has no ground-truth boxes)
    mr_at_ref: List[float]                # miss rate at each of REF_FPPI
    fppi: List[float] = field(default_factory=list)     # the curve, one point per counted detection
    miss: List[float] = field(default_factory=list)
    num_images: int = 0
    num_gt: int = 0
    num_ignored_gt: int = 0
    num_dets: int = 0

    def as_dict(self) -> dict:
        return {"name": self.name, "lamr": self.lamr, "mr_at_ref": self.mr_at_ref,
                "ref_fppi": list(REF_FPPI), "num_images": self.num_images, "num_gt": self.num_gt,
                "num_ignored_gt": self.num_ignored_gt, "num_dets": self.num_dets}


# --------------------------------------------------------------------------------------------
# geometry


def _xyxy(b: Sequence[float]):
    x, y, w, h = (float(v) for v in b[:4])
    return x, y, x + w, y + h


def _inter(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    return iw * ih if iw > 0 and ih > 0 else 0.0


def _area(a) -> float:
    return max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])


def iou(a, b) -> float:
    """IoU of two COCO [x, y, w, h] boxes."""
    a, b = _xyxy(a), _xyxy(b)
    i = _inter(a, b)
    u = _area(a) + _area(b) - i
    return i / u if u > 0 else 0.0


# --------------------------------------------------------------------------------------------
# the metric


def match_image(gts: Sequence[Sequence[float]], ignores: Sequence[Sequence[float]],
                dets: Sequence[tuple], iou_thr: float = IOU_THR) -> List[tuple]:
    """Match one image's detections ``[(score, bbox), ...]``; returns ``[(score, label)]`` with
    label 1 (TP), 0 (FP) or -1 (ignored), in descending score order."""
    gt_boxes = [_xyxy(g) for g in gts]
    ig_boxes = [_xyxy(g) for g in ignores]
    used = [False] * len(gt_boxes)
    out = []
    for score, bbox in sorted(dets, key=lambda d: -float(d[0])):
        d = _xyxy(bbox)
        best, best_j = iou_thr, -1
        for j, g in enumerate(gt_boxes):
            if used[j]:
                continue
            i = _inter(d, g)
            u = _area(d) + _area(g) - i
            o = i / u if u > 0 else 0.0
            if o >= best:
                best, best_j = o, j
        if best_j >= 0:
            used[best_j] = True
            out.append((float(score), 1))
            continue
        da = _area(d)
        if da > 0 and any(_inter(d, g) / da >= iou_thr for g in ig_boxes):
            out.append((float(score), -1))
        else:
            out.append((float(score), 0))
    return out


def curve(labelled: Iterable[tuple], num_images: int, num_gt: int):
    """FPPI and miss rate after each counted detection (score order); ignored ones are dropped."""
    pts = [(s, l) for s, l in labelled if l != -1]
    pts.sort(key=lambda p: -p[0])  # stable: equal scores keep image order
    fppi, miss = [], []
    tp = fp = 0
    for _, lab in pts:
        if lab == 1:
            tp += 1
        else:
            fp += 1
        fppi.append(fp / num_images)
        miss.append(1.0 - tp / num_gt)
    return fppi, miss


def mr_at_ref(fppi: Sequence[float], miss: Sequence[float], ref: Sequence[float] = REF_FPPI) -> List[float]:
    """Miss rate at each reference FPPI: that of the last curve point with FPPI ≤ ref (bbGt compRoc)."""
    out = []
    for r in ref:
        m = 1.0  # the sentinel point (FPPI -inf, recall 0)
        for f, mr in zip(fppi, miss):
            if f <= r:
                m = mr
            else:
                break  # FPPI is non-decreasing along the curve
        out.append(m)
    return out


def log_average(mrs: Sequence[float]) -> float:
    """exp(mean(log(max(1e-10, mr)))) — dbEval.m's summary."""
    return math.exp(sum(math.log(max(EPS, m)) for m in mrs) / len(mrs))


def _category_id(gt: dict, category: Union[str, int]) -> int:
    cats = gt.get("categories") or []
    for c in cats:
        if str(c.get("name")) == str(category):
            return int(c["id"])
    if isinstance(category, int) or str(category).isdigit():
        for c in cats:
            if int(c["id"]) == int(category):
                return int(c["id"])
    names = ", ".join(str(c.get("name")) for c in cats) or "none"
    raise UserError(f"--missrate {category!r}: no such class in the ground truth; classes: {names}")


def evaluate_images(gt: dict, dets: list, category: Union[str, int], image_ids: Optional[Iterable[int]] = None,
                    name: str = "all", iou_thr: float = IOU_THR,
                    height_range: Optional[Tuple[float, float]] = None) -> MissRate:
    """MR⁻² of one class on a set of images (default: every image in ``gt``).

    ``height_range=(lo, hi)`` is the Caltech experiment filter (dbEval.m ``defineExps``, e.g.
    "reasonable" = [50, inf)): boxes with height outside [lo, hi) become ignore regions, and
    detections with height outside [lo / 1.25, hi * 1.25) are dropped before matching."""
    cid = _category_id(gt, category)
    lo, hi = (float(height_range[0]), float(height_range[1])) if height_range else (0.0, math.inf)
    # image ids as in the files (ints in COCO; mmdet's VOC->COCO conversion writes strings)
    ids = [im["id"] for im in gt.get("images", [])] if image_ids is None else list(image_ids)
    idset = set(ids)
    per_gt: Dict[Any, list] = {i: [] for i in ids}
    per_ig: Dict[Any, list] = {i: [] for i in ids}
    for a in gt.get("annotations", []):
        iid = a["image_id"]
        if iid not in idset or int(a["category_id"]) != cid:
            continue
        outside = not lo <= float(a["bbox"][3]) < hi
        (per_ig if (a.get("iscrowd") or a.get("ignore") or outside) else per_gt)[iid].append(a["bbox"])
    per_dt: Dict[Any, list] = {i: [] for i in ids}
    for d in dets:
        iid = d["image_id"]
        if iid in idset and int(d["category_id"]) == cid and lo / 1.25 <= float(d["bbox"][3]) < hi * 1.25:
            per_dt[iid].append((float(d["score"]), d["bbox"]))
    num_gt = sum(len(v) for v in per_gt.values())
    num_ig = sum(len(v) for v in per_ig.values())
    num_dets = sum(len(v) for v in per_dt.values())
    if not ids or num_gt == 0:
        return MissRate(name, None, [float("nan")] * len(REF_FPPI), [], [], len(ids), num_gt, num_ig, num_dets)
    labelled = []
    for i in ids:
        labelled += match_image(per_gt[i], per_ig[i], per_dt[i], iou_thr)
    fppi, miss = curve(labelled, len(ids), num_gt)
    mrs = mr_at_ref(fppi, miss)
    return MissRate(name, log_average(mrs), mrs, fppi, miss, len(ids), num_gt, num_ig, num_dets)


def subsets_by_field(gt: dict, field_name: str) -> Dict[str, list]:
    """Image ids grouped by the value of an image field (e.g. ``daytime``: ``day``/``night``).
    Boolean fields name their groups ``FIELD`` and ``not-FIELD``."""
    groups: Dict[str, list] = {}
    missing = 0
    for im in gt.get("images", []):
        if field_name not in im:
            missing += 1
            continue
        v = im[field_name]
        key = (field_name if v else f"not-{field_name}") if isinstance(v, bool) else str(v)
        groups.setdefault(key, []).append(im["id"])
    if not groups:
        raise UserError(f"--subset-field {field_name!r}: no image in the ground truth has this field; "
                        f"fields present: {', '.join(sorted({k for im in gt.get('images', []) for k in im}))}")
    return dict(sorted(groups.items()))


def subset_from_list(gt: dict, names: Iterable[Union[str, int]], label: str = "list") -> list:
    """Image ids for a list of image ids or file names (basename or as in the ground truth)."""
    by_name = {}
    for im in gt.get("images", []):
        fn = str(im.get("file_name", ""))
        by_name[fn] = im["id"]
        by_name.setdefault(Path(fn).name, im["id"])
    known_ids = {str(im["id"]): im["id"] for im in gt.get("images", [])}
    out, unknown = [], []
    for n in names:
        s = str(n).strip()
        if not s:
            continue
        if s in by_name:
            out.append(by_name[s])
        elif s in known_ids:
            out.append(known_ids[s])
        else:
            unknown.append(s)
    if unknown:
        raise UserError(f"{label}: {len(unknown)} image(s) not in the ground truth, e.g. {unknown[0]!r}; "
                        "list image ids or file names, one per line")
    return out


def evaluate(ann_file, dets_file, category: Union[str, int], *, subset_field: Optional[str] = None,
             subsets: Optional[Mapping[str, Iterable]] = None, iou_thr: float = IOU_THR,
             height_range: Optional[Tuple[float, float]] = None) -> Dict[str, MissRate]:
    """MR⁻² for all images, then per subset (by an image field and/or named lists of images)."""
    kw = dict(iou_thr=iou_thr, height_range=height_range)
    gt = ann_file if isinstance(ann_file, dict) else load_json(ann_file, "ground-truth annotation file")
    dets = dets_file if isinstance(dets_file, list) else load_json(dets_file, "detections dump")
    if not isinstance(dets, list):
        raise UserError(f"{dets_file}: not a COCO results list")
    out = {"all": evaluate_images(gt, dets, category, None, "all", **kw)}
    if subset_field:
        for key, ids in subsets_by_field(gt, subset_field).items():
            out[key] = evaluate_images(gt, dets, category, ids, key, **kw)
    for key, names in (subsets or {}).items():
        out[key] = evaluate_images(gt, dets, category, subset_from_list(gt, names, key), key, **kw)
    return out


# --------------------------------------------------------------------------------------------
# the plot


def plot(results: Mapping[str, MissRate], out_path, title: str = "") -> Path:
    """Miss rate against FPPI on log-log axes (Caltech style), one curve per subset; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssflctl.atomic import write_bytes

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for key, r in results.items():
        if r.lamr is None:
            continue
        xs = [1e-4] + [max(f, 1e-4) for f in r.fppi]
        ys = [1.0] + [max(m, 1e-3) for m in r.miss]
        ax.step(xs, ys, where="post", label=f"{key}: MR⁻² {100 * r.lamr:.1f}%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1e1)
    ax.set_ylim(0.05, 1.0)
    for r in REF_FPPI:
        ax.axvline(r, color="0.85", lw=0.5, zorder=0)
    ax.set_xlabel("false positives per image")
    ax.set_ylabel("miss rate")
    if title:
        ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes(Path(out_path), buf.getvalue())


# --------------------------------------------------------------------------------------------
# runs (for `ssflctl report --missrate`)


def attempt_files(attempt_dir) -> tuple:
    """(ann_file, detections file) of a tested attempt: metrics.json's ann_file, else config.py's
    test_evaluator.ann_file (read with mmengine)."""
    a = AttemptDir(attempt_dir)
    adir, dets = a.path, a.detections_path
    if not dets.is_file():
        raise UserError(f"{adir}: no detections.bbox.json (the run has not been tested)")
    ann = None
    mpath = a.metrics_path
    if mpath.is_file():
        ann = (load_json(mpath, mpath.name) or {}).get("ann_file")
    if not ann:
        ann = config_ann_file(adir)
    if not ann:
        raise UserError(f"{adir}: cannot find the test annotation file (no ann_file in metrics.json "
                        "or config.py's test_evaluator)")
    return Path(ann), dets


def config_ann_file(adir) -> Optional[str]:
    """test_evaluator.ann_file of an attempt's config.py (mmengine), or None."""
    cfg_path = AttemptDir(adir).config_path
    if not cfg_path.is_file():
        return None
    from mmengine.config import Config

    cfg = Config.fromfile(str(cfg_path))
    ev = cfg.get("test_evaluator")
    for e in (ev if isinstance(ev, (list, tuple)) else [ev]):
        if isinstance(e, dict) and e.get("ann_file"):
            return str(e["ann_file"])
    return None


def _tested_attempt(rec: dict) -> Optional[str]:
    for a in reversed(rec.get("attempts") or []):
        d = a.get("dir")
        if d and AttemptDir(d).has_detections:
            return d
    return None


def read_subset_lists(specs: Iterable[str]) -> Dict[str, List[str]]:
    """``NAME=FILE`` options -> {NAME: [image id or file name, ...]} (one a line, # comments)."""
    out: Dict[str, List[str]] = {}
    for spec in specs:
        name, sep, file = str(spec).partition("=")
        if not sep or not name.strip() or not file.strip():
            raise UserError(f"--subset-list {spec!r}: expected NAME=FILE (e.g. hard=lists/hard.txt)")
        try:
            lines = Path(file.strip()).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UserError(f"{file.strip()}: cannot read the image list ({exc.strerror or exc})") from None
        out[name.strip()] = [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]
    return out


def report_runs(ws, experiments: Iterable[str], category: str, subset_field: Optional[str] = None,
                workdirs: Iterable = (), subset_lists: Optional[Mapping[str, Iterable]] = None,
                min_height: Optional[float] = None) -> List[dict]:
    """Per tested run: {"run_id", "name", "attempt_dir", "results": {subset: MissRate}}."""
    from ssflctl.report import collect

    rows = []
    for rec in collect.collect(ws, list(experiments or []), list(workdirs or [])):
        adir = _tested_attempt(rec)
        if adir is None:
            continue
        ann, dets = attempt_files(adir)
        rows.append({"run_id": rec["run_id"], "name": rec.get("name") or rec["run_id"], "attempt_dir": adir,
                     "results": evaluate(ann, dets, category, subset_field=subset_field, subsets=subset_lists,
                                         height_range=(min_height, math.inf) if min_height else None)})
    return rows


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def format_table(rows: List[dict], category: str, min_height: Optional[float] = None) -> str:
    """Markdown table: one row per run, MR⁻² (%) per subset (all first)."""
    cols: List[str] = []
    for r in rows:
        for k in r["results"]:
            if k not in cols:
                cols.append(k)
    head = ["run"] + [f"MR⁻² {k} (%)" for k in cols]
    hs = f"; boxes >= {min_height:g} px high" if min_height else ""
    lines = [f"## Log-average miss rate MR⁻² ({category}{hs}; lower is better; FPPI 1e-2..1e0, IoU 0.5)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["name"]] + [_pct(getattr(r["results"].get(k), "lamr", None))
                                                       for k in cols]) + " |")
    return "\n".join(lines) + "\n"


def report_main(ws, experiments, category: str, subset_field: Optional[str] = None, workdirs=(),
                plot_dir=None, subset_lists: Optional[Mapping[str, Iterable]] = None, force: bool = False,
                min_height: Optional[float] = None) -> str:
    """Text of the miss-rate section of `ssflctl report`; with plot_dir, one PNG per run there
    (existing figures are kept unless ``force``)."""
    rows = report_runs(ws, experiments, category, subset_field, workdirs, subset_lists, min_height)
    if not rows:
        raise UserError(f"{ws}: no tested run has a detections.bbox.json; --missrate needs tested runs")
    if plot_dir is not None:
        figs = [Path(plot_dir) / f"missrate-{r['run_id']}.png" for r in rows]
        clash = [f for f in figs if f.exists()]
        if clash and not force:
            raise UserError(f"{clash[0]}: figure already exists; pass --force to overwrite it")
        for r, fig in zip(rows, figs):
            plot(r["results"], fig, title=f"{r['name']} ({category})")
    return format_table(rows, category, min_height)
