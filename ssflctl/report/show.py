"""`ssflctl show RUN`: pictures of an attempt's test-set predictions beside the ground truth.

For each of the first N test images (ground-truth order) one PNG is written::

    +----------------------+---+----------------------+
    | ground truth         |   | predictions >= thr   |   <- HEADER px of captions
    +----------------------+---+----------------------+
    | image + GT boxes     |GAP| image + predictions  |   <- the image at its own size
    +----------------------+---+----------------------+

Boxes are drawn with Pillow, one colour per class, labelled with the class name (and the score on
the right). Inputs: the attempt's ``detections.bbox.json`` (written by the test step) and the test
annotation file and image folder from the attempt's ``config.py`` (``test_dataloader.dataset``;
the evaluator's ``ann_file`` / ``metrics.json``'s ``ann_file`` when those are set).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ssflctl.atomic import load_json
from ssflctl.workdir import runref
from ssflctl.errors import UserError
from ssflctl.workdir.layout import AttemptDir, RunDir

HEADER = 14
GAP = 6
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0),
           (255, 225, 25), (0, 0, 128), (128, 128, 0), (255, 215, 180), (170, 255, 195), (128, 128, 128)]


def _attempts(rdir: Path) -> List[Path]:
    out = []
    for p in rdir.glob("attempt-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and p.is_dir():
            out.append((int(suffix), p))
    return [p for _, p in sorted(out)]


def find_attempt(run: str, ws=None, attempt: Optional[int] = None) -> Path:
    """The attempt dir to show: RUN is an attempt dir, a run dir, or a run id / name / id prefix in
    the workspace; the latest attempt with detections unless ``attempt`` is given."""
    p = Path(run)
    if p.is_dir() and AttemptDir(p).has_detections and attempt is None:
        return p
    if p.is_dir() and RunDir(p).exists:
        rdir = p
    else:
        rdir = runref.resolve(ws or ".ssflctl", run, "show")
    dirs = _attempts(rdir)
    if attempt is not None:
        dirs = [d for d in dirs if d.name == f"attempt-{attempt}"]
        if not dirs:
            raise UserError(f"show: {rdir.name} has no attempt {attempt}")
        if not AttemptDir(dirs[0]).has_detections:
            raise UserError(f"{dirs[0]}: no detections.bbox.json (this attempt was not tested)")
        return dirs[0]
    tested = [d for d in dirs if AttemptDir(d).has_detections]
    if not tested:
        raise UserError(f"show: {rdir.name} has no tested attempt (no detections.bbox.json); "
                        "wait for the test step, or run it")
    return tested[-1]


def _test_dataset(cfg) -> dict:
    ds = (cfg.get("test_dataloader") or {}).get("dataset") or {}
    while isinstance(ds, dict) and "dataset" in ds and "ann_file" not in ds:  # wrappers
        ds = ds["dataset"]
    if isinstance(ds, dict) and "datasets" in ds:  # ConcatDataset: the first one
        ds = ds["datasets"][0]
    return ds if isinstance(ds, dict) else {}


def test_set(adir: Path) -> Tuple[Path, Path]:
    """(COCO annotation file, image folder) of the attempt's test set."""
    from mmengine.config import Config

    cfg_path = AttemptDir(adir).config_path
    if not cfg_path.is_file():
        raise UserError(f"{adir}: no config.py; is this an ssflctl attempt directory?")
    cfg = Config.fromfile(str(cfg_path))
    ds = _test_dataset(cfg)
    root = Path(str(ds.get("data_root") or ""))
    ann = None
    metrics = AttemptDir(adir).metrics_path
    if metrics.is_file():
        ann = (load_json(metrics, metrics.name) or {}).get("ann_file")
    if not ann:
        ev = cfg.get("test_evaluator")
        for e in (ev if isinstance(ev, (list, tuple)) else [ev]):
            if isinstance(e, dict) and e.get("ann_file"):
                ann = e["ann_file"]
                break
    if not ann and ds.get("ann_file"):
        ann = root / str(ds["ann_file"])
    if not ann:
        raise UserError(f"{cfg_path}: test_dataloader.dataset has no ann_file")
    prefix = ds.get("data_prefix") or {}
    img = (prefix.get("img") or prefix.get("img_path") or "") if isinstance(prefix, dict) else str(prefix)
    if not img and isinstance(prefix, dict) and prefix.get("sub_data_root"):  # VOC: <year>/JPEGImages/<id>.jpg
        img = str(Path(str(prefix["sub_data_root"])) / "JPEGImages")
    return Path(ann), root / str(img)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _label(draw, xy, text, colour, font, width: int):
    x, y = xy
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    tw, th = r - l, b - t
    y0 = y - th - 2 if y - th - 2 >= 0 else y + 1
    x0 = min(max(0, x), max(0, width - tw - 2))
    draw.rectangle([x0, y0, x0 + tw + 2, y0 + th + 2], fill=colour)
    draw.text((x0 + 1 - l, y0 + 1 - t), text, fill=(255, 255, 255), font=font)


