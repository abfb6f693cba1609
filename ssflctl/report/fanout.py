"""Forked worker processes for the report's heavy items: its figures (~0.1 s each to draw).

``fork_map(fn, items, shared=...)`` is ``[fn(x) for x in items]``, in order, spread over up to
:func:`workers` processes started with ``fork``: they inherit this process's memory, so what
``fn`` reads through :func:`shared` (the report and its figure plan) is never pickled; only
the items and the results travel. It stays serial below ``min_items`` items, with one CPU, where
``fork`` does not exist (macOS and Windows default to spawn), and under ``SSFLCTL_WORKERS=1``.
An exception raised by ``fn`` in a worker is raised here, as ``fn`` raised it.

Measured on 2 cores, ``ssflctl report --out index.md`` over 5000 run directories in 5000
configurations (11 figures): 4.5-4.8 s with the figures drawn here, 4.0-4.2 s in two workers,
for 0.1 s more CPU time. Reading the run directories in workers too saved another 0.2 s for
0.4 s more CPU (the records must be pickled back), so they are read here. The same pattern as
mmengine's ``track_parallel_progress`` (mmengine 0.10, ``mmengine/utils/progressbar.py``), which
mmdet's dataset converters use.

Call it before any thread is started (a progress bar's refresh thread): a forked child inherits
the locks other threads hold.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable, List, Optional

MAX_WORKERS = 4  # a report has a dozen figures or so

_SHARED: Any = None


def workers() -> int:
    """Worker processes to use: ``SSFLCTL_WORKERS`` when set to a positive integer, else the CPUs
    this process may run on, at most MAX_WORKERS."""
    env = os.environ.get("SSFLCTL_WORKERS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, n))


def shared() -> Any:
    """What the running :func:`fork_map` was given as ``shared`` (in the workers and serially)."""
    return _SHARED


def _set_shared(value: Any) -> None:
    global _SHARED
    _SHARED = value


def _run_chunk(args) -> list:
    fn, chunk = args
    return [fn(x) for x in chunk]


def fork_map(fn: Callable[[Any], Any], items: Iterable[Any], *, shared: Any = None, min_items: int = 2,
             n: Optional[int] = None, on_done: Optional[Callable[[int], None]] = None) -> List[Any]:
    """``[fn(x) for x in items]`` in up to ``n`` (default :func:`workers`) forked processes.

    ``fn`` must be a module-level function (it is sent by name) and ``items`` and the results
    picklable; ``shared`` is what ``fn`` reads through :func:`shared`. ``on_done(k)`` is called
    in this process as each run of ``k`` items finishes (a progress bar). Serial when there are
    fewer than ``min_items`` items or one worker. Raises what ``fn`` raises."""
    items = list(items)
    n = min(workers() if n is None else n, len(items))
    if n <= 1 or len(items) < min_items or not _can_fork():
        previous = _SHARED
        _set_shared(shared)
        try:
            out = []
            for x in items:
                out.append(fn(x))
                if on_done is not None:
                    on_done(1)
            return out
        finally:
            _set_shared(previous)
    import multiprocessing

    size = max(1, math.ceil(len(items) / (4 * n)))  # a few chunks per worker: none idles at the end
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    out = []
    with multiprocessing.get_context("fork").Pool(n, initializer=_set_shared, initargs=(shared,)) as pool:
        for part in pool.imap(_run_chunk, [(fn, c) for c in chunks]):
            out.extend(part)
            if on_done is not None:
                on_done(len(part))
    return out


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()
