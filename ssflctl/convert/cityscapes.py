"""``ssflctl convert cityscapes``: Cityscapes gtFine → MMDetection-compatible COCO instance JSON.

Produces the same annotations as MMDetection's ``tools/dataset_converters/cityscapes.py`` (the
reference): the files ``instancesonly_filtered_gtFine_{split}.json``; the categories that have
instances and are evaluated (ids 24, 25, 26, 27, 28, 31, 32, 33); one annotation per instance id
≥ 24 of the ``*_gtFine_instanceIds.png`` (label = id // 1000 for ids ≥ 1000, else the id itself, a
crowd region with ``iscrowd = 1``); identical RLE segmentations, areas and boxes; the same image
fields (``file_name`` = ``<city>/<name>``, ``height``, ``width``, ``segm_file``).

Differences, all deliberate: images are sorted (ids are stable across machines); image and
annotation ids start at 1; ``annotations`` is present even when empty; the category table does not
come from an import of cityscapesscripts; existing outputs are kept unless ``force``.

Input the reference accepts or trips over, handled here:

- files under ``leftImg8bit/`` that are not ``<city>/<stem>_leftImg8bit.png`` (Foggy Cityscapes'
  ``*_leftImg8bit_foggy_beta_0.02.png``, notes, stray files) are skipped and counted in one
  warning (the reference's ``assert img_file.endswith(suffix)`` stops on such a PNG);
- every bad input file is reported, one line each with what to do, and nothing is written: a
  missing, truncated (no IEND chunk) or undecodable PNG, sizes that disagree, an instanceIds PNG
  that is not 16-bit grey (8-bit would turn every instance into a crowd region), a gtFine
  instanceIds file whose leftImg8bit image is missing (the reference drops its annotations
  silently), label values that are not Cityscapes labels;
- all splits are written, or none: temporary files first, renamed over the targets only when
  every one was written (``write_all``).

Speed: each 16-bit instanceIds PNG is decoded once, by the fastest decoder installed (imagecodecs'
libpng, the ``fast`` extra, then OpenCV, then Pillow; identical arrays, see ``DECODERS``), and all
its instances are run-length encoded in one pass. The reference builds a full-image Fortran-order
mask per instance; here the run boundaries of the whole label map in column-major order are found
from row-major comparisons (no transposed copy), and each instance's COCO RLE counts are read off
the runs that carry its id. pycocotools then compresses those counts (``frPyObjects``) and
computes area and box from them, so the strings are byte-identical to ``maskUtils.encode`` of the
full mask. The leftImg8bit and labelIds PNGs are never decoded: their first 33 and last 12 bytes
give the size and show truncation.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ssflctl import gcpause
from ssflctl.convert.cityscapes_labels import CATEGORIES, CATEGORY_IDS, ID2LABEL, MAX_LABEL_ID
from ssflctl.errors import UserError

IMG_SUFFIX = "_leftImg8bit.png"
INST_SUFFIX = "_gtFine_instanceIds.png"
SEGM_SUFFIX = "_gtFine_labelIds.png"
JSON_NAME = "instancesonly_filtered_gtFine_{split}.json"
DEFAULT_SPLITS = ("train", "val", "test")
MAX_PROBLEM_LINES = 50  # bad files listed in the error; the head line counts them all
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
    warnings: List[str] = field(default_factory=list)  # one line each; the CLI prints them on stderr

    @property
    def images(self) -> int:
        return sum(s.images for s in self.splits)


# ---------------------------------------------------------------------------------------------
# decoding

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: the IEND chunk's type and CRC (PNG spec, section 11.2.5): the last 8 bytes of every complete PNG
IEND_TAIL = b"IEND\xaeB`\x82"
#: decoders in order of speed on Cityscapes instanceIds (2048×1024, 16-bit grey, zlib level 6). The
#: floors of benchmarks/bench_convert.py on this project's 2-core machine, ms per image (read + decode):
#: imagecodecs 2026.3.6 (libpng 1.6.55) 5.0 and OpenCV 5.0.0 11.3 at load 2.2, 11.9 and 28.4 at load
#: 7.5; Pillow took 1.3× OpenCV's time in a side-by-side run. All give identical uint16 arrays (tested).
DECODERS = ("imagecodecs", "opencv", "pillow")
DECODER_ENV = "SSFLCTL_DECODER"


def _decode_imagecodecs():
    import imagecodecs

    if not imagecodecs.PNG.available:  # pragma: no cover - depends on the wheel
        raise ImportError("imagecodecs was built without PNG support")
    png_decode = imagecodecs.png_decode
    reusable: Dict[Tuple[int, int], np.ndarray] = {}

    def decode(data: bytes, reuse: bool = False) -> np.ndarray:
        if reuse:  # decode into this process's buffer: no fresh 4 MB (and its page faults) per image
            hdr = parse_png_header(data[:33], b"")
            if hdr is not None and hdr.bit_depth == 16 and hdr.color_type == 0:
                shape = (hdr.height, hdr.width)
                out = reusable.get(shape)
                if out is None:
                    reusable.clear()
                    out = reusable[shape] = np.empty(shape, np.uint16)
                return png_decode(data, out=out)
        return png_decode(data)

    return decode


def _decode_opencv():
    import cv2

    try:  # OpenCV logs a warning for each bad file on stderr; we report them ourselves
        from cv2.utils import logging as cv_logging

        cv_logging.setLogLevel(cv_logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the OpenCV build
        pass
    imdecode, unchanged = cv2.imdecode, cv2.IMREAD_UNCHANGED

    def decode(data: bytes, reuse: bool = False) -> np.ndarray:
        img = imdecode(np.frombuffer(data, np.uint8), unchanged)
        if img is None:
            raise ValueError("OpenCV could not decode it")
        return img

    return decode


def _decode_pillow():
    import io

    from PIL import Image

    def decode(data: bytes, reuse: bool = False) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im)

    return decode


_FACTORIES = {"imagecodecs": _decode_imagecodecs, "opencv": _decode_opencv, "pillow": _decode_pillow}


def _decoder(name: Optional[str] = None):
    """``(name, decode(png_bytes, reuse=False) -> ndarray)``: the fastest decoder installed (``DECODERS``).

    ``name`` (or the environment variable ``SSFLCTL_DECODER``) forces one; a forced decoder that is
    not installed is a UserError. imagecodecs is the optional extra ``ssflctl[fast]``; OpenCV comes
    with mmcv; Pillow is a core dependency.
    """
    name = name or os.environ.get(DECODER_ENV, "").strip().lower() or None
    if name is not None:
        if name not in _FACTORIES:
            raise UserError(f"{DECODER_ENV}={name}: unknown PNG decoder; use one of {', '.join(DECODERS)}")
        try:
            return name, _FACTORIES[name]()
        except ImportError as exc:
            raise UserError(f"{DECODER_ENV}={name}: not installed ({exc}); unset it to use the fastest installed "
                            f"decoder, or `pip install ssflctl[fast]` for imagecodecs") from exc
    for cand in DECODERS:
        try:
            return cand, _FACTORIES[cand]()
        except ImportError:
            continue
    raise UserError("no PNG decoder: install Pillow (`pip install pillow`)")  # pragma: no cover


_READ = None


def decode_png(data: bytes, reuse: bool = False) -> np.ndarray:
    """Pixels of a PNG given as bytes, with the decoder ``_decoder()`` picks (chosen once per process).

    ``reuse``: the decoder may return the same array again on the next call with ``reuse`` (the
    caller keeps no reference to it); saves a fresh allocation per image.
    """
    global _READ
    if _READ is None:
        _READ = _decoder()[1]
    return _READ(data, reuse)


def read_png(path: str) -> np.ndarray:
    """Pixels of the PNG file ``path`` (a fresh array), with ``decode_png``'s decoder."""
    with open(path, "rb") as fh:
        return decode_png(fh.read())


