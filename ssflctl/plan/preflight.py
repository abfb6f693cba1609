"""Dataset pre-flight (issue 15.3): before `submit` sends anything (and at ``--dry-run``), check
each dataset the runs will read, as the rendered config says it (``render.render_config``):

* the annotation file exists and parses (COCO JSON; a VOC image-id list only exists);
* the train split keeps images and boxes after the template's filters (mmdet 3.3
  ``CocoDataset.filter_data``: ``filter_empty_gt`` keeps images with an annotation of one of the
  classes, ``min_size`` drops images whose shorter side is smaller; ``CityscapesDataset`` also drops
  images whose annotations are all crowd), else every job dies in the data loader with
  ``ValueError: need at least one array to concatenate``;
* the classes of the config (``metainfo.classes``, else the dataset class's own) are categories of
  the file;
* the image directory exists and a sample of the images the file names exist (``os.path.isfile``;
  image contents are never read).

Each problem is one line naming the file and what to do. Each annotation file is read once per
process however many runs use it (cached by path, mtime and size; a file changed in between is
read again). Runs that read the same data render once: they are grouped by template, data params
and the overrides that can touch data.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ssflctl.errors import UserError

#: params that never change which data a run reads (runs differing only in these render once here)
NOT_DATA_PARAMS = frozenset({"loss", "lr", "seed", "max_epochs", "max_iters", "val_interval", "log_interval",
                             "ckpt_interval", "auto_scale_lr", "load_from", "batch_size", "workers"})
#: config sections an override may change without changing the data
NOT_DATA_KEYS = ("model", "optim_wrapper", "param_scheduler", "train_cfg", "val_cfg", "test_cfg", "default_hooks",
                 "custom_hooks", "randomness", "env_cfg", "log_processor", "visualizer", "auto_scale_lr", "load_from",
                 "resume", "log_level", "default_scope", "vis_backends")
SAMPLE = 8          # image files looked for per annotation file
_WRAPPERS = ("RepeatDataset", "ClassBalancedDataset", "MultiImageMixDataset")


@dataclass
class AnnSummary:
    """What pre-flight needs of a COCO annotation file (built once per path+mtime+size)."""
    path: str
    categories: Dict[int, str]
    images: List[Tuple[int, str, int, int]]               # (id, file_name, width, height)
    anns: Dict[int, List[Tuple[int, bool, float, float]]]  # image id -> [(category id, crowd, w, h)]
    n_anns: int
    error: Optional[str] = None


@dataclass
class Result:
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    read: List[str] = field(default_factory=list)          # annotation files parsed (not from the cache)
    dirs_checked: set = field(default_factory=set)         # image directories already looked at


_CACHE: Dict[Tuple[str, int, int], AnnSummary] = {}


def read_annotations(path: str, result: Optional[Result] = None) -> AnnSummary:
    """The summary of a COCO file, from the cache when path, mtime and size are unchanged."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    if result is not None:
        result.read.append(path)
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except (ValueError, UnicodeDecodeError) as exc:
        summ = AnnSummary(path, {}, [], {}, 0, error=f"not valid JSON ({str(exc)[:120]})")
    except OSError as exc:
        summ = AnnSummary(path, {}, [], {}, 0, error=f"cannot be read ({exc.strerror or exc})")
    else:
        summ = _summarise(path, data)
    _CACHE[key] = summ
    return summ


def _summarise(path: str, data: Any) -> AnnSummary:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return AnnSummary(path, {}, [], {}, 0, error="not a COCO annotation file (no 'images' list)")
    try:
        cats = {int(c["id"]): str(c["name"]) for c in data.get("categories") or []}
        images = [(int(im["id"]), str(im.get("file_name", "")), int(im.get("width") or 0), int(im.get("height") or 0))
                  for im in data["images"]]
        anns: Dict[int, List[Tuple[int, bool, float, float]]] = {}
        n = 0
        for a in data.get("annotations") or []:
            bbox = a.get("bbox") or [0, 0, 0, 0]
            anns.setdefault(int(a["image_id"]), []).append(
                (int(a["category_id"]), bool(a.get("iscrowd", 0)), float(bbox[2]), float(bbox[3])))
            n += 1
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        return AnnSummary(path, {}, [], {}, 0, error=f"not a COCO annotation file ({type(exc).__name__}: {exc})")
    return AnnSummary(path, cats, images, anns, n)


