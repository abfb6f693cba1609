"""torch >= 2.6 ``weights_only=True`` vs. mmengine 0.10.7 checkpoints.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: it unpickles only tensors,
containers and an allowlist of types. mmengine 0.10.7 calls ``torch.load(filename,
map_location=...)`` without ``weights_only`` when it resumes or loads a checkpoint, and its
checkpoints hold more than tensors: the message hub's ``HistoryBuffer`` objects (with numpy
arrays inside) and numpy scalars in the runtime info. Resume therefore fails with
``UnpicklingError: Weights only load failed ... Unsupported global: GLOBAL
mmengine.logging.history_buffer.HistoryBuffer``.

We do not turn ``weights_only`` off (that would make every checkpoint a code-execution vector
again); we add exactly the types mmengine checkpoints contain to torch's allowlist with
``torch.serialization.add_safe_globals``. Importing this module applies it, so a rendered config
lists ``ssflctl.extensions.compat`` in ``custom_imports`` and plain ``tools/train.py --resume`` works too;
``ssflctl.node.job`` calls :func:`allow_mmengine_checkpoints` itself.

``unsafe_globals(path)`` lists what a checkpoint needs beyond torch's defaults (the test checks
that a real mmengine checkpoint needs nothing beyond :func:`safe_globals` and the restricted
``getattr``).
"""
from __future__ import annotations

from typing import List

_applied: List[object] = []


def safe_globals() -> List[object]:
    """The objects an mmengine 0.10.x checkpoint pickles besides tensors and builtin containers."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    try:  # numpy >= 2 pickles numpy._core.multiarray.*, numpy 1.x numpy.core.multiarray.*
        from numpy._core import multiarray as _ma
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
    out: List[object] = [
        HistoryBuffer,          # message_hub.log_scalars values
        _ma._reconstruct,       # numpy arrays inside HistoryBuffer
        np.ndarray,
        np.dtype,
        _ma.scalar,             # numpy scalars (e.g. in runtime_info / log values)
    ]
    # dtype classes (numpy >= 1.25 pickles some dtypes via their class)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                     "UInt8DType", "BoolDType"):
            if hasattr(dtypes, name):
                out.append(getattr(dtypes, name))
    return out


def _history_buffer_getattr(obj, name: str):
    """``getattr`` restricted to what mmengine checkpoints pickle with it.

    torch.save uses pickle protocol 2, which stores a function with a dotted qualified name
    (``HistoryBuffer.min``, kept in every HistoryBuffer's ``_statistics_methods``) as
    ``getattr(HistoryBuffer, 'min')``. Allowlisting ``builtins.getattr`` itself would let a
    checkpoint reach any attribute of any allowlisted object, so this stand-in, registered under
    the name ``builtins.getattr``, only returns public functions of HistoryBuffer classes.
    """
    import inspect
    import pickle

    from mmengine.logging.history_buffer import HistoryBuffer

    if isinstance(obj, type) and issubclass(obj, HistoryBuffer) and isinstance(name, str) \
            and not name.startswith("_"):
        attr = inspect.getattr_static(obj, name, None)
        if inspect.isfunction(attr) or isinstance(attr, (staticmethod, classmethod)):
            return getattr(obj, name)
    raise pickle.UnpicklingError(
        f"ssflctl.extensions.compat: refusing getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) "
        "while loading a checkpoint with weights_only=True (only HistoryBuffer statistics "
        "methods are allowed)")


def allow_mmengine_checkpoints() -> List[object]:
    """Allowlist mmengine checkpoint types for ``torch.load(weights_only=True)``. Idempotent.

    Returns the allowlisted objects ([] on torch without ``add_safe_globals``, i.e. < 2.4, whose
    ``torch.load`` default is ``weights_only=False`` anyway).
    """
    if _applied:
        return list(_applied)
    import torch

    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # pragma: no cover - old torch
        return []
    objs = safe_globals()
    add(objs + [(_history_buffer_getattr, "builtins.getattr")])
    _applied.extend(objs)
    return list(objs)


def unsafe_globals(path) -> List[str]:
    """Globals in checkpoint ``path`` that ``weights_only`` loading does not allow right now."""
    import torch

    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed = set()
    for o in torch.serialization.get_safe_globals():
        if isinstance(o, tuple):
            allowed.add(o[1])
        elif hasattr(o, "__qualname__"):
            allowed.add(f"{o.__module__}.{o.__qualname__}")
    return [n for n in names if n not in allowed]


try:  # applied on import (custom_imports); harmless without the training stack
    allow_mmengine_checkpoints()
except ImportError:  # pragma: no cover
    pass