@dataclass
class PngHeader:
    """What the first 33 bytes of a PNG say (PNG spec, section 11.2.2 IHDR), and whether it ends."""

    width: int
    height: int
    bit_depth: int
    color_type: int  # 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA
    complete: bool  # the IEND chunk is present (a truncated file has lost it)


def parse_png_header(head: bytes, tail: bytes) -> Optional[PngHeader]:
    """``head``: the file's first ≥ 33 bytes; ``tail``: its last ≥ 8. None when not a PNG."""
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return PngHeader(w, h, head[24], head[25], tail.endswith(IEND_TAIL))


def png_header(path: str) -> PngHeader:
    """The header of a PNG file from its first 33 and last 12 bytes, without decoding it.

    A file whose last bytes are not the IEND chunk is searched whole for it (legal PNGs may carry
    trailing bytes); ``complete`` is False when it has none, i.e. the file was cut short. Raises
    ValueError for a file that is not a PNG.
    """
    with open(path, "rb") as fh:
        head = fh.read(33)
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise ValueError("empty file")
        fh.seek(max(0, size - 12))
        tail = fh.read(12)
        hdr = parse_png_header(head, tail)
        if hdr is None:
            raise ValueError("not a PNG file")
        if not hdr.complete:
            fh.seek(0)
            hdr.complete = IEND_TAIL in fh.read()
    return hdr


