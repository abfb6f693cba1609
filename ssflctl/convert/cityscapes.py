"""``ssflctl convert cityscapes``: Cityscapes gtFine → MMDetection-compatible COCO instance JSON.

Produces the same annotations as MMDetection's ``tools/dataset_converters/cityscapes.py`` (the
reference): the files ``instancesonly_filtered_gtFine_{split}.json``; the categories that have
instances and are evaluated (ids 24, 25, 26, 27, 28, 31, 32, 33); one annotation per instance id
≥ 24 of the ``*_gtFine_instanceIds.png`` (label = id // 1000 for ids ≥ 1000, else the id itself, a
crowd region with ``iscrowd = 1``); identical RLE segmentations, areas and boxes; the same image
fields (``file_name`` = ``<city>/<name>``, ``height``, ``width``, ``segm_file``).

Differences, all deliberate: images are sorted (ids are stable across machines); image and
annotation ids start at 1; ``annotations`` is present even when empty; the category table does not
come from an import of cityscapesscripts; every bad input file is reported and nothing is written
then; existing outputs are kept unless ``force``; writes are atomic.

Speed: each 16-bit instanceIds PNG is decoded once and all its instances are run-length encoded in
one pass. The reference builds a full-image Fortran-order mask per instance; here the run
boundaries of the whole label map in column-major order are found from row-major comparisons
(no transposed copy), and each instance's COCO RLE counts are read off the runs that carry its id.
pycocotools then compresses those counts (``frPyObjects``) and computes area and box from them, so
the strings are byte-identical to ``maskUtils.encode`` of the full mask.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ssflctl.convert.cityscapes_labels import CATEGORIES, CATEGORY_IDS, ID2LABEL, MAX_LABEL_ID
from ssflctl.errors import UserError

IMG_SUFFIX = "_leftImg8bit.png"
INST_SUFFIX = "_gtFine_instanceIds.png"
SEGM_SUFFIX = "_gtFine_labelIds.png"
JSON_NAME = "instancesonly_filtered_gtFine_{split}.json"
DEFAULT_SPLITS = ("train", "val", "test")
NAME_RE = re.compile(r"^(?P<city>[A-Za-z0-9-]+)_(?P<seq>\d+)_(?P<frame>\d+)_leftImg8bit\.png$")
_CAT_NAME = {c["id"]: c["name"] for c in CATEGORIES}


@dataclass
class SplitSummary:
    split: str
    out_file: str
    images: int = 0
    instances: Dict[str, int] = field(default_factory=lambda: {c["name"]: 0 for c in CATEGORIES})
    crowd: Dict[str, int] = field(default_factory=lambda: {c["name"]: 0 for c in CATEGORIES})
    empty_images: int = 0
    seconds: float = 0.0

    @property
    def annotations(self) -> int:
        return sum(self.instances.values()) + sum(self.crowd.values())

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Summary:
    out_dir: str
    splits: List[SplitSummary]
    seconds: float = 0.0
    decoder: str = ""

    @property
    def images(self) -> int:
        return sum(s.images for s in self.splits)


# ---------------------------------------------------------------------------------------------
# decoding


def _decoder():
    """(name, read(path) -> ndarray|None). OpenCV (what the reference uses via mmcv) is the fastest."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        cv2 = None
    if cv2 is not None and os.environ.get("SSFLCTL_DECODER", "") != "pillow":
        try:  # OpenCV logs a warning for each bad file on stderr; we report them ourselves
            from cv2.utils import logging as cv_logging

            cv_logging.setLogLevel(cv_logging.LOG_LEVEL_SILENT)
        except (ImportError, AttributeError):  # pragma: no cover - depends on the OpenCV build
            pass

        def read_cv2(path: str):
            buf = np.fromfile(path, dtype=np.uint8)
            if buf.size == 0:
                raise ValueError("empty file")
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            if img is None:
                raise ValueError("not a readable PNG (truncated or corrupt)")
            return img

        return "opencv", read_cv2

    def read_pil(path: str):
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return np.asarray(im)

    return "pillow", read_pil


_READ = None


def read_png(path: str) -> np.ndarray:
    global _READ
    if _READ is None:
        _READ = _decoder()[1]
    return _READ(path)


