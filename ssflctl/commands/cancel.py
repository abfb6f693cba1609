"""`ssflctl cancel EXP|RUN`."""
from __future__ import annotations

from typing import List


def main(workspace, target: str) -> List[str]:
    from rich.console import Console

    from ssflctl.commands.status import open_registry
    from ssflctl.control.cancel import Cancelled, cancel
    from ssflctl.errors import UserError

    reg = open_registry(workspace, read=False)
    res = Cancelled()
    refused = None
    try:
        done = cancel(reg, workspace, target, result=res)
    except UserError as exc:
        if not res.refused:  # an unknown target, a refused submit check: nothing was done
            raise
        refused, done = exc, list(res.runs)  # what was cancelled is said first, then the refusal
    finally:
        reg.close()
    out = Console(highlight=False, soft_wrap=True)
    jobs, tests = res.jobs, res.tests
    out.print(f"cancelled {len(done)} run{'s' if len(done) != 1 else ''}" + (": " + ", ".join(done) if done else
                                                                             "" if tests else
                                                                             " (nothing queued or running)")
              + (f" (jobs {' '.join(jobs)})" if jobs else ""), markup=False)
    if tests or res.test_jobs:
        out.print(f"cancelled {len(tests)} test cell{'s' if len(tests) != 1 else ''}"
                  + (": " + ", ".join(tests) if tests else "")
                  + (f" (jobs {' '.join(res.test_jobs)})" if res.test_jobs else ""), markup=False)
    for oid, what in res.in_flight.items():
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"note: {oid} was {what}: recorded cancelled; that submit cancels the jobs it sends for it (or, if it "
            "dies, the next `ssflctl status` does)", markup=False)
    if refused is not None:
        raise refused
    return done
