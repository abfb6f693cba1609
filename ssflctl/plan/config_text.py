"""Write a config's data as an mmengine ``.py`` config, without yapf.

``Config.dump`` formats the text and then runs yapf over it (``Config.pretty_text``), ~0.6 s per
config here: more than everything else rendering does. :func:`dump_text` writes the same data in
the same style (``key = dict(a=1, ...)``, lists, tuples) directly: strings and non-identifier keys
through :func:`repr` (escaped, so a key can never become code), ``inf``/``nan`` as
``float('inf')``. A value of any other type (mmengine's lazy objects, a class) is not data:
:class:`Unsupported`, and the caller falls back to ``Config.dump``. Faithfulness is checked on
every write by :func:`ssflctl.plan.config_check.check_text` (the text parses back, as data only,
to exactly ``cfg.to_dict()``) and in ``tests/test_render_cache.py`` by ``Config.fromfile``
equality, tuples included.
"""
from __future__ import annotations

import keyword
import math
from typing import Any, List

_IND = "    "


class Unsupported(TypeError):
    pass


def _ident(k: Any) -> bool:
    return isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k)


def _scalar(v: Any) -> str:
    if v is None or isinstance(v, (bool, int, str)):
        return repr(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "float('nan')"
        if math.isinf(v):
            return "float('inf')" if v > 0 else "float('-inf')"
        return repr(v)
    raise Unsupported(f"{type(v).__name__} is not config data")


def _fmt(v: Any, depth: int, out: List[str]) -> None:
    if isinstance(v, dict):
        if not v:
            out.append("dict()")
            return
        pad = _IND * (depth + 1)
        ident = all(_ident(k) for k in v)
        if ident:
            out.append("dict(\n")
            for k, x in v.items():
                out.append(f"{pad}{k}=")
                _fmt(x, depth + 1, out)
                out.append(",\n")
        else:
            out.append("{\n")
            for k, x in v.items():
                out.append(f"{pad}{_scalar(k)}: ")
                _fmt(x, depth + 1, out)
                out.append(",\n")
        out.append(_IND * depth + (")" if ident else "}"))
        return
    if isinstance(v, (list, tuple)):
        left, right = ("[", "]") if isinstance(v, list) else ("(", ")")
        if not v:
            out.append(left + right)
            return
        if not any(isinstance(x, (dict, list, tuple)) for x in v):
            body = ", ".join(_scalar(x) for x in v)
            if isinstance(v, tuple) and len(v) == 1:
                body += ","
            out.append(f"{left}{body}{right}")
            return
        pad = _IND * (depth + 1)
        out.append(left + "\n")
        for x in v:
            out.append(pad)
            _fmt(x, depth + 1, out)
            out.append(",\n")
        out.append(_IND * depth + right)
        return
    out.append(_scalar(v))


def dump_text(data: dict) -> str:
    """``cfg.to_dict()`` (or any dict of config data) as the text of a ``.py`` config."""
    out: List[str] = []
    for k, v in data.items():
        if not _ident(k):
            raise Unsupported(f"top-level key {k!r} is not a Python name")
        out.append(f"{k} = ")
        _fmt(v, 0, out)
        out.append("\n")
    return "".join(out)
