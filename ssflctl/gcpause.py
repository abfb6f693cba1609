"""Pause Python's cyclic garbage collector while a command piles up many small objects.

Reading thousands of run records (dicts of dicts) or a split's annotations creates millions of
containers and no reference cycles; the collector's full passes over them cost time and free
nothing, while reference counting frees them as usual. Measured on 2 cores (fresh processes, the
collector on vs off): ``ssflctl report --out index.md`` over 5000 run directories 5.25-5.31 s vs
4.40-4.60 s, same peak memory (277 MB); piped ``ssflctl status`` of 5000 runs 1.6-2.0 s vs
1.4-1.65 s. The converter measured ≈5% at 18 annotations an image.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The collector off inside the block, back as it was after (also on an exception)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
