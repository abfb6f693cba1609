"""What a RUN argument names: one resolver for `ssflctl logs RUN`, `ssflctl show RUN` and friends.

RUN is a run id (``ssfl-cityscapes-s3407-1a2b3c4d``), a run's readable name (``ssfl-cityscapes-s3407``)
or a unique prefix of a run id. The run directories under ``<workspace>/runs`` are the source (each
holds its ``run.json``), so a copied workspace without its registry resolves the same way.
Precedence: an exact id, then names, then id prefixes; more than one match is an error that lists
a few of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Union

from ssflctl.errors import UserError
from ssflctl.workdir.layout import RunDir, run_dirs


def _name(run_dir: Path) -> str:
    try:
        return RunDir(run_dir).run.name
    except (OSError, ValueError):
        return ""


def resolve(ws: Union[str, Path], ref: str, cmd: str) -> Path:
    """The run directory RUN names in workspace ``ws``; a one-line UserError (prefixed ``cmd:``) if none
    or several do."""
    runs = Path(ws) / "runs"
    dirs = [r.path for r in run_dirs(ws)]
    exact = [d for d in dirs if d.name == ref]
    named = [d for d in dirs if _name(d) == ref] if not exact else []
    cands: List[Path] = exact or named or [d for d in dirs if d.name.startswith(ref)]
    if not cands:
        raise UserError(f"{cmd}: no run matching {ref!r} in {runs}; see `ssflctl status` for run ids")
    if len(cands) > 1:
        shown = ", ".join(c.name for c in cands[:3]) + ("..." if len(cands) > 3 else "")
        raise UserError(f"{cmd}: {ref!r} matches {len(cands)} runs ({shown}); give a longer prefix or the run id")
    return cands[0]
