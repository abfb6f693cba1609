"""A tiny synthetic COCO detection dataset for tests and the CPU quick start.

Coloured shapes (one shape and colour family per class) on a noisy background, with exact
boxes, written as PNG images plus COCO instance JSON files that mmdet's ``CocoDataset`` reads::

    <root>/images/<split>/<split>_00000.png
    <root>/annotations/<split>.json

The defaults match ``templates/retinanet_tiny.py`` (``data_root=<root>``, ``annotations/train.json``,
``images/train/``, ...). Generation is deterministic for a given seed.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Dict, Sequence, Tuple

from ssflctl import atomic

CLASSES: Tuple[str, ...] = ("square", "disk", "triangle")
# Base colour per class (RGB); each instance jitters it a little.
_COLOURS = {"square": (220, 40, 40), "disk": (40, 190, 60), "triangle": (40, 70, 230),
            "cross": (230, 200, 30), "ring": (200, 40, 200)}


def _shape_polygon(kind: str, cx: float, cy: float, r: float):
    if kind in ("square", "cross"):
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    n = 16
    return [(cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n)) for i in range(n)]


def _draw(draw, kind: str, cx: float, cy: float, r: float, colour):
    if kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "disk":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "triangle":
        draw.polygon(_shape_polygon(kind, cx, cy, r), fill=colour)
    elif kind == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    else:  # pragma: no cover - guarded by generate()
        raise ValueError(kind)


def _make_split(root: Path, split: str, n: int, size: Tuple[int, int], classes: Sequence[str],
                rng: random.Random, max_objects: int, min_size: int, max_size: int) -> Dict:
    import numpy as np
    from PIL import Image, ImageDraw

    width, height = size
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(n):
        bg = np.array([rng.randint(90, 170)] * 3, dtype=np.int16)
        noise = np.random.RandomState(rng.randint(0, 2**31 - 1)).randint(-25, 26, (height, width, 3))
        arr = np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        draw = ImageDraw.Draw(img)
        boxes = []
        for _ in range(rng.randint(1, max_objects)):
            for _try in range(20):
                r = rng.uniform(min_size, max_size) / 2
                cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
                box = (cx - r, cy - r, cx + r, cy + r)
                if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in boxes):
                    break
            else:
                continue
            boxes.append(box)
            cls = rng.randrange(len(classes))
            kind = classes[cls]
            base = _COLOURS[kind]
            colour = tuple(int(min(255, max(0, c + rng.randint(-25, 25)))) for c in base)
            _draw(draw, kind, cx, cy, r, colour)
            x0, y0 = max(0.0, cx - r), max(0.0, cy - r)
            x1, y1 = min(float(width), cx + r), min(float(height), cy + r)
            poly = [coord for pt in _shape_polygon(kind, cx, cy, r) for coord in pt]
            annotations.append({
                "id": ann_id, "image_id": i + 1, "category_id": cls + 1,
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0,
                "segmentation": [[round(c, 2) for c in poly]],
            })
            ann_id += 1
        name = f"{split}_{i:05d}.png"
        img.save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
    coco = {
        "info": {"description": f"ssflctl synthetic shapes ({split})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)],
    }
    out = root / "annotations" / f"{split}.json"
    atomic.write_text(out, json.dumps(coco))
    return {"split": split, "images": len(images), "annotations": len(annotations), "ann_file": str(out)}


def generate(root, n_train: int = 48, n_val: int = 24, n_test: int = 0, size: Tuple[int, int] = (96, 96),
             seed: int = 0, classes: Sequence[str] = CLASSES, max_objects: int = 4,
             min_size: int = 24, max_size: int = 48) -> Dict[str, Dict]:
    """Write the dataset under ``root``; returns a summary per split.

    ``size`` is (width, height); object sizes are in pixels (side of the square box).
    """
    unknown = [c for c in classes if c not in _COLOURS]
    if unknown:
        from ssflctl.errors import UserError

        raise UserError(f"synth_coco: unknown shape classes {unknown}; choose from {sorted(_COLOURS)}")
    root = Path(root)
    rng = random.Random(seed)
    out = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n > 0:
            out[split] = _make_split(root, split, n, tuple(size), tuple(classes), rng, max_objects, min_size, max_size)
    return out