def draw_boxes(img, boxes: List[dict], names: Dict[int, str], colours: Dict[int, tuple], scores: bool):
    """Draw COCO [x, y, w, h] boxes (dicts with bbox, category_id, maybe score) on a PIL image."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    font = _font()
    lw = max(1, round(min(img.size) / 200))
    for b in boxes:
        x, y, w, h = (float(v) for v in b["bbox"][:4])
        col = colours.get(int(b["category_id"]), (255, 0, 0))
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=col, width=lw)
    for b in boxes:  # labels last, over every box
        x, y = float(b["bbox"][0]), float(b["bbox"][1])
        col = colours.get(int(b["category_id"]), (255, 0, 0))
        name = names.get(int(b["category_id"]), str(b["category_id"]))
        _label(draw, (int(x), int(y)), f"{name} {b['score']:.2f}" if scores else name, col, font, img.size[0])
    return img


def side_by_side(img, gts: List[dict], dets: List[dict], names, colours, score_thr: float):
    """The composed picture: captions, GT | predictions."""
    from PIL import Image, ImageDraw

    w, h = img.size
    canvas = Image.new("RGB", (2 * w + GAP, h + HEADER), (255, 255, 255))
    left = draw_boxes(img.copy(), gts, names, colours, scores=False)
    right = draw_boxes(img.copy(), dets, names, colours, scores=True)
    canvas.paste(left, (0, HEADER))
    canvas.paste(right, (w + GAP, HEADER))
    d = ImageDraw.Draw(canvas)
    font = _font()
    d.text((2, 1), f"ground truth ({len(gts)})", fill=(0, 0, 0), font=font)
    d.text((w + GAP + 2, 1), f"predictions >= {score_thr:g} ({len(dets)})", fill=(0, 0, 0), font=font)
    return canvas


def show(attempt_dir, n: int = 8, score_thr: float = 0.3, out_dir=None, force: bool = False,
         progress: bool = False) -> List[Path]:
    """Write ``n`` pictures (PNG) for the attempt; returns their paths."""
    from PIL import Image

    from ssflctl.atomic import write_bytes

    adir = Path(attempt_dir)
    if n < 1:
        raise UserError(f"--n {n}: give at least 1 image")
    dets_path = AttemptDir(adir).detections_path
    dets = load_json(dets_path, "detections dump")
    if not isinstance(dets, list):
        raise UserError(f"{dets_path}: not a COCO results list")
    ann_file, img_dir = test_set(adir)
    gt = load_json(ann_file, "test annotation file")
    names = {int(c["id"]): str(c["name"]) for c in gt.get("categories", [])}
    colours = {cid: PALETTE[k % len(PALETTE)] for k, cid in enumerate(sorted(names))}
    images = sorted(gt.get("images", []), key=lambda im: (str(type(im["id"])), im["id"]))[:n]
    if not images:
        raise UserError(f"{ann_file}: no images in the test annotation file")
    out_dir = Path(out_dir) if out_dir else adir / "show"
    # mmdet's COCO copy of VOC ground truth has empty file names: the VOC image id names the JPEG
    files = [str(im.get("file_name") or f"{im['id']}.jpg") for im in images]
    outs = [out_dir / f"{Path(f).stem}.png" for f in files]
    if not force:
        clash = [p for p in outs if p.exists()]
        if clash:
            raise UserError(f"{clash[0]}: already exists; pass --force to overwrite, or choose --out-dir")
    by_img_gt: Dict[int, list] = {}
    for a in gt.get("annotations", []):
        by_img_gt.setdefault(a["image_id"], []).append(a)
    by_img_dt: Dict[int, list] = {}
    for d in dets:
        if float(d.get("score", 0)) >= score_thr:
            by_img_dt.setdefault(d["image_id"], []).append(d)
    from rich.progress import track

    written = []
    for im, name, out in track(list(zip(images, files, outs)), description="drawing", disable=not progress,
                               console=None, transient=True):
        path = img_dir / name
        try:
            with Image.open(path) as src:
                img = src.convert("RGB")
        except FileNotFoundError:
            raise UserError(f"{path}: test image not found (config.py's data_root/data_prefix point there)") from None
        dts = sorted(by_img_dt.get(im["id"], []), key=lambda d: float(d["score"]))  # best drawn last
        pic = side_by_side(img, by_img_gt.get(im["id"], []), dts, names, colours, score_thr)
        buf = io.BytesIO()
        pic.save(buf, format="PNG")
        written.append(write_bytes(out, buf.getvalue()))
    return written


def main(run: str, ws=None, n: int = 8, score_thr: float = 0.3, attempt: Optional[int] = None, out_dir=None,
         force: bool = False) -> List[Path]:
    adir = find_attempt(run, ws, attempt)
    paths = show(adir, n=n, score_thr=score_thr, out_dir=out_dir, force=force, progress=sys.stderr.isatty())
    print(f"wrote {len(paths)} picture(s) to {paths[0].parent}")
    return paths
