"""The retry policy: one pydantic model shared by the experiment file and the node.

It is part of ``run.json``'s contract (``run.json["retry"]``, written by ``ssflctl.plan.spec`` on the
login node, read by ``ssflctl.node.retry`` on the compute node), so it lives beside the run
directory's other records. Light: pydantic only (v2, ``pydantic>=2`` in pyproject.toml), no torch.

Keys, with defaults::

    on_nan: lower_lr        # lower_lr | retry (same lr) | fail
    factor: 0.1             # new lr = lr × factor   (0 < factor < 1)
    max_attempts: 3         # attempts in all, the first included
    from: scratch           # scratch | checkpoint (the last clean one: saved before the NaN)
    on_preempt: resume      # resume | restart | fail     (also Slurm time limit, requeue)
    on_node_fail: resubmit  # resubmit | fail
    on_error: fail          # fail | retry (same lr, a new attempt)

Validation errors are ``pydantic_core.PydanticCustomError`` whose context carries the finished
``message`` (and, for an unknown key, the ``key``), so a caller maps them to its own location
(``file:line: retry.factor: ...`` in the experiment file) without parsing text.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Dict, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ssflctl.errors import UserError

CHOICES: Dict[str, tuple] = {
    "on_nan": ("lower_lr", "retry", "fail"),
    "from": ("scratch", "checkpoint"),
    "on_preempt": ("resume", "restart", "fail"),
    "on_node_fail": ("resubmit", "fail"),
    "on_error": ("fail", "retry"),
}
DEFAULTS: Dict[str, Any] = {
    "on_nan": "lower_lr", "factor": 0.1, "max_attempts": 3, "from": "scratch",
    "on_preempt": "resume", "on_node_fail": "resubmit", "on_error": "fail",
}


def error(message: str, key: Optional[str] = None, kind: str = "ssflctl") -> PydanticCustomError:
    """A validation error carrying its finished message (``{`` and ``}`` in it stay literal)."""
    ctx: Dict[str, Any] = {"message": message}
    if key is not None:
        ctx["key"] = key
    return PydanticCustomError(kind, "{message}", ctx)


def unknown_key_message(key: str, allowed) -> str:
    hint = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    return f"unknown key; did you mean '{hint[0]}'?" if hint else f"unknown key; expected one of: {', '.join(allowed)}"


class RetryPolicy(BaseModel):
    """What to do after an attempt ended. Frozen; ``from_dict``/``to_dict`` speak run.json's keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    on_nan: str = "lower_lr"
    factor: float = 0.1
    max_attempts: int = 3
    from_: str = Field("scratch", alias="from")
    on_preempt: str = "resume"
    on_node_fail: str = "resubmit"
    on_error: str = "fail"

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, d: Any) -> Any:
        if d is None:
            return {}
        if not isinstance(d, dict):
            raise error(f"must be a mapping of retry settings, got {type(d).__name__}; keys: {', '.join(DEFAULTS)}",
                        kind="not_mapping")
        for k in d:
            if k not in DEFAULTS:
                raise error(unknown_key_message(k, DEFAULTS), key=str(k), kind="unknown_key")
        return d

    @field_validator("on_nan", "from_", "on_preempt", "on_node_fail", "on_error", mode="plain")
    @classmethod
    def _choice(cls, v: Any, info) -> str:
        key = "from" if info.field_name == "from_" else info.field_name
        if not isinstance(v, str) or v not in CHOICES[key]:
            raise error(f"{v!r} is not allowed; use one of {', '.join(CHOICES[key])}")
        return v

    @field_validator("factor", mode="plain")
    @classmethod
    def _factor(cls, f: Any) -> float:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 < f < 1:
            raise error(f"{f!r} must be a number between 0 and 1 (the lr is multiplied by it after a NaN), e.g. 0.1")
        return float(f)

    @field_validator("max_attempts", mode="plain")
    @classmethod
    def _attempts(cls, m: Any) -> int:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise error(f"{m!r} must be a whole number >= 1 (attempts in all, the first included), e.g. 3")
        return m

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]], where: str = "retry") -> "RetryPolicy":
        """Validate a policy dict (None or {} → defaults). Bad values → UserError naming the key."""
        try:
            return cls.model_validate(d if d is not None else {})
        except ValidationError as exc:
            raise UserError(policy_error_line(exc, where)) from None

    def to_dict(self) -> Dict[str, Any]:
        return {"on_nan": self.on_nan, "factor": self.factor, "max_attempts": self.max_attempts,
                "from": self.from_, "on_preempt": self.on_preempt,
                "on_node_fail": self.on_node_fail, "on_error": self.on_error}


def policy_error_line(exc: ValidationError, where: str) -> str:
    """``<where>.<key>: <message>`` for the first error of a RetryPolicy validation."""
    err = exc.errors()[0]
    ctx = err.get("ctx") or {}
    if err["type"] == "unknown_key":
        return f"{where}.{ctx['key']}: unknown retry setting; use one of {', '.join(DEFAULTS)}"
    if err["type"] == "not_mapping":
        return f"{where}: {ctx['message']}"
    loc = ".".join(str(p) for p in err["loc"])
    return f"{where}.{loc}: {ctx.get('message', err['msg'])}"
