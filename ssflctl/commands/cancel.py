"""`ssflctl cancel EXP|RUN`."""
from __future__ import annotations

from typing import List


def main(workspace, target: str) -> List[str]:
    from rich.console import Console

    from ssflctl.commands.status import open_registry
    from ssflctl.control.cancel import Cancelled, cancel

    reg = open_registry(workspace, read=False)
    res = Cancelled()
    try:
        done = cancel(reg, workspace, target, result=res)
    finally:
        reg.close()
    jobs = res.jobs
    Console(highlight=False, soft_wrap=True).print(
        f"cancelled {len(done)} run{'s' if len(done) != 1 else ''}" + (": " + ", ".join(done) if done else
                                                                       " (nothing queued or running)")
        + (f" (jobs {' '.join(jobs)})" if jobs else ""), markup=False)
    for rid, what in res.in_flight.items():
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"note: {rid} was {what}: recorded cancelled; that submit cancels the jobs it sends for it (or, if it "
            "dies, the next `ssflctl status` does)", markup=False)
    return done