# --------------------------------------------------------------------------------------------
# what a rendered config reads

@dataclass
class DataSpec:
    split: str               # train | val | test
    type: str
    ann_file: str            # joined with data_root
    img_dir: str             # data_root + data_prefix.img
    classes: Optional[Tuple[str, ...]]
    filter_cfg: Dict[str, Any]
    test_mode: bool


def _join(root: Optional[str], rel: Optional[str]) -> str:
    rel = rel or ""
    if not root or os.path.isabs(rel):
        return rel
    return os.path.join(root, rel)


def _inner(ds) -> List[dict]:
    if not isinstance(ds, dict):
        return []
    if "datasets" in ds:
        return [x for d in ds.get("datasets") or [] for x in _inner(d)]
    if ds.get("type") in _WRAPPERS and "dataset" in ds:
        return _inner(ds["dataset"])
    return [ds]


def _default_classes(dtype: str) -> Optional[Tuple[str, ...]]:
    try:
        from mmdet.registry import DATASETS

        cls = DATASETS.get(dtype)
        classes = (getattr(cls, "METAINFO", None) or {}).get("classes")
        return tuple(classes) if classes else None
    except Exception:  # noqa: BLE001 - an unknown type is the renderer's to refuse
        return None


def data_specs(cfg, splits=("train", "val", "test")) -> List[DataSpec]:
    """The datasets a rendered config reads, per split."""
    out = []
    for split in splits:
        loader = cfg.get(f"{split}_dataloader")
        if not loader:
            continue
        for ds in _inner(loader.get("dataset")):
            root = ds.get("data_root")
            prefix = ds.get("data_prefix") or {}
            img = prefix.get("img", prefix.get("img_path", "")) if isinstance(prefix, dict) else ""
            dtype = str(ds.get("type", ""))
            meta = ds.get("metainfo") or {}
            classes = tuple(meta["classes"]) if isinstance(meta, dict) and meta.get("classes") else \
                _default_classes(dtype.split(".")[-1])
            out.append(DataSpec(split, dtype.split(".")[-1], _join(root, ds.get("ann_file")), _join(root, img),
                                classes, dict(ds.get("filter_cfg") or {}), bool(ds.get("test_mode", split != "train"))))
    return out


# --------------------------------------------------------------------------------------------
# the checks

def _is_cityscapes_test(spec: DataSpec, summ: Optional[AnnSummary]) -> bool:
    text = f"{spec.ann_file} {spec.img_dir}".lower().replace("\\", "/")
    cityscapes = spec.type == "CityscapesDataset" or "cityscapes" in text or "gtfine" in text
    test = "gtfine_test" in text or "/test/" in text.rstrip("/") + "/" or \
        (summ is not None and any("/test/" in f"/{f}" or f.startswith("test/") for _, f, _, _ in summ.images[:5]))
    return cityscapes and test


