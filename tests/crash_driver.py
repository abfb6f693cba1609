"""The real `ssflctl` command line with the LIGHT stand-in job (tests/submit_light_job.py), for the
fault tests that kill it (tests/test_crash_consistency.py): ``python crash_driver.py submit X -w WS``.

``CRASH_HOOK`` puts the submit at a known point:

* ``pause_before_send:S`` — print ``sending`` and sleep S seconds once the attempts are rendered,
  before the submit's last check of its claims and the backend's submit;
* ``pause_after_send:S``  — print ``sent`` and sleep S seconds after it, before the ids are recorded;
* ``kill_at_pickle``      — SIGKILL itself when submitit, after sbatch returned, renames the first
  task's pickle to ``<job id>_submitted.pkl`` (the job then cannot run);
* ``kill_at_release``     — SIGKILL itself when the test-cell array (test_matrix), sent held, is about
  to be released (its tasks' dependencies set: the array would never start).
"""
import functools
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import submit_light_job as light  # noqa: E402
from ssflctl.control import submit as submit_mod  # noqa: E402

submit_mod.submit = functools.partial(submit_mod.submit, fns=light.FNS, render=light.light_render)

hook = os.environ.get("CRASH_HOOK", "")
if hook:
    from ssflctl import backends

    backend = backends.get("slurm")
    real = backend.submit
    what, _, arg = hook.partition(":")
    if what == "pause_before_send":  # rendered, before the last check of its claims
        check = submit_mod._drop_cancelled

        def pause_then_check(*a, **k):
            print("sending", flush=True)
            time.sleep(float(arg))
            return check(*a, **k)
        submit_mod._drop_cancelled = pause_then_check
    elif what == "pause_after_send":
        def send(*a, **k):
            out = real(*a, **k)
            print("sent", flush=True)
            time.sleep(float(arg))
            return out
        backend.submit = send
    elif what == "kill_at_pickle":
        import submitit.core.utils as su

        move = su.JobPaths.move_temporary_file

        def move_or_die(self, tmp_path, name, keep_as_symlink=False):
            if name == "submitted_pickle":
                os.kill(os.getpid(), signal.SIGKILL)
            return move(self, tmp_path, name, keep_as_symlink)
        su.JobPaths.move_temporary_file = move_or_die

    elif what == "kill_at_release":
        from ssflctl.backends import slurm

        scontrol = slurm._scontrol

        def release_or_die(*args):
            if args and args[0] == "release":
                os.kill(os.getpid(), signal.SIGKILL)
            return scontrol(*args)
        slurm._scontrol = release_or_die

from ssflctl.cli import main  # noqa: E402

sys.argv[0] = "ssflctl"
main()
