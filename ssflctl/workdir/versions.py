"""Which runs the experiment file meant when it was last submitted (issue 15.6).

``<ws>/experiments/<name>.json`` — written by every ``submit`` (not the dry run) after the runs
are registered: the file, its sha256, when, and the run ids of its expansion. A run id is a hash
of the run's settings, so a run of the experiment that is not in this list was made by an
earlier version of the file (e.g. ``max_epochs`` changed from 1 to 2): the report leaves such
runs out unless asked (``--all-versions``) instead of averaging them with the current ones.
Workspaces from before this file existed have no record: every run counts as current.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from ssflctl import atomic

DIRNAME = "experiments"


def version_path(ws, experiment: str) -> Path:
    return Path(ws) / DIRNAME / f"{experiment}.json"


def record(ws, experiment: str, spec_path, run_ids: Iterable[str]) -> Path:
    """Note the runs of the experiment file as submitted now (atomic; the last submit wins)."""
    spec_path = Path(spec_path)
    try:
        sha = hashlib.sha256(spec_path.read_bytes()).hexdigest()
    except OSError:
        sha = None
    body = {"experiment": experiment, "spec": str(spec_path.resolve()), "spec_sha256": sha,
            "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_ids": sorted(set(run_ids))}
    path = version_path(ws, experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_json(path, body)


def current(ws, experiment: str) -> Optional[Dict[str, Any]]:
    """The last record of the experiment, or None (never recorded, or unreadable)."""
    try:
        body = atomic.read_json(version_path(ws, experiment), default=None)
    except (ValueError, OSError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("run_ids"), list):
        return None
    return body