def png_size(path: str) -> Tuple[int, int]:
    """(width, height) from the PNG header, without decoding (Pillow reads the IHDR chunk only)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


# ---------------------------------------------------------------------------------------------
# run-length encoding of every instance at once


def instance_runs(inst: np.ndarray, min_id: int = 24):
    """Column-major runs of a label map: (starts, ends, values) of the runs with value ≥ ``min_id``.

    Equivalent to run-length encoding ``inst.ravel(order="F")`` but without the transposed copy:
    a column-major run starts at pixel (y, x) when y == 0 and the value differs from the last pixel
    of the previous column, or when y > 0 and it differs from the pixel above.
    """
    h, w = inst.shape
    n = h * w
    if n == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, inst.ravel()[:0]
    flat = _vertical_changes(inst)  # flat (row-major) indices p of pixels that differ from p - w
    ys, xs = np.divmod(flat, w)
    pos = xs * h + ys
    col = np.flatnonzero(inst[0, 1:] != inst[h - 1, :-1]).astype(np.int64) + 1
    starts = np.concatenate((np.zeros(1, np.int64), pos, col * h))
    starts.sort()
    values = inst[starts % h, starts // h]
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = n
    keep = values >= min_id
    return starts[keep], ends[keep], values[keep]


def _vertical_changes(inst: np.ndarray) -> np.ndarray:
    """Sorted flat indices ``p`` (row ≥ 1) with ``inst.flat[p] != inst.flat[p - w]``, as int64."""
    h, w = inst.shape
    flat_img = inst.reshape(-1)
    if inst.flags.c_contiguous and (w * inst.itemsize) % 8 == 0 and inst.itemsize < 8:
        # compare 8 bytes at a time (4 pixels of uint16), then look only inside the words that differ
        per = 8 // inst.itemsize
        words = inst.view(np.uint64)
        cand = np.flatnonzero(words[1:] != words[:-1])
        cand = (cand[:, None] * per + np.arange(per)).reshape(-1) + w
        return cand[flat_img[cand] != flat_img[cand - w]]
    return np.flatnonzero(inst[1:, :] != inst[:-1, :]) + w


def encode_instances(inst: np.ndarray, ids: Optional[Iterable[int]] = None):
    """COCO RLE (uncompressed counts, uint32) of every instance id ≥ 24 in ``inst``.

    Returns ``(ids, counts_list)``: ``counts_list[k]`` decodes to ``inst == ids[k]`` exactly as
    ``pycocotools.mask.encode(np.asfortranarray(inst == ids[k]))`` would encode it.
    """
    h, w = inst.shape
    n = h * w
    starts, ends, values = instance_runs(inst)
    if starts.size == 0:
        return np.zeros(0, np.int64), []
    order = np.argsort(values, kind="stable")  # runs of one id stay in position order
    starts, ends, values = starts[order], ends[order], values[order]
    uniq, first = np.unique(values, return_index=True)
    last = np.append(first[1:], values.size)
    prev_end = np.empty_like(ends)
    prev_end[1:] = ends[:-1]
    prev_end[first] = 0
    inter = np.empty(2 * starts.size, np.int64)
    inter[0::2] = starts - prev_end  # zeros before the run
    inter[1::2] = ends - starts  # ones
    tails = n - ends[last - 1]  # zeros after the last run (written only when > 0, as pycocotools does)
    has_tail = tails > 0
    merged = np.insert(inter, (2 * last)[has_tail], tails[has_tail]).astype(np.uint32)
    bounds = 2 * last + np.cumsum(has_tail)
    counts = np.split(merged, bounds[:-1])
    return uniq.astype(np.int64), counts


def annotate(inst: np.ndarray) -> Tuple[List[dict], List[str]]:
    """Annotations of one instanceIds map (without ids), and problems with its values."""
    import pycocotools.mask as mask_utils

    h, w = inst.shape
    ids, counts = encode_instances(inst)
    keep_ids, keep_counts, problems = [], [], []
    for iid, cnt in zip(ids.tolist(), counts):
        label_id = iid // 1000 if iid >= 1000 else iid
        if label_id > MAX_LABEL_ID or label_id not in ID2LABEL:
            problems.append(f"pixel value {iid} encodes label id {label_id}, which is not a Cityscapes label")
            continue
        if label_id not in CATEGORY_IDS:  # no instances, or ignored in evaluation (caravan, trailer)
            continue
        keep_ids.append(iid)
        keep_counts.append(cnt)
    if not keep_ids:
        return [], problems
    rles = mask_utils.frPyObjects([{"counts": c, "size": [h, w]} for c in keep_counts], h, w)
    areas = mask_utils.area(rles).tolist()
    boxes = mask_utils.toBbox(rles).tolist()
    anns = []
    for iid, rle, area, box in zip(keep_ids, rles, areas, boxes):
        anns.append(
            {
                "iscrowd": int(iid < 1000),
                "category_id": iid // 1000 if iid >= 1000 else iid,
                "bbox": box,
                "area": area,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
            }
        )
    return anns, problems


# ---------------------------------------------------------------------------------------------
# one image


def load_image(task: Tuple[str, str, str, str, str]):
    """Worker: ``(img, inst, segm, file_name, segm_file)`` → ``(image_info, anns, problems)``."""
    img_file, inst_file, segm_file, file_name, segm_name = task
    problems: List[str] = []
    try:
        img_w, img_h = png_size(img_file)
    except Exception as exc:
        problems.append(f"{img_file}: unreadable image ({_why(exc)})")
        img_w = img_h = None
    try:
        seg_w, seg_h = png_size(segm_file)
        if img_w is not None and (seg_w, seg_h) != (img_w, img_h):
            problems.append(
                f"{segm_file}: size {seg_w}×{seg_h} does not match its image {img_w}×{img_h} ({img_file})"
            )
    except FileNotFoundError:
        problems.append(f"{segm_file}: missing (labelIds for {img_file})")
    except Exception as exc:
        problems.append(f"{segm_file}: unreadable PNG ({_why(exc)})")
    try:
        inst = read_png(inst_file)
    except FileNotFoundError:
        problems.append(f"{inst_file}: missing (instanceIds for {img_file})")
        return None, [], problems
    except Exception as exc:
        problems.append(f"{inst_file}: unreadable or truncated PNG ({_why(exc)})")
        return None, [], problems
    if inst.ndim != 2:
        problems.append(f"{inst_file}: expected a single-channel 16-bit instance id image, got shape {inst.shape}")
        return None, [], problems
    h, w = inst.shape
    if img_w is not None and (w, h) != (img_w, img_h):
        problems.append(f"{inst_file}: size {w}×{h} does not match its image {img_w}×{img_h} ({img_file})")
    anns, bad_values = annotate(inst)
    problems += [f"{inst_file}: {p}" for p in bad_values]
    info = {"file_name": file_name, "height": h, "width": w, "segm_file": segm_name}
    return info, anns, problems


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# listing


def collect_split(root: Path, split: str) -> Tuple[List[tuple], List[str]]:
    """Sorted tasks of one split, and problems found from the listing alone."""
    img_dir = root / "leftImg8bit" / split
    gt_dir = root / "gtFine" / split
    problems: List[str] = []
    if not img_dir.is_dir():
        return [], [f"{img_dir}: missing split directory (convert only the splits you have, e.g. --splits train,val)"]
    if not gt_dir.is_dir():
        return [], [f"{gt_dir}: missing split directory (the gtFine annotations of {img_dir}); download gtFine_trainvaltest"]
    tasks = []
    for city_dir in sorted(p for p in img_dir.iterdir() if not p.name.startswith(".")):
        if not city_dir.is_dir():
            if city_dir.suffix.lower() == ".png":
                problems.append(f"{city_dir}: unexpected file outside a city folder (expected leftImg8bit/{split}/<city>/<city>_<seq>_<frame>{IMG_SUFFIX})")
            continue
        city = city_dir.name
        for img in sorted(city_dir.iterdir()):
            name = img.name
            if name.startswith(".") or not name.lower().endswith(".png"):
                continue
            m = NAME_RE.match(name)
            if not m or m.group("city") != city:
                problems.append(f"{img}: unexpected file name (expected {city}_<seq>_<frame>{IMG_SUFFIX})")
                continue
            stem = name[: -len(IMG_SUFFIX)]
            inst = gt_dir / city / f"{stem}{INST_SUFFIX}"
            segm = gt_dir / city / f"{stem}{SEGM_SUFFIX}"
            tasks.append((str(img), str(inst), str(segm), f"{city}/{name}", f"{city}/{stem}{SEGM_SUFFIX}"))
    if not tasks and not problems:
        problems.append(f"{img_dir}: no images (*{IMG_SUFFIX}) in this split; check the path or leave the split out with --splits")
    return tasks, problems


# ---------------------------------------------------------------------------------------------
# the conversion


def _progress(enabled: bool, console=None):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.1f} images/s" if task.speed else "- images/s")

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Speed(),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False, console=console,
    )


def _map(tasks: Sequence[tuple], pool, chunksize: int):
    if pool is None or len(tasks) <= 1:
        for t in tasks:
            yield load_image(t)
        return
    yield from pool.imap(load_image, tasks, chunksize=chunksize)


def _pool(stack, nproc: int, n_tasks: int):
    """One process pool for every split (None for --nproc 1), started before any thread."""
    if nproc <= 1 or n_tasks <= 1:
        return None
    import multiprocessing as mp

    import pycocotools.mask  # noqa: F401  (imported once here, inherited by forked workers)

    method = "fork" if "fork" in mp.get_all_start_methods() else None
    return stack.enter_context(mp.get_context(method).Pool(min(nproc, n_tasks)))


def convert(
    root,
    out_dir=None,
    nproc: int = 1,
    splits: Sequence[str] = DEFAULT_SPLITS,
    force: bool = False,
    progress: bool = True,
    console=None,
) -> Summary:
    """Convert ``splits`` of the Cityscapes ``root``; write ``out_dir/instancesonly_filtered_gtFine_<split>.json``.

    Raises UserError (nothing written) when a JSON exists and ``force`` is false, or when any input
    file is bad; the message names every bad file.
    """
    t0 = time.perf_counter()
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root / "annotations"
    splits = list(dict.fromkeys(s.strip() for s in splits if s and s.strip()))
    if not splits:
        raise UserError("--splits: no split given; use e.g. --splits train,val,test")
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be at least 1")
    for sub in ("leftImg8bit", "gtFine"):
        if not (root / sub).is_dir():
            raise UserError(f"{root / sub}: missing; ROOT must be the Cityscapes folder holding leftImg8bit/ and gtFine/")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out-dir is a file; give a folder for the JSON files")
    targets = {s: out / JSON_NAME.format(split=s) for s in splits}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise UserError(f"{', '.join(existing)}: already exists; pass --force to overwrite")

    listing = {s: collect_split(root, s) for s in splits}
    problems = [p for s in splits for p in listing[s][1]]
    decoder = _decoder()[0]
    results: Dict[str, bytes] = {}
    summaries: List[SplitSummary] = []
    with contextlib.ExitStack() as stack:
        pool = _pool(stack, nproc, sum(len(listing[s][0]) for s in splits))
        bar = stack.enter_context(_progress(progress, console))
        for split in splits:
            tasks = listing[split][0]
            ts = time.perf_counter()
            summ = SplitSummary(split=split, out_file=str(targets[split]))
            images, annotations = [], []
            task_id = bar.add_task(f"{split}", total=len(tasks))
            # small chunks: a busy worker must not hold the last images while the others idle
            chunk = max(1, min(4, len(tasks) // (8 * nproc)))
            for info, anns, bad in _map(tasks, pool, chunk):
                bar.advance(task_id)
                if bad:
                    problems += bad
                if info is None or problems:
                    continue  # keep going to report every bad file, but build nothing more
                img_id = len(images) + 1
                info["id"] = img_id
                images.append(info)
                if not anns:
                    summ.empty_images += 1
                for ann in anns:
                    ann["image_id"] = img_id
                    ann["id"] = len(annotations) + 1
                    annotations.append(ann)
                    name = _CAT_NAME[ann["category_id"]]
                    (summ.crowd if ann["iscrowd"] else summ.instances)[name] += 1
            summ.images = len(images)
            summ.seconds = time.perf_counter() - ts
            if not problems:
                doc = {"images": images, "categories": [dict(c) for c in CATEGORIES], "annotations": annotations}
                results[split] = json.dumps(doc).encode()
            summaries.append(summ)
    if problems:
        n = len(problems)
        head = f"{n} bad input file{'s' if n != 1 else ''} under {root}; nothing written (fix or remove them, then re-run):"
        raise UserError(head + "\n  " + "\n  ".join(problems))

    from ssflctl.atomic import write_bytes

    for split in splits:
        try:
            write_bytes(targets[split], results.pop(split))
        except OSError as exc:
            raise UserError(f"{targets[split]}: cannot write ({exc.strerror or exc}); choose another --out-dir") from exc
    return Summary(out_dir=str(out), splits=summaries, seconds=time.perf_counter() - t0, decoder=decoder)


# ---------------------------------------------------------------------------------------------
# CLI body


def main(root, out_dir, nproc: int, splits: Sequence[str], force: bool) -> Summary:
    from rich.console import Console

    console = Console(stderr=True)
    summary = convert(root, out_dir, nproc=nproc, splits=splits, force=force, progress=console.is_terminal,
                      console=console)
    print_summary(summary, Console())
    return summary


def print_summary(summary: Summary, console) -> None:
    names = [c["name"] for c in CATEGORIES]
    if console.is_terminal:
        from rich.table import Table

        table = Table(title=f"Cityscapes → COCO ({summary.images} images in {summary.seconds:.1f}s, decoder {summary.decoder})")
        table.add_column("split")
        table.add_column("images", justify="right")
        table.add_column("empty", justify="right")
        for n in names:
            table.add_column(n, justify="right")
        table.add_column("crowd", justify="right")
        table.add_column("images/s", justify="right")
        table.add_column("file")
        for s in summary.splits:
            table.add_row(s.split, str(s.images), str(s.empty_images), *[str(s.instances[n]) for n in names],
                          str(sum(s.crowd.values())), f"{s.images_per_s:.1f}", s.out_file)
        console.print(table)
        return
    header = ["split", "images", "empty", *names, "crowd", "images/s", "file"]
    lines = ["\t".join(header)]
    for s in summary.splits:
        lines.append("\t".join([s.split, str(s.images), str(s.empty_images), *[str(s.instances[n]) for n in names],
                                str(sum(s.crowd.values())), f"{s.images_per_s:.1f}", s.out_file]))
    console.file.write("\n".join(lines) + "\n")  # tab-separated, for scripts