def png_size(path: str) -> Tuple[int, int]:
    """(width, height) from the PNG header, without decoding."""
    hdr = png_header(path)
    return hdr.width, hdr.height


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
    flat_img = inst.reshape(-1)
    flat = _vertical_changes(inst)  # flat (row-major) indices p of pixels that differ from p - w
    col = np.flatnonzero(inst[0, 1:] != inst[h - 1, :-1]) + 1  # runs starting at the top of a column
    ys, xs = np.divmod(flat, w)
    pos = np.concatenate((np.zeros(1, np.int64), xs * h + ys, col * h))  # column-major start indices
    vals = np.concatenate((inst[0, :1], flat_img[flat], inst[0, col]))  # the value of each run
    if vals.dtype.kind == "u" and vals.dtype.itemsize <= 4 and n < 2**31:
        key = (pos << 32) | vals.astype(np.int64)  # one sort of (position, value) pairs
        key.sort()
        starts, values = key >> 32, key & 0xFFFFFFFF
    else:  # signed label maps (Pillow's mode I): sort positions, carry the values
        order = np.argsort(pos, kind="stable")
        starts, values = pos[order], vals[order]
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
    if starts.size < 2**32:  # group the runs by id, each id's runs in position order: one sort
        key = (values.astype(np.int64) << 32) | np.arange(starts.size, dtype=np.int64)
        key.sort()
        order, values = key & 0xFFFFFFFF, key >> 32
    else:  # pragma: no cover - more than 4 billion runs
        order = np.argsort(values, kind="stable")
        values = values[order]
    starts, ends = starts[order], ends[order]
    first = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))  # values are sorted
    uniq = values[first]
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


TRUNCATED_HINT = "re-download or re-extract it (a copy or download was cut short)"
MISSING_HINT = "extract gtFine_trainvaltest.zip into ROOT, or move {img} out of ROOT"


def _check_png(path: str, what: str, problems: List[str], img_file: str) -> Optional[Tuple[int, int]]:
    """(width, height) of a PNG that is only checked, not decoded; a problem line otherwise."""
    try:
        hdr = png_header(path)
    except FileNotFoundError:
        problems.append(f"{path}: missing ({what}); {MISSING_HINT.format(img=img_file)}")
        return None
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable PNG ({_why(exc)}); re-download or re-extract it")
        return None
    if not hdr.complete:
        problems.append(f"{path}: truncated PNG (no IEND chunk at its end); {TRUNCATED_HINT}")
        return None
    return hdr.width, hdr.height


