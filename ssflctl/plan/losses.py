"""Loss names and the keyword arguments each loss class accepts, known without importing torch.

``LOSSES`` maps the names an experiment file may use (``loss: focal``) to their ``loss_cls`` config
(RetinaNet's defaults: sigmoid, gamma 2, alpha 0.25). ``LOSS_KWARGS`` is an allow-list of the
``__init__`` keyword arguments of the loss classes ssflctl knows, so a misspelt keyword (``gama``)
is refused at plan time instead of by the loss's constructor on the node. Sources:

* ``FocalLoss``: mmdet 3.x ``mmdet/models/losses/focal_loss.py``
  ``FocalLoss.__init__(use_sigmoid=True, gamma=2.0, alpha=0.25, reduction='mean', loss_weight=1.0,
  activated=False)``.
* ``FocalFamilyLoss``, ``ShiftStepFocalLoss``, ``GeneralizedFocalLossStar``:
  ``ssflctl/extensions/losses.py``.

``tests/test_plan_schema.py::test_loss_kwargs_match_the_classes`` compares this table with the real
signatures where the training stack is installed; keep them in step when a loss changes.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, FrozenSet, Optional

LOSSES: Dict[str, Dict[str, Any]] = {
    "focal": dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
    "ssfl": dict(type="ShiftStepFocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, shift=0.1, loss_weight=1.0),
    "gfl": dict(type="ShiftStepFocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, shift=0.0, loss_weight=1.0),
}

_FOCAL = frozenset({"use_sigmoid", "gamma", "alpha", "reduction", "loss_weight", "activated"})
_SSFL = _FOCAL | {"shift", "max_weight"}
LOSS_KWARGS: Dict[str, FrozenSet[str]] = {
    "FocalLoss": _FOCAL,
    "FocalFamilyLoss": _SSFL | {"modulation"},
    "ShiftStepFocalLoss": _SSFL,
    "GeneralizedFocalLossStar": _SSFL,
}
#: any keyword some known loss takes (for ``...loss_cls.<kw>`` overrides whose class is not known)
ANY_LOSS_KWARG: FrozenSet[str] = frozenset().union(*LOSS_KWARGS.values())


def _type_name(t: str) -> str:
    return t.split(".")[-1]  # "mmdet.FocalLoss" -> "FocalLoss" (mmengine's scope prefix)


def loss_problem(value: Any) -> Optional[str]:
    """None when ``value`` is a usable ``loss`` (a known name or a loss_cls dict), else what is wrong."""
    if isinstance(value, str):
        if value.strip().lower() in LOSSES:
            return None
        hint = difflib.get_close_matches(value.strip().lower(), list(LOSSES), n=1, cutoff=0.5)
        sugg = f"did you mean '{hint[0]}'?" if hint else f"use one of {', '.join(LOSSES)} or a loss_cls mapping with type"
        return f"unknown loss {value!r}; {sugg}"
    if isinstance(value, dict):
        t = value.get("type")
        if not isinstance(t, str) or not t.strip():
            return "a loss mapping needs a 'type' (e.g. FocalLoss, ShiftStepFocalLoss)"
        kwargs = LOSS_KWARGS.get(_type_name(t))
        if kwargs is None:
            hint = difflib.get_close_matches(_type_name(t), list(LOSS_KWARGS), n=1, cutoff=0.8)
            return f"unknown loss type {t!r}; did you mean '{hint[0]}'?" if hint else None  # another mmdet loss
        for k in value:
            if k != "type" and k not in kwargs:
                return kwarg_problem(str(k), kwargs, _type_name(t))
        return None
    return f"expected a loss name ({', '.join(LOSSES)}) or a loss_cls mapping with type"


def kwarg_problem(k: str, kwargs=ANY_LOSS_KWARG, cls: str = "the loss") -> str:
    hint = difflib.get_close_matches(k, sorted(kwargs), n=1, cutoff=0.6)
    sugg = f"did you mean '{hint[0]}'?" if hint else f"it takes: {', '.join(sorted(kwargs))}"
    return f"{k!r} is not an argument of {cls}; {sugg}"
