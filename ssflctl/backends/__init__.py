"""Launch backends. `launch.slurm` and `launch.local` are the only modules that import submitit.

`launch(kind, tasks, folder, options)` sends one submission's runs out and returns, per run id,
``{"job_id": ..., "test_job_id": ...}``. Each task is ``{"run_id", "run_dir", "resources", "test"}``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List

from ssflctl.errors import UserError

#: the variables that set a run's BLAS/OpenMP threads to its cpus, on every backend
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

TRAIN_FN = "ssflctl.node.job:train_run"
TEST_FN = "ssflctl.node.job:test_run"
LOCAL_FN = "ssflctl.node.job:train_and_test"


def get_executor(kind: str, folder, **resources: Any):
    """A configured submitit executor for ``kind`` ('slurm' or 'local') writing into ``folder``."""
    if kind == "slurm":
        from ssflctl.backends import slurm

        return slurm.make_executor(Path(folder), resources, {})
    if kind == "local":
        from ssflctl.backends import local

        return local.make_executor(Path(folder), resources)
    raise UserError(f"--executor: expected slurm or local, got {kind!r}")


def launch(kind: str, tasks: List[Dict[str, Any]], folder: Path, options: Dict[str, Any],
           fns: Dict[str, str] | None = None) -> Dict[str, Dict[str, Any]]:
    if kind == "slurm":
        if not shutil.which("sbatch"):
            raise UserError("executor slurm: sbatch is not on PATH; run on the cluster's login node or use "
                            "--executor local")
        from ssflctl.backends import slurm

        return slurm.launch(tasks, folder, options, fns=fns)
    if kind == "local":
        from ssflctl.backends import local

        return local.launch(tasks, folder, options, fns=fns)
    raise UserError(f"--executor: expected slurm or local, got {kind!r}")