def kept_after_filters(summ: AnnSummary, spec: DataSpec) -> Tuple[int, int]:
    """(images, boxes) the train split keeps, by mmdet 3.3's CocoDataset(/Cityscapes).filter_data
    and parse_data_info (boxes of the classes, not crowd, at least 1 px)."""
    wanted = set(spec.classes) if spec.classes else set(summ.categories.values())
    cat_ids = {i for i, n in summ.categories.items() if n in wanted}
    fe = bool(spec.filter_cfg.get("filter_empty_gt", False)) and not spec.test_mode
    min_size = float(spec.filter_cfg.get("min_size", 0) or 0) if not spec.test_mode else 0
    images = boxes = 0
    for img_id, _f, w, h in summ.images:
        anns = [a for a in summ.anns.get(img_id, []) if a[0] in cat_ids]
        if fe and not anns:
            continue
        if fe and spec.type == "CityscapesDataset" and all(a[1] for a in anns):
            continue
        if spec.filter_cfg and not spec.test_mode and min(w, h) < min_size:
            continue
        images += 1
        boxes += sum(1 for _c, crowd, bw, bh in anns if not crowd and bw >= 1 and bh >= 1)
    return images, boxes


def _params_of(splits: List[str], what: str) -> str:
    return "/".join(f"params.{s}_{what}" for s in splits)


def check_file(ann: str, splits: List[str], result: Result, where: str) -> Optional[AnnSummary]:
    """The annotation file read by ``splits``: present and parseable (one problem line for all of
    them). Its summary (None for a non-JSON list, or when there is a problem)."""
    names = "/".join(splits)
    if not ann:
        result.problems.append(f"{where}: the {names} dataset names no ann_file; set {_params_of(splits, 'ann')}")
        return None
    if not os.path.isfile(ann):
        result.problems.append(f"{ann}: the {names} annotation file does not exist; convert or download the data, or "
                               f"set {_params_of(splits, 'ann')} ({where})")
        return None
    if not ann.endswith(".json"):
        return None  # VOC-style image-id lists: present is what can be checked without mmdet's parser
    summ = read_annotations(ann, result)
    if summ.error:
        result.problems.append(f"{ann}: {summ.error}; re-run the conversion (ssflctl convert) or fix the file "
                               f"({names} split, {where})")
        return None
    return summ


def check_spec(spec: DataSpec, summ: AnnSummary, result: Result, where: str) -> None:
    """Problems of one dataset of one split whose annotation file parsed, appended to ``result``."""
    ann = spec.ann_file
    if spec.classes:
        have = set(summ.categories.values())
        absent = [c for c in spec.classes if c not in have]
        if absent and len(absent) == len(spec.classes):
            result.problems.append(f"{ann}: none of the config's classes ({', '.join(spec.classes)}) is a category "
                                   f"of this file (it has: {', '.join(sorted(have)) or 'none'}); set params.classes "
                                   f"to the file's names, or classes: null to take them from the file ({where})")
            return
        if absent:
            result.problems.append(f"{ann}: classes {', '.join(absent)} of the config are not categories of this "
                                   f"file (it has: {', '.join(sorted(have))}); set params.classes to the names the "
                                   f"file has, or convert the data with these classes ({where})")
            return
    if spec.split == "train":
        images, boxes = kept_after_filters(summ, spec)
        if not images or not boxes:
            if _is_cityscapes_test(spec, summ):
                result.problems.append(
                    f"{ann}: Cityscapes' test split has only dummy labels (its ground truth is not public), so "
                    f"nothing is left to train on; train on the train split (params.train_ann/train_img) and "
                    f"evaluate on val ({where})")
            else:
                filt = f" after filter_cfg {spec.filter_cfg}" if spec.filter_cfg else ""
                result.problems.append(
                    f"{ann}: the train split keeps {images} images and {boxes} boxes{filt} ({len(summ.images)} "
                    f"images, {summ.n_anns} annotations in the file); every job would stop with 'need at least one "
                    f"array to concatenate': point params.train_ann at annotated data or loosen the filter "
                    f"(overrides: train_dataloader.dataset.filter_cfg) ({where})")
            return
    elif not summ.n_anns and _is_cityscapes_test(spec, summ):
        result.problems.append(
            f"{ann}: Cityscapes' test split has only dummy labels (its ground truth is not public), so AP on it "
            f"means nothing; validate and test on val (params.val_ann/val_img, params.test_ann/test_img) ({where})")
        return
    if (spec.img_dir, spec.ann_file) in result.dirs_checked:
        return
    result.dirs_checked.add((spec.img_dir, spec.ann_file))
    if not os.path.isdir(spec.img_dir):
        result.problems.append(f"{spec.img_dir}: the {spec.split} image directory does not exist; set "
                               f"params.{spec.split}_img (relative to data_root) or fetch the images ({where})")
        return
    _check_images(spec, summ, result, where)


