"""Checkpoints of an attempt directory: the two questions every part of ssflctl asks, answered once.

* :func:`latest_checkpoint` — where to *continue* an attempt that was stopped from outside (requeue,
  time limit, node failure, cancel), what the test step tests, what a resubmission resumes.
* :func:`last_clean_checkpoint` — where to *restart* after a NaN: the last checkpoint whose weights
  were saved before the loss went non-finite.

Both read only file names, mmengine's ``last_checkpoint`` pointer and the checkpoints' own pickled
``meta`` (no torch import: costs milliseconds even for a 300 MB checkpoint). Layout and meta as
written by mmengine 0.10.7 (``mmengine/runner/checkpoint.py``, ``CheckpointHook``).
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]
POINTER = "last_checkpoint"
_NUMBERED = re.compile(r"^(?P<kind>epoch|iter)_(?P<n>\d+)\.pth$")


class _Dummy:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return None

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _MetaUnpickler(pickle.Unpickler):
    """Unpickle a torch checkpoint's structure without loading any tensor data or torch."""

    _SAFE = {("collections", "OrderedDict"), ("collections", "defaultdict"),
             ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
             ("builtins", "complex"), ("builtins", "tuple"), ("builtins", "list"),
             ("builtins", "dict")}

    def find_class(self, module, name):
        if (module, name) in self._SAFE:
            return super().find_class(module, name)
        return _Dummy

    def persistent_load(self, pid):
        return None


def read_checkpoint_meta(path: PathLike) -> Optional[dict]:
    """The ``meta`` dict of an mmengine checkpoint (``epoch``, ``iter``, ``cfg``, ...), or None.

    Reads only the pickle of a zip-format torch checkpoint (torch >= 1.6 ``torch.save`` default),
    never the tensor storages.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            with zf.open(name) as fh:
                obj = _MetaUnpickler(fh).load()
    except Exception:
        return None
    meta = obj.get("meta") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else None


def list_checkpoints(work_dir: PathLike, read_meta: bool = True,
                     iters_per_epoch: Optional[int] = None) -> List[dict]:
    """Numbered checkpoints (``epoch_N.pth``/``iter_N.pth``) of ``work_dir``, by saved iteration.

    Each ``{"path", "name", "epoch", "iter", "source": "meta"|"name"}``. ``iter`` is the number of
    completed training iterations (mmengine's ``meta["iter"]``) read from the checkpoint itself;
    from the file name only when the meta cannot be read (``epoch_N`` × ``iters_per_epoch``, which
    the caller may give; else the text log's ``[i/n]`` counter is read). ``iter`` None when neither
    tells.
    """
    wd = Path(work_dir)
    if not wd.is_dir():
        return []
    out = []
    for p in wd.iterdir():
        m = _NUMBERED.match(p.name)
        if not m or not p.is_file():
            continue
        kind, n = m.group("kind"), int(m.group("n"))
        meta = read_checkpoint_meta(p) if read_meta else None
        if meta is not None and meta.get("iter") is not None:
            out.append({"path": str(p), "name": p.name, "epoch": meta.get("epoch"),
                        "iter": int(meta["iter"]), "source": "meta"})
            continue
        if kind == "iter":
            it, ep = n, None
        else:
            if iters_per_epoch is None:
                from ssflctl.workdir import mmlogs

                iters_per_epoch = mmlogs.iters_per_epoch(wd) or 0
            it, ep = (n * iters_per_epoch if iters_per_epoch else None), n
        out.append({"path": str(p), "name": p.name, "epoch": ep, "iter": it, "source": "name"})
    out.sort(key=lambda c: (c["iter"] is None, c["iter"] or 0, c["name"]))
    return out


def _complete(path: Path) -> bool:
    """A checkpoint cut short while being written has no zip end record."""
    return path.is_file() and zipfile.is_zipfile(path)


def latest_checkpoint(work_dir: PathLike) -> Optional[str]:
    """The attempt's latest complete checkpoint, or None.

    mmengine's ``last_checkpoint`` pointer when it names an existing file (mmengine writes the
    pointer after the checkpoint is saved); else the highest-numbered complete
    ``epoch_N.pth``/``iter_N.pth`` (one cut short while being written has no zip end record). The fallback matters: mmengine
    rewrites the pointer in place (truncate, then write) after each save, so a job killed at that
    moment (the time-limit signal, measured on the test cluster) leaves it empty, and mmengine's
    own resume then starts over from scratch. This is the checkpoint to *continue* from; after a
    NaN use :func:`last_clean_checkpoint` instead (the pointer may name poisoned weights).
    """
    wd = Path(work_dir)
    try:
        text = (wd / POINTER).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        text = ""
    if text:
        p = Path(text) if os.path.isabs(text) else wd / text
        if p.is_file():
            return str(p)
    numbered = []
    try:
        for cand in wd.iterdir():
            m = _NUMBERED.match(cand.name)
            if m:
                numbered.append((int(m.group("n")), cand))
    except (FileNotFoundError, NotADirectoryError):
        return None
    for _, cand in sorted(numbered, reverse=True):
        if _complete(cand):
            return str(cand)
    return None


def last_clean_checkpoint(work_dir: PathLike, nan_iter: Optional[int],
                          start_from: Optional[PathLike] = None) -> Optional[str]:
    """The last checkpoint of ``work_dir`` whose weights are known good before a NaN, or None.

    ``nan_iter`` is the 1-based iteration whose loss was first non-finite (nan.json ``iter``).
    The loss of iteration ``k`` is computed from the weights after ``k - 1`` updates, so the
    checkpoint saved at the end of iteration ``nan_iter - 1`` holds finite weights that already
    give the NaN (a resume replays the same batch, whatever the lr). A clean checkpoint is one
    saved after at most ``nan_iter - 2`` iterations, read from each checkpoint's own ``meta`` —
    never from the ``last_checkpoint`` pointer, which goes on naming checkpoints written after
    the NaN. ``start_from`` (the checkpoint the attempt itself resumed, attempt.json's
    ``resume_from``) is the answer when the attempt went NaN before saving one of its own.
    """
    if nan_iter is None:
        return None
    limit = int(nan_iter) - 2
    best = None
    for c in list_checkpoints(work_dir):
        if c["iter"] is not None and c["iter"] <= limit:
            best = c
    if best is not None:
        return best["path"]
    if start_from and Path(start_from).is_file():
        meta = read_checkpoint_meta(start_from) or {}
        if meta.get("iter") is not None and int(meta["iter"]) <= limit:
            return str(start_from)
    return None
