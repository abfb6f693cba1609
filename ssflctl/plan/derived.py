"""Settings derived from a param's value, declared once in the template (``ssflctl_derived``).

Some axes change more than one config key: a ResNet depth also fixes the FPN's input channels and
the pretrained checkpoint; an optimizer name brings its own defaults (momentum, weight decay, lr).
A template declares them once, next to ``ssflctl_params``::

    ssflctl_params = dict(..., depth=50, optimizer='sgd')
    ssflctl_derived = dict(
        depth={
            18: {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512],
                 'model.backbone.init_cfg.checkpoint': 'torchvision://resnet18'},
            50: {...},
        },
        optimizer={
            'sgd': {'optim_wrapper.optimizer': dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4)},
            'adam': {'optim_wrapper.optimizer': dict(type='Adam', lr=1e-4, weight_decay=0.0)},
        },
    )

The renderer applies the entry of the param's value (the run's value, else the template default):
each dotted key is *replaced* (a dict value replaces the whole sub-dict, so Adam does not inherit
SGD's momentum); the key's parent must exist. Derived settings override the template's own
defaults, but a param the run sets explicitly (``lr`` from the matrix, say) still wins: the
renderer re-applies explicit params after this step. A value the template does not list is an
error naming the values it does. The dict must be literal (it is read with ``ast`` like
``ssflctl_params``), so listing an experiment never executes the template.
"""
from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any, Dict, Optional

from ssflctl.errors import UserError

NAME = "ssflctl_derived"


def read(path) -> Dict[Any, Dict[Any, Dict[str, Any]]]:
    """The template's ``ssflctl_derived`` (param -> value -> {dotted key: value}); {} if absent."""
    path = Path(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == NAME for t in node.targets):
            try:
                out = _literal(node.value)
            except ValueError:
                raise UserError(f"{path}:{node.lineno}: {NAME} must be a dict of literal values "
                                "(param -> {value -> {dotted.key: value}})") from None
            if not isinstance(out, dict) or not all(isinstance(v, dict) for v in out.values()):
                raise UserError(f"{path}:{node.lineno}: {NAME} must map each param to a dict of its values")
            for param, table in out.items():
                for value, settings in table.items():
                    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
                        raise UserError(f"{path}:{node.lineno}: {NAME}[{param!r}][{value!r}] must be a dict "
                                        "of dotted config keys")
            return out
    return {}


def _literal(node):
    """ast.literal_eval that also accepts dict(...) calls (the mmengine config style)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    return ast.literal_eval(node)


def lookup(table: Dict[Any, Dict[str, Any]], value: Any) -> Optional[Dict[str, Any]]:
    """The entry for ``value`` (exact, then by string: YAML 18 or '18', 'Adam' or 'adam')."""
    if value in table and not isinstance(value, bool):
        return table[value]
    for k, v in table.items():
        if str(k).lower() == str(value).lower():
            return v
    return None


def _set(cfg, dotted: str, value: Any, where: str) -> None:
    cur = getattr(cfg, "_cfg_dict", cfg)
    parts = dotted.split(".")
    for part in parts[:-1]:
        if isinstance(cur, (list, tuple)) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        elif isinstance(cur, dict) and isinstance(cur.get(part), (dict, list)):
            cur = cur[part]
        else:
            raise UserError(f"{where}: {dotted!r}: {part!r} does not exist in the config (or is not a dict)")
    leaf = parts[-1]
    if isinstance(cur, list):
        if not leaf.lstrip("-").isdigit() or not -len(cur) <= int(leaf) < len(cur):
            raise UserError(f"{where}: {dotted!r}: index {leaf!r} is out of range")
        cur[int(leaf)] = copy.deepcopy(value)
    else:
        cur[leaf] = copy.deepcopy(value)


def apply(cfg, template_path, resolved: Dict[str, Any], where: str = "template",
          table: Optional[Dict[Any, Dict[Any, Dict[str, Any]]]] = None) -> bool:
    """Apply the derived settings of every declared param; True if any were applied.
    ``table``: the template's ``ssflctl_derived`` when already read (:func:`read`)."""
    table = read(template_path) if table is None else table
    applied = False
    for param, values in table.items():
        if param not in resolved or resolved[param] is None:
            continue
        settings = lookup(values, resolved[param])
        if settings is None:
            raise UserError(f"{where}: {param}={resolved[param]!r}: the template supports "
                            f"{', '.join(map(str, values))} (its {NAME}.{param})")
        for key, val in settings.items():
            _set(cfg, key, _tuples_to_lists(val), f"{where}: {NAME}.{param}[{resolved[param]!r}]")
        applied = True
    return applied


def _tuples_to_lists(v):
    if isinstance(v, dict):
        return {k: _tuples_to_lists(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [_tuples_to_lists(x) for x in v]
    return v
