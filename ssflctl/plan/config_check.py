"""A rendered config must mean exactly the data it was rendered from — checked without running it.

mmengine 0.10.7's ``Config.dump`` writes a ``.py`` config by formatting values and keys as source
text (``mmengine/config/config.py``, ``Config._format_basic_types``/``_format_dict``): a dict key
that is not an identifier is written as ``'{k}'`` without escaping, so a key such as
``x': __import__('os').system('touch pwned'), 'y`` becomes code that the job's ``Config.fromfile``
executes on the node. :func:`check_rendered` parses the written file with :mod:`ast` (nothing is
executed), evaluates it with a whitelist of literal forms (constants, lists, tuples, dicts,
``dict(key=...)`` calls, unary minus) and compares the result with the data that was meant;
anything else — a call, a name, an attribute, a lambda — or any difference is refused before the
file is used.
"""
from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any, Dict

from ssflctl.errors import UserError

_NAMES = {"True": True, "False": False, "None": None, "inf": math.inf, "nan": math.nan}


class _Refused(Exception):
    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")


def _eval(node: ast.AST, where: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [_eval(e, f"{where}[{i}]") for i, e in enumerate(node.elts)]
    if isinstance(node, ast.Tuple):
        return tuple(_eval(e, f"{where}[{i}]") for i, e in enumerate(node.elts))
    if isinstance(node, ast.Set):
        return sorted((_eval(e, where) for e in node.elts), key=repr)
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                raise _Refused(where, "a ** expansion")
            key = _eval(k, where)
            out[key] = _eval(v, f"{where}.{key}")
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        out = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise _Refused(where, "a ** expansion")
            out[kw.arg] = _eval(kw.value, f"{where}.{kw.arg}")
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand, where)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "float" \
            and len(node.args) == 1 and isinstance(node.args[0], ast.Constant) \
            and str(node.args[0].value).lower() in ("inf", "-inf", "nan"):
        return float(node.args[0].value)
    raise _Refused(where, f"{type(node).__name__} at line {getattr(node, 'lineno', '?')} is code, not data")


def parse_config_text(text: str, path: str = "config.py") -> Dict[str, Any]:
    """The top-level assignments of a dumped config as plain data, without executing anything.

    Raises UserError naming the file and the first thing that is not data."""
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as exc:
        raise UserError(f"{path}:{exc.lineno}: the rendered config does not parse ({exc.msg}); "
                        "a key or value in the experiment file cannot be written as an mmengine config") from None
    out: Dict[str, Any] = {}
    try:
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                name = stmt.targets[0].id
                out[name] = _eval(stmt.value, name)
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # a docstring
            else:
                raise _Refused("top level", f"{type(stmt).__name__} at line {stmt.lineno} is not an assignment")
    except _Refused as exc:
        raise UserError(f"{path}: refused: {exc} — a key or value of the experiment file would run as code on "
                        "the node; use plain identifiers as mapping keys") from None
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                return f"{where}.{k}".lstrip(".") + " appears in the written file only"
            if k not in b:
                return f"{where}.{k}".lstrip(".") + " is missing from the written file"
            d = _first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return ""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return ""
    return "" if a == b else f"{where.lstrip('.') or 'the config'} differs ({a!r} meant, {b!r} written)"


def check_rendered(path: Path, meant: Dict[str, Any]) -> None:
    """Refuse (UserError) unless ``path`` parses, as data only, to exactly ``meant``
    (``Config.to_dict()`` of the config that was dumped; tuples and lists compare equal)."""
    check_text(Path(path).read_text(encoding="utf-8"), meant, path)


def check_text(text: str, meant: Dict[str, Any], path: Any = "config.py") -> None:
    """:func:`check_rendered` for text about to be written to ``path``."""
    got = parse_config_text(text, str(path))
    if got == meant:  # the usual case, compared in C; otherwise normalise and name the difference
        return
    diff = _first_difference(_norm(meant), _norm(got))
    if diff:
        raise UserError(f"{path}: refused: the written config does not say what was meant: {diff}; "
                        "a key or value of the experiment file cannot be written safely — use plain identifiers "
                        "as mapping keys")