def load_image(task: Tuple[str, str, str, str, str]):
    """Worker: ``(img, inst, segm, file_name, segm_file)`` → ``(image_info, anns, problems)``.

    The leftImg8bit and labelIds PNGs are checked from their first 33 and last 12 bytes (size,
    not truncated); only the instanceIds PNG is decoded. It must be a 16-bit grey PNG, as
    cityscapesscripts' ``json2instanceImg`` writes it: in an 8-bit one no value reaches 1000, so
    every instance would become a crowd region.
    """
    img_file, inst_file, segm_file, file_name, segm_name = task
    problems: List[str] = []
    img_size = _check_png(img_file, "leftImg8bit image", problems, img_file)
    seg_size = _check_png(segm_file, "labelIds of this image", problems, img_file)
    if img_size is not None and seg_size is not None and seg_size != img_size:
        problems.append(f"{segm_file}: size {seg_size[0]}×{seg_size[1]} does not match its image "
                        f"{img_size[0]}×{img_size[1]} ({img_file})")
    try:
        with open(inst_file, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        problems.append(f"{inst_file}: missing (instanceIds of this image); {MISSING_HINT.format(img=img_file)}")
        return None, [], problems
    except OSError as exc:
        problems.append(f"{inst_file}: unreadable ({_why(exc)})")
        return None, [], problems
    hdr = parse_png_header(data[:33], data[-12:])
    if hdr is None:
        problems.append(f"{inst_file}: unreadable PNG (not a PNG file); re-download or re-extract it")
        return None, [], problems
    if not hdr.complete and IEND_TAIL not in data:
        problems.append(f"{inst_file}: truncated PNG (no IEND chunk at its end); {TRUNCATED_HINT}")
        return None, [], problems
    if hdr.bit_depth != 16 or hdr.color_type != 0:
        kind = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}.get(hdr.color_type, "unknown")
        crowd = ", so every instance would become a crowd region" if hdr.bit_depth < 16 and hdr.color_type in (0, 3) else ""
        problems.append(
            f"{inst_file}: {hdr.bit_depth}-bit {kind} PNG, but instanceIds must be 16-bit grey (ids like 26003 = car #3)"
            f"{crowd}; use the original gtFine file or regenerate it with cityscapesscripts' json2instanceImg")
        return None, [], problems
    try:
        inst = decode_png(data, reuse=True)  # only encoded below, never kept
    except Exception as exc:
        problems.append(f"{inst_file}: unreadable or truncated PNG ({_why(exc)}); {TRUNCATED_HINT}")
        return None, [], problems
    if inst.ndim != 2:  # pragma: no cover - the header said grey
        problems.append(f"{inst_file}: expected a single-channel 16-bit instance id image, got shape {inst.shape}")
        return None, [], problems
    h, w = inst.shape
    if img_size is not None and (w, h) != img_size:
        problems.append(f"{inst_file}: size {w}×{h} does not match its image {img_size[0]}×{img_size[1]} ({img_file})")
    anns, bad_values = annotate(inst)
    problems += [f"{inst_file}: {p}" for p in bad_values]
    info = {"file_name": file_name, "height": h, "width": w, "segm_file": segm_name}
    return info, anns, problems


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# listing


@dataclass
class Listing:
    """One split's files: the images to convert, problems found from names alone, skipped files."""

    tasks: List[tuple] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # not Cityscapes images: left out, counted in a warning


