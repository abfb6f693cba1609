"""Synthetic Cityscapes data in the exact Cityscapes layout, for tests, benchmarks and the quickstart.

Layout (as the real dataset)::

    ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_polygons.json
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_color.png        (color=True)

The polygons JSON is the source; instanceIds/labelIds/color images are made from it by
cityscapesscripts' own preparation code (``json2instanceImg``, ``json2labelImg``), as the real
dataset was made. The scenes contain the cases a converter must get right: occlusions (overlapping
polygons, the later one wins), crowd groups (``cargroup``, ``persongroup``, ``bicyclegroup``), tiny
objects, fully occluded objects, deleted objects, licence plates (id -1, never drawn), ignored
classes (caravan, trailer) and images with no instances at all.

The RGB image draws the same polygons in the same order, each instance filled with a distinct
class colour, a darker outline and a simple class texture, so a small detector can learn them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ssflctl.errors import UserError

SPLIT_CITIES: Dict[str, Tuple[str, ...]] = {
    "train": ("aachen", "bochum"),
    "val": ("frankfurt",),
    "test": ("berlin",),
}

# Colours for the RGB image: distinct per class (the Cityscapes palette has near-identical blues).
RGB_COLORS: Dict[str, Tuple[int, int, int]] = {
    "person": (220, 20, 60),
    "rider": (255, 140, 0),
    "car": (30, 70, 220),
    "truck": (0, 160, 160),
    "bus": (240, 210, 0),
    "train": (150, 0, 210),
    "motorcycle": (0, 230, 120),
    "bicycle": (250, 250, 250),
    "caravan": (150, 120, 90),
    "trailer": (120, 90, 60),
    "license plate": (235, 235, 210),
    # stuff
    "sky": (160, 195, 230),
    "building": (105, 95, 90),
    "vegetation": (70, 105, 50),
    "road": (115, 115, 118),
    "sidewalk": (170, 160, 165),
    "pole": (90, 90, 90),
    "traffic sign": (200, 200, 60),
}

# (height as a fraction of the image height: min, max), width / height
SHAPES: Dict[str, Tuple[float, float, float]] = {
    "person": (0.10, 0.30, 0.40),
    "rider": (0.12, 0.30, 0.55),
    "car": (0.08, 0.25, 1.80),
    "truck": (0.15, 0.35, 1.30),
    "bus": (0.18, 0.40, 1.70),
    "train": (0.20, 0.40, 3.00),
    "motorcycle": (0.08, 0.20, 1.20),
    "bicycle": (0.08, 0.20, 1.50),
    "caravan": (0.15, 0.30, 1.60),
    "trailer": (0.10, 0.25, 1.80),
}
CLASS_WEIGHTS: Dict[str, float] = {
    "car": 0.34, "person": 0.22, "rider": 0.06, "truck": 0.06, "bus": 0.05, "train": 0.03,
    "motorcycle": 0.06, "bicycle": 0.10, "caravan": 0.04, "trailer": 0.04,
}
GROUPS = ("cargroup", "persongroup", "bicyclegroup")

MARKER = ".ssflctl_synth.json"


def image_stem(city: str, index: int) -> str:
    """``<city>_<seq>_<frame>`` as in Cityscapes (frame 19 is the annotated one)."""
    return f"{city}_{index:06d}_{19:06d}"


def _require_cityscapesscripts():
    try:
        from cityscapesscripts.helpers.annotation import Annotation  # noqa: F401
        from cityscapesscripts.preparation import json2instanceImg, json2labelImg  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError(
            f"cityscapesscripts is not importable ({exc}); install it with "
            "`pip install cityscapesscripts==2.2.4` (or `pip install ssflctl[test]`)"
        ) from exc


# ---------------------------------------------------------------------------------------------
# scene description (the polygons JSON)


def _blob(rng, x0, y0, w, h, label, npts=10):
    """A jittered convex-ish polygon inside the box (x0, y0, w, h), shaped a little per class."""
    cx, cy = x0 + w / 2.0, y0 + h / 2.0
    if label in ("person", "rider", "persongroup"):
        ang = np.linspace(0, 2 * np.pi, npts, endpoint=False)
        r = 1.0 + rng.uniform(-0.08, 0.08, npts)
        xs = cx + (w / 2.0) * r * np.cos(ang)
        ys = cy + (h / 2.0) * r * np.sin(ang)
    else:
        # a box with a narrower top (roof / cabin)
        roof = rng.uniform(0.1, 0.3) * w
        pts = [
            (x0, y0 + h), (x0, y0 + 0.45 * h), (x0 + roof, y0), (x0 + w - roof, y0),
            (x0 + w, y0 + 0.45 * h), (x0 + w, y0 + h),
        ]
        jit = rng.uniform(-0.03, 0.03, (len(pts), 2)) * np.array([w, h])
        xs = np.array([p[0] for p in pts]) + jit[:, 0]
        ys = np.array([p[1] for p in pts]) + jit[:, 1]
    return [[int(round(x)), int(round(y))] for x, y in zip(xs, ys)]


def _stuff(rng, W, H) -> List[dict]:
    horizon = int(H * rng.uniform(0.40, 0.55))
    objs = [
        {"label": "sky", "polygon": [[0, 0], [W - 1, 0], [W - 1, horizon], [0, horizon]]},
        {"label": "road", "polygon": [[0, horizon], [W - 1, horizon], [W - 1, H - 1], [0, H - 1]]},
    ]
    x = 0
    while x < W:  # a row of buildings / trees on the horizon
        bw = int(W * rng.uniform(0.08, 0.25))
        bh = int(H * rng.uniform(0.10, 0.35))
        lab = "building" if rng.random() < 0.65 else "vegetation"
        objs.append({"label": lab, "polygon": [[x, horizon - bh], [x + bw, horizon - bh], [x + bw, horizon], [x, horizon]]})
        x += bw
    sw = int(H * 0.04)
    objs.append({"label": "sidewalk", "polygon": [[0, horizon], [W - 1, horizon], [W - 1, horizon + sw], [0, horizon + sw]]})
    for _ in range(int(rng.integers(0, 3))):
        px = int(rng.uniform(0, W - 4))
        pw = max(1, W // 300)
        objs.append({"label": "pole", "polygon": [[px, int(horizon * 0.3)], [px + pw, int(horizon * 0.3)], [px + pw, horizon + sw], [px, horizon + sw]]})
        objs.append({"label": "traffic sign", "polygon": [[px - 3 * pw, int(horizon * 0.3)], [px + 4 * pw, int(horizon * 0.3)], [px + 4 * pw, int(horizon * 0.3) + 6 * pw], [px - 3 * pw, int(horizon * 0.3) + 6 * pw]]})
    return objs, horizon


def _object(rng, W, H, horizon, label, near: Optional[Tuple[int, int, int, int]] = None, dense: bool = False,
            scale: float = 1.0):
    base = label[: -len("group")] if label.endswith("group") else label
    hmin, hmax, aspect = SHAPES[base]
    if dense:  # many small, distant objects, as in real street scenes
        h = max(2, int(H * scale * np.exp(rng.uniform(np.log(hmin / 4), np.log(hmax)))))
    else:
        h = max(2, int(H * scale * rng.uniform(hmin, hmax)))
    w = max(2, int(h * aspect * rng.uniform(0.8, 1.2)))
    if label.endswith("group"):
        w = int(w * rng.uniform(2.0, 3.5))
    w = min(w, W - 2)
    h = min(h, H - horizon - 1 + h // 2)
    if near is not None:  # overlap an existing object (occlusion)
        nx, ny, nw, nh = near
        x0 = int(np.clip(nx + nw * rng.uniform(-0.5, 0.5), 0, W - w - 1))
        bottom = int(np.clip(ny + nh + rng.uniform(0.02, 0.08) * H, horizon + h // 3, H - 1))
    else:
        x0 = int(rng.uniform(0, W - w - 1))
        bottom = int(rng.uniform(horizon + 0.05 * H, H - 1))
    y0 = max(0, bottom - h)
    return {"label": label, "polygon": _blob(rng, x0, y0, w, bottom - y0, label)}, (x0, y0, w, bottom - y0)


def make_scene(rng, W: int, H: int, empty: bool = False, all_cases: bool = False,
               instances: Optional[int] = None) -> List[dict]:
    """The objects of one image, back to front (later ones occlude earlier ones).

    ``instances``: a density knob for benchmarks: exactly this many objects of the eight evaluated
    classes, scaled down by (20 / instances) ** 0.75 above 20 so that crowded scenes stay about as
    occluded as the default ones, and no random extras (crowd regions, occluders, tiny objects;
    image 0 keeps its special cases). A few objects are still hidden behind later ones, so the
    annotations per image differ slightly (74 at 80, 21 at 20, 6 at 5 over six 2048×1024 images);
    benchmarks report the count written. Default (None): 14–35 objects of all ten instance
    classes at full size, 3–8 below 1024×512, with random extras.
    """
    objs, horizon = _stuff(rng, W, H)
    if empty:
        return objs
    names = list(CLASS_WEIGHTS)
    p = np.array([CLASS_WEIGHTS[n] for n in names])
    # full-size images: ~20 annotated instances, large and small, as busy as real Cityscapes frames
    # (the issue measured 83% of the reference's 106 ms/image in per-instance full-image copies)
    dense = W * H >= 1024 * 512
    n_obj = int(rng.integers(14, 36)) if dense else int(rng.integers(3, 9))
    scale = 1.0
    if instances is not None:
        n_obj = int(instances)
        names = [n for n in names if n not in ("caravan", "trailer")]  # ignored in evaluation
        p = np.array([CLASS_WEIGHTS[n] for n in names])
        scale = min(1.0, (20.0 / max(1, n_obj)) ** 0.75)
    inst: List[Tuple[dict, tuple]] = []
    labels = [str(rng.choice(names, p=p / p.sum())) for _ in range(n_obj)]
    if all_cases:
        labels += ["caravan", "trailer", "car", "person"]
    for lab in labels:
        inst.append(_object(rng, W, H, horizon, lab, dense=dense, scale=scale))
    extras = instances is None  # the density knob asks for an exact count
    if all_cases or (extras and rng.random() < 0.3):  # a crowd region
        inst.append(_object(rng, W, H, horizon, str(rng.choice(GROUPS)) if not all_cases else "cargroup"))
    if all_cases:
        inst.append(_object(rng, W, H, horizon, "persongroup"))
    # occlusions: draw far (higher bottom edge) first, then add objects that overlap earlier ones
    inst.sort(key=lambda t: t[1][1] + t[1][3])
    extra = []
    for k in range(2 if all_cases else int(rng.integers(0, 3)) if extras else 0):
        prev = inst[int(rng.integers(0, len(inst)))]
        lab = str(rng.choice(["car", "person", "bicycle"]))
        extra.append(_object(rng, W, H, horizon, lab, near=prev[1]))
    inst += extra
    out = [o for o, _ in inst]
    if all_cases or (extras and rng.random() < 0.3):  # tiny objects: a few pixels
        for lab in ("person", "car") if all_cases else (str(rng.choice(["person", "car", "bicycle"])),):
            x, y = int(rng.uniform(0, W - 4)), int(rng.uniform(horizon, H - 4))
            out.append({"label": lab, "polygon": [[x, y], [x + 1, y], [x + 1, y + 1], [x, y + 1]]})
    if all_cases:
        # a car fully hidden behind a later, larger bus: it has an instance number but no pixels
        x, y = int(W * 0.05), int(horizon + 0.05 * H)
        out.append({"label": "car", "polygon": [[x + 2, y + 2], [x + 10, y + 2], [x + 10, y + 8], [x + 2, y + 8]]})
        out.append({"label": "bus", "polygon": [[x, y], [x + int(W * 0.15), y], [x + int(W * 0.15), y + int(H * 0.15)], [x, y + int(H * 0.15)]]})
        # a licence plate on it (id -1: never drawn) and a deleted object (skipped)
        out.append({"label": "license plate", "polygon": [[x + 20, y + 20], [x + 30, y + 20], [x + 30, y + 25], [x + 20, y + 25]]})
        out.append({"label": "truck", "deleted": 1, "polygon": [[x, y], [x + 40, y], [x + 40, y + 40], [x, y + 40]]})
    return objs + out


# ---------------------------------------------------------------------------------------------
# rendering


def render_rgb(objects: List[dict], W: int, H: int, rng, noise: bool = True):
    """The leftImg8bit picture: the polygons in the same order as the label images."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), RGB_COLORS["sky"])
    draw = ImageDraw.Draw(img)
    lw = max(1, min(W, H) // 256)
    for obj in objects:
        if obj.get("deleted"):
            continue
        lab = obj["label"]
        base = lab[: -len("group")] if lab.endswith("group") and lab not in RGB_COLORS else lab
        color = RGB_COLORS.get(base, (128, 128, 128))
        poly = [tuple(p) for p in obj["polygon"]]
        if base in SHAPES:
            k = rng.uniform(0.85, 1.1)
            fill = tuple(int(min(255, c * k)) for c in color)
            outline = tuple(int(c * 0.45) for c in color)
            draw.polygon(poly, fill=fill, outline=outline, width=lw)
            xs = [p[0] for p in poly]
            ys = [p[1] for p in poly]
            x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            w, h = x1 - x0, y1 - y0
            if w >= 8 and h >= 8:  # a class texture: windows on vehicles, a head on humans
                dark = tuple(int(c * 0.35) for c in color)
                if base in ("person", "rider"):
                    r = max(1, w // 4)
                    draw.ellipse([x0 + w / 2 - r, y0 + h * 0.05, x0 + w / 2 + r, y0 + h * 0.05 + 2 * r], fill=(240, 200, 170))
                elif base in ("motorcycle", "bicycle"):
                    r = max(1, h // 4)
                    for cx in (x0 + r + 1, x1 - r - 1):
                        draw.ellipse([cx - r, y1 - 2 * r, cx + r, y1], outline=dark, width=max(1, lw))
                else:
                    draw.rectangle([x0 + w * 0.2, y0 + h * 0.15, x1 - w * 0.2, y0 + h * 0.4], fill=(200, 220, 235))
                    draw.rectangle([x0 + w * 0.05, y1 - h * 0.12, x1 - w * 0.05, y1 - h * 0.02], fill=dark)
        else:
            draw.polygon(poly, fill=color)
    if not noise:
        return img
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + rng.integers(-6, 7, size=(H, W, 1), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _write_image(args) -> str:
    """Write one image and its gtFine files. ``args`` is picklable for a process pool."""
    with warnings.catch_warnings():  # Pillow 12 warns that saving mode I as PNG goes away in 13
        warnings.filterwarnings("ignore", "Saving I mode images as PNG", DeprecationWarning)
        return _write_image_now(args)


def _write_image_now(args) -> str:
    (root, split, city, index, W, H, seed, empty, all_cases, fast, color, instances) = args
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation import json2instanceImg, json2labelImg

    rng = np.random.default_rng([seed, list(SPLIT_CITIES).index(split) if split in SPLIT_CITIES else 9, index])
    objects = make_scene(rng, W, H, empty=empty, all_cases=all_cases, instances=instances)
    stem = image_stem(city, index)
    img_dir = Path(root) / "leftImg8bit" / split / city
    gt_dir = Path(root) / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    poly_json = gt_dir / f"{stem}_gtFine_polygons.json"
    poly_json.write_text(json.dumps({"imgHeight": H, "imgWidth": W, "objects": objects}))
    inst_png = gt_dir / f"{stem}_gtFine_instanceIds.png"
    label_png = gt_dir / f"{stem}_gtFine_labelIds.png"
    try:
        if fast:
            # the same drawing code, one JSON parse, faster PNG compression
            ann = Annotation()
            ann.fromJsonFile(str(poly_json))
            json2instanceImg.createInstanceImage(ann, "ids").save(inst_png, compress_level=1)
            json2labelImg.createLabelImage(ann, "ids").save(label_png, compress_level=1)
        else:
            json2instanceImg.json2instanceImg(str(poly_json), str(inst_png))
            json2labelImg.json2labelImg(str(poly_json), str(label_png))
        if color:
            json2labelImg.json2labelImg(str(poly_json), str(gt_dir / f"{stem}_gtFine_color.png"), "color")
    except (OSError, KeyError) as exc:
        import PIL

        raise UserError(
            f"{inst_png}: cityscapesscripts could not write the instance image ({exc}) with Pillow "
            f"{PIL.__version__}; Pillow 13 cannot save mode I as PNG: install pillow<13"
        ) from exc
    rgb = render_rgb(objects, W, H, rng, noise=not fast)
    rgb.save(img_dir / f"{stem}_leftImg8bit.png", compress_level=1)
    return stem


def generate(
    root,
    n_train: int = 6,
    n_val: int = 3,
    n_test: int = 3,
    size: Tuple[int, int] = (2048, 1024),
    seed: int = 0,
    *,
    fast: bool = False,
    color: bool = False,
    empty_every: int = 6,
    nproc: int = 1,
    instances: Optional[int] = None,
) -> Path:
    """Write a synthetic Cityscapes dataset under ``root`` and return ``root``.

    ``size`` is (width, height) like Cityscapes' 2048×1024; ``(256, 128)`` makes a tiny dataset.
    In every split image 0 holds every special case (caravan, trailer, crowd groups, tiny objects,
    occlusions, a fully hidden object, a licence plate, a deleted object) and every
    ``empty_every``-th image (index 2, 2 + empty_every, ...) has no instances at all (none with
    ``instances``).
    Images are spread over the split's cities. ``fast`` skips the RGB noise and compresses PNGs
    less (same label drawing code). ``instances`` sets the objects drawn per image (density; see
    ``make_scene``). Deterministic for a given seed.
    """
    _require_cityscapesscripts()
    root = Path(root)
    W, H = int(size[0]), int(size[1])
    if W < 16 or H < 16:
        raise UserError(f"size={size}: images must be at least 16×16 pixels")
    if instances is not None and not 0 <= int(instances) <= 1000:
        raise UserError(f"instances={instances}: give 0 to 1000 objects per image")
    jobs = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        cities = SPLIT_CITIES[split]
        for i in range(int(n)):
            city = cities[i % len(cities)]
            empty = empty_every > 0 and i % empty_every == 2 and instances is None
            jobs.append((str(root), split, city, i, W, H, seed, empty, i == 0, fast, color, instances))
    if nproc > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(nproc) as pool:
            list(pool.imap_unordered(_write_image, jobs, chunksize=4))
    else:
        for job in jobs:
            _write_image(job)
    return root


def cached(
    n_train: int,
    n_val: int,
    n_test: int,
    size: Tuple[int, int] = (2048, 1024),
    seed: int = 0,
    *,
    fast: bool = False,
    nproc: int = 1,
    cache_dir: Optional[os.PathLike] = None,
    instances: Optional[int] = None,
) -> Path:
    """``generate`` into a cache folder keyed by the parameters (reused when complete)."""
    params = [n_train, n_val, n_test, list(size), seed, fast, 3]
    key = json.dumps(params if instances is None else params + [{"instances": int(instances), "knob": 2}])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    base = Path(cache_dir or os.environ.get("SSFLCTL_CACHE") or Path(tempfile.gettempdir()) / "ssflctl-cache")
    root = base / f"synth-cityscapes-{digest}"
    marker = root / MARKER
    if marker.exists():
        return root
    tmp = base / f".tmp-{digest}-{os.getpid()}"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    generate(tmp, n_train, n_val, n_test, size, seed, fast=fast, nproc=nproc, instances=instances)
    (tmp / MARKER).write_text(key)
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return root