def _check_images(spec: DataSpec, summ: AnnSummary, result: Result, where: str) -> None:
    files = [f for _, f, _, _ in summ.images]
    if not files:
        return
    step = max(1, len(files) // SAMPLE)
    sample = files[::step][:SAMPLE]
    if files[-1] not in sample:
        sample.append(files[-1])
    absent = [f for f in sample if not os.path.isfile(os.path.join(spec.img_dir, f))]
    if absent:
        result.problems.append(
            f"{spec.img_dir}: {len(absent)} of {len(sample)} sampled images named in {os.path.basename(spec.ann_file)} "
            f"are not there (e.g. {absent[0]}); check params.{spec.split}_img against the file's file_name entries "
            f"({where})")


# --------------------------------------------------------------------------------------------
# runs -> configs -> checks

def data_key(run) -> str:
    params = {k: v for k, v in (run.params or {}).items() if k not in NOT_DATA_PARAMS}
    overrides = {k: v for k, v in (run.overrides or {}).items() if str(k).split(".")[0] not in NOT_DATA_KEYS}
    return json.dumps({"t": run.template, "p": params, "o": overrides, "test": bool(run.test)},
                      sort_keys=True, default=str)


def check(runs, where: Callable[[Any], str] = lambda run: run.run_id,
          render: Optional[Callable] = None) -> Result:
    """Pre-flight every dataset the runs read. ``render(template, params, overrides)`` gives the
    config (default ``plan.render.render_config``); runs with the same data render once. A run whose
    data root does not exist is skipped (``spec.expand`` already said so)."""
    result = Result()
    if render is None:
        try:
            import importlib

            importlib.import_module("mmengine")
            import functools

            from ssflctl.plan.render import RenderCache, render_config

            render = functools.partial(render_config, cache=RenderCache())  # the template parsed once
        except ImportError as exc:
            result.notes.append(f"dataset pre-flight skipped: the training stack is not installed here ({exc}); "
                                "install it with scripts/setup.sh to check the data before submitting")
            return result
    seen_keys: Dict[str, None] = {}
    specs: Dict[Tuple, Tuple[DataSpec, str]] = {}
    for run in runs:
        root = run.params.get("data_root") if run.params else None
        if root is not None and not os.path.isdir(root):
            continue
        key = data_key(run)
        if key in seen_keys:
            continue
        seen_keys[key] = None
        try:
            cfg = render(run.template, run.params, run.overrides)
        except UserError as exc:
            result.problems.append(f"{where(run)}: {str(exc).splitlines()[0]}")
            continue
        splits = ("train", "val", "test") if run.test else ("train", "val")
        for spec in data_specs(cfg, splits):
            skey = (spec.split, spec.type, spec.ann_file, spec.img_dir, spec.classes,
                    json.dumps(spec.filter_cfg, sort_keys=True, default=str), spec.test_mode)
            specs.setdefault(skey, (spec, where(run)))
    # each annotation file once (whatever splits read it), then each split's own checks
    by_file: Dict[str, List[Tuple[DataSpec, str]]] = {}
    for spec, at in specs.values():
        by_file.setdefault(spec.ann_file, []).append((spec, at))
    for ann, users in by_file.items():
        splits = list(dict.fromkeys(spec.split for spec, _ in users))
        summ = check_file(ann, splits, result, users[0][1])
        if summ is None:
            continue
        for spec, at in users:
            check_spec(spec, summ, result, at)
    # one line per problem, each once
    result.problems = list(dict.fromkeys(result.problems))
    return result