def _visible(entries) -> List[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def collect_split(root: Path, split: str) -> Listing:
    """The sorted tasks of one split, and what the listing alone shows.

    An image is any ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``, the files MMDetection's
    converter reads (its ``collect_files`` globs ``<city>/*.png`` and takes the stem before
    ``leftImg8bit.png``); its annotations are ``gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png``
    and ``..._gtFine_labelIds.png``. Anything else under leftImg8bit (derived images such as Foggy
    Cityscapes' ``*_leftImg8bit_foggy_beta_0.02.png``, notes, nested folders) is skipped and counted;
    hidden files are ignored. A ``*_gtFine_instanceIds.png`` without its image is a problem: its
    annotations would be missing from the JSON.
    """
    img_dir = root / "leftImg8bit" / split
    gt_dir = root / "gtFine" / split
    out = Listing()
    if not img_dir.is_dir():
        out.problems.append(f"{img_dir}: missing split directory (convert only the splits you have, e.g. --splits train,val)")
        return out
    if not gt_dir.is_dir():
        out.problems.append(f"{gt_dir}: missing split directory (the gtFine annotations of {img_dir}); download gtFine_trainvaltest")
        return out
    expected = set()
    with os.scandir(img_dir) as it:
        cities = _visible(it)
    for city_entry in cities:
        if not city_entry.is_dir():
            out.skipped.append(city_entry.path)  # outside a city folder: MMDetection's glob does not see it
            continue
        city = city_entry.name
        with os.scandir(city_entry.path) as it:
            entries = _visible(it)
        for e in entries:
            name = e.name
            if not name.endswith(IMG_SUFFIX) or len(name) == len(IMG_SUFFIX) or not e.is_file():
                out.skipped.append(e.path)
                continue
            stem = name[: -len(IMG_SUFFIX)]
            inst = gt_dir / city / f"{stem}{INST_SUFFIX}"
            segm = gt_dir / city / f"{stem}{SEGM_SUFFIX}"
            expected.add((city, f"{stem}{INST_SUFFIX}"))
            out.tasks.append((e.path, str(inst), str(segm), f"{city}/{name}", f"{city}/{stem}{SEGM_SUFFIX}"))
    # annotations whose image is missing: MMDetection's converter drops them without a word
    with os.scandir(gt_dir) as it:
        gt_cities = [e for e in _visible(it) if e.is_dir()]
    orphan_lines, n_orphans = [], 0
    for gt_city in gt_cities:
        with os.scandir(gt_city.path) as it:
            names = sorted(e.name for e in it if e.name.endswith(INST_SUFFIX) and not e.name.startswith("."))
        orphans = [n for n in names if (gt_city.name, n) not in expected]
        n_orphans += len(orphans)
        if not orphans:
            continue
        if not (img_dir / gt_city.name).is_dir():
            orphan_lines.append(
                f"{gt_city.path}: {len(orphans)} annotated image{'s' if len(orphans) != 1 else ''} but no "
                f"{img_dir / gt_city.name} folder, so their annotations would be missing from the JSON; add the "
                f"images, or move this gtFine folder out of {gt_dir}")
            continue
        for n in orphans:
            img = img_dir / gt_city.name / f"{n[: -len(INST_SUFFIX)]}{IMG_SUFFIX}"
            orphan_lines.append(
                f"{Path(gt_city.path) / n}: its image {img} is missing, so its annotations would be missing from "
                f"the JSON; restore the image (re-extract leftImg8bit), or move this image's gtFine files away")
    if not out.tasks:
        gt_note = f" ({n_orphans} annotated in {gt_dir})" if n_orphans else ""
        out.problems.append(f"{img_dir}: no images (*{IMG_SUFFIX}) in this split{gt_note}; check the path or "
                            f"leave the split out with --splits")
    else:
        out.problems += orphan_lines
    return out


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
    file is bad; the message counts the bad files and names the first ``MAX_PROBLEM_LINES``, one line
    each. Files under leftImg8bit that are not Cityscapes images are skipped and counted in
    ``Summary.warnings``. All JSON files are written or none (``write_all``).
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
    problems = [p for s in splits for p in listing[s].problems]
    skipped = [p for s in splits for p in listing[s].skipped]
    decoder = _decoder()[0]
    results: Dict[str, bytes] = {}
    summaries: List[SplitSummary] = []
    with contextlib.ExitStack() as stack:
        pool = _pool(stack, nproc, sum(len(listing[s].tasks) for s in splits))
        stack.enter_context(gcpause.paused())  # after the fork: the workers keep their collector
        bar = stack.enter_context(_progress(progress, console))
        for split in splits:
            tasks = listing[split].tasks
            ts = time.perf_counter()
            summ = SplitSummary(split=split, out_file=str(targets[split]))
            images, annotations = [], []
            task_id = bar.add_task(f"{split}", total=len(tasks))
            # small chunks: a busy worker must not hold the last images while the others idle
            chunk = max(1, min(4, len(tasks) // (8 * nproc)))
            for info, anns, bad in _map(tasks, pool, chunk):
                if progress:
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
        shown = problems[:MAX_PROBLEM_LINES]
        if n > len(shown):
            shown.append(f"... and {n - len(shown)} more")
        raise UserError(head + "\n  " + "\n  ".join(shown))
    warnings = []
    if skipped:
        k = len(skipped)
        warnings.append(
            f"skipped {k} file{'s' if k != 1 else ''} under {root / 'leftImg8bit'} that {'are' if k != 1 else 'is'} "
            f"not a Cityscapes image (<city>/<city>_<seq>_<frame>{IMG_SUFFIX}), e.g. {skipped[0]}; "
            f"{'they are' if k != 1 else 'it is'} not in the JSON")
    write_all([(targets[s], results.pop(s)) for s in splits])
    return Summary(out_dir=str(out), splits=summaries, seconds=time.perf_counter() - t0, decoder=decoder,
                   warnings=warnings)


# ---------------------------------------------------------------------------------------------
# writing every split, or none


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_data(fh, data: bytes) -> None:
    """The one place bytes reach the disk (a test makes it fail as a full disk would)."""
    fh.write(data)


def _write_temp(target: Path, data: bytes) -> Path:
    """``data`` in a new temporary file next to ``target``, flushed to disk; removed on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_data(fh, data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
            os.fsync(fh.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return Path(tmp)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_all(files: Sequence[Tuple[Path, bytes]]) -> None:
    """Write every ``(target, data)`` or none: a failure leaves every target as it was.

    1. each file is written to a temporary file in its folder and fsynced (a full disk fails
       here, before any target is touched); 2. each existing target gets a hard link as a backup
       (no extra space); 3. the temporary files are renamed over the targets. If a rename fails,
       the targets already replaced are put back from their backups. Raises UserError naming the
       file that could not be written and saying that nothing changed.
    """
    if not files:
        return
    out_dir = files[0][0].parent
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc}); choose another --out-dir") from exc
    temps: List[Path] = []
    backups: Dict[Path, Path] = {}
    existed = {target for target, _ in files if target.exists()}
    done: List[Path] = []
    ok = False
    try:
        for target, data in files:
            try:
                temps.append(_write_temp(target, data))
            except OSError as exc:
                raise UserError(
                    f"{target}: cannot write ({exc.strerror or exc}); no JSON file was changed — "
                    f"free some space or choose another --out-dir") from exc
        for target in sorted(existed):
            bak = target.with_name(f".{target.name}.{os.getpid()}.bak")
            _unlink(bak)
            try:
                os.link(target, bak)
            except OSError:  # no hard links here (some network file systems): rename-only safety
                continue
            backups[target] = bak
        for (target, _), tmp in zip(files, temps):
            try:
                os.replace(tmp, target)
            except OSError as exc:
                restored = _restore(done, backups, existed)
                raise UserError(
                    f"{target}: cannot replace it ({exc.strerror or exc}); "
                    + ("no JSON file was changed" if restored else
                       f"these files are new and the rest old: {', '.join(map(str, done))}")
                    + " — re-run when the folder is writable or choose another --out-dir") from exc
            done.append(target)
        _fsync_dir(out_dir)
        ok = True
    finally:
        for tmp in temps:
            _unlink(tmp)
        for bak in backups.values():
            _unlink(bak)
        if created and not ok:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty: the folder this call made, nothing else


def _restore(done: List[Path], backups: Dict[Path, Path], existed) -> bool:
    """Put the targets already replaced back from their backups (a new file is removed again).

    False when some old file could not be put back (no backup: hard links unsupported)."""
    ok = True
    for target in reversed(done):
        try:
            if target in backups:
                os.replace(backups.pop(target), target)
            elif target not in existed:
                os.unlink(target)
            else:
                ok = False
        except OSError:
            ok = False
    return ok


# ---------------------------------------------------------------------------------------------
# CLI body


def main(root, out_dir, nproc: int, splits: Sequence[str], force: bool) -> Summary:
    from rich.console import Console

    console = Console(stderr=True)
    summary = convert(root, out_dir, nproc=nproc, splits=splits, force=force, progress=console.is_terminal,
                      console=console)
    for line in summary.warnings:
        console.print(f"[bold yellow]warning:[/] {line}", markup=True, highlight=False, soft_wrap=True)
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
