"""`ssflctl cancel EXP|RUN`."""
from __future__ import annotations

from typing import List


def main(workspace, target: str) -> List[str]:
    from rich.console import Console

    from ssflctl.commands.status import open_registry
    from ssflctl.control.cancel import cancel

    reg = open_registry(workspace, read=False)
    jobs: List[str] = []
    try:
        done = cancel(reg, workspace, target, jobs_out=jobs)
    finally:
        reg.close()
    Console(highlight=False, soft_wrap=True).print(
        f"cancelled {len(done)} run{'s' if len(done) != 1 else ''}" + (": " + ", ".join(done) if done else
                                                                       " (nothing queued or running)")
        + (f" (jobs {' '.join(jobs)})" if jobs else ""), markup=False)
    return done
