"""``overrides`` merge into a config the way mmengine's own inheritance does.

The rule is ``Config.merge_from_dict`` (``Config._merge_a_into_b`` with ``allow_list_keys``), the
rule by which a child config merges into its ``_base_``:

* a mapping merges key by key into the mapping at that key (``optim_wrapper: {clip_grad: {max_norm:
  35}}`` adds ``clip_grad`` and keeps ``optimizer``; ``model: {bbox_head: {loss_cls: {gamma: 1.5}}}``
  changes gamma and keeps the loss's ``type``); a key the config does not have is added;
* ``_delete_: true`` in a mapping replaces the mapping at that key instead of merging into it;
* anything else (a number, a string, a list) replaces the value;
* a digit key merges into that element of a list (``param_scheduler: {'1': {milestones: [9]}}``,
  or ``param_scheduler.1.milestones``); negative indices count from the end.

A dotted key means the nested mapping it spells, at any depth, so ``model.bbox_head.loss_cls.gamma:
1.5``, ``model: {bbox_head.loss_cls: {gamma: 1.5}}`` and the fully nested form are the same override;
several overrides of one subtree merge in the order written. Two deliberate differences from
mmengine, both where mmengine raises: a mapping merges into ``None`` by taking its place (mmengine
raises TypeError; ``init_cfg: None`` is the common case), and an index out of range or a mapping
over a number is a :class:`OverrideError` naming the key, not a KeyError/TypeError.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, List, Tuple

from ssflctl.errors import UserError

DELETE = "_delete_"
_MISSING = object()


class OverrideError(UserError):
    """An override that cannot be merged; ``key`` is its dotted path (as the option tree spells it)."""

    def __init__(self, key: str, what: str):
        super().__init__(f"overrides.{key}: {what}")
        self.key = key
        self.what = what


def option_tree(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The overrides as one nested mapping: dotted keys split at every depth, repeated subtrees merged."""
    tree: Dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        _put(tree, _split(key), _normalize(value))
    return tree


def _split(key: Any) -> List[Any]:
    return str(key).split(".") if isinstance(key, str) else [key]


def _normalize(value: Any) -> Any:
    if isinstance(value, dict):
        out: Dict[Any, Any] = {}
        for k, v in value.items():
            if k == DELETE:
                out[DELETE] = v
            else:
                _put(out, _split(k), _normalize(v))
        return out
    return copy.deepcopy(value)


def _put(tree: Dict[Any, Any], parts: List[Any], value: Any) -> None:
    for p in parts[:-1]:
        nxt = tree.get(p)
        if not isinstance(nxt, dict):
            nxt = tree[p] = {}
        tree = nxt
    leaf = parts[-1]
    if isinstance(value, dict) and isinstance(tree.get(leaf), dict) and not value.get(DELETE):
        for k, v in value.items():
            _put(tree[leaf], [k], v)
    else:
        tree[leaf] = value


def leaves(overrides: Dict[str, Any]) -> Iterator[Tuple[str, Any]]:
    """(dotted path, value) of every leaf of the option tree (``_delete_`` marks included)."""
    stack: List[Tuple[str, Any]] = [("", option_tree(overrides))]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, dict) and node and prefix.count(".") < 64:
            stack.extend((f"{prefix}.{k}".lstrip("."), v) for k, v in node.items())
        else:
            yield prefix, node


def merge(cfg, overrides: Dict[str, Any]) -> None:
    """Merge ``overrides`` into ``cfg`` (an ``mmengine.Config`` or a dict) in place."""
    root = getattr(cfg, "_cfg_dict", cfg)
    for k, v in option_tree(overrides).items():
        if k == DELETE:
            raise OverrideError(DELETE, "_delete_ replaces a mapping; put it inside the mapping it replaces")
        root[k] = _value(v, root.get(k, _MISSING) if isinstance(root, dict) else _MISSING, str(k))


def _configdict(v: Any) -> Any:
    from mmengine.config import ConfigDict

    return ConfigDict(_strip_delete(v))


def _strip_delete(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip_delete(x) for k, x in v.items() if k != DELETE}
    if isinstance(v, list):
        return [_strip_delete(x) for x in v]
    return v


def _value(v: Any, cur: Any, key: str) -> Any:
    if not isinstance(v, dict):
        return v
    v = dict(v)
    if v.pop(DELETE, False) or cur is _MISSING or cur is None:
        return _configdict(v)
    if isinstance(cur, (list, tuple)):
        out = list(cur)
        for k, x in v.items():
            s = str(k)
            if not s.lstrip("-").isdigit():
                raise OverrideError(f"{key}.{s}", f"{key} is a list of {len(out)} in the config; "
                                    "address an element by its index (0, 1, ... or -1)")
            i = int(s)
            if not -len(out) <= i < len(out):
                raise OverrideError(f"{key}.{s}", f"index {i} is out of range: {key} has {len(out)} elements")
            out[i] = _value(x, out[i], f"{key}.{s}")
        return tuple(out) if isinstance(cur, tuple) else out
    if isinstance(cur, dict):
        for k, x in v.items():
            cur[k] = _value(x, cur.get(k, _MISSING), f"{key}.{k}")
        return cur
    raise OverrideError(key, f"the config has {cur!r} here, not a mapping, so a mapping cannot merge into it; "
                        f"write `{DELETE}: true` in the mapping to replace the value")
