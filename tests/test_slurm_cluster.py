"""Real jobs on the local Slurm cluster (scripts/slurm-cluster.sh up) through submitit.

The functions sent to the cluster are defined inside the tests: cloudpickle ships local
functions by value, while a module-level function of this test module would be pickled by
reference and could not be imported on the node.
"""
from __future__ import annotations

import subprocess
import time

import pytest

pytestmark = pytest.mark.slurm


def sacct_field(job_id: str, field: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", field],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    return out.splitlines()[0] if out else ""


def wait_sacct_state(job_id: str, accept: tuple[str, ...], timeout: float = 60) -> str:
    """Poll sacct until the job's state starts with one of ``accept``; return that state."""
    end = time.monotonic() + timeout
    state = ""
    while time.monotonic() < end:
        state = sacct_field(job_id, "State")
        if state.startswith(accept):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: state {state!r} after {timeout}s, expected one of {accept}")


def make_executor(folder, cluster, **params):
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(
        slurm_partition=cluster["partition"], slurm_qos=cluster["qos"],
        timeout_min=5, cpus_per_task=1, mem_gb=1, slurm_job_name="ssflctl-test",
    )
    ex.update_parameters(**params)
    return ex


@pytest.mark.timeout(120)
def test_gpu_job_returns_result_and_sacct_completed(slurm_cluster, tmp_path):
    def job(n):
        import os
        return {
            "job_id": os.environ["SLURM_JOB_ID"],
            "partition": os.environ.get("SLURM_JOB_PARTITION"),
            "qos": os.environ.get("SLURM_JOB_QOS"),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("SLURM_JOB_GPUS"),
            "value": sum(i * i for i in range(n)),
        }

    ex = make_executor(tmp_path / "submitit", slurm_cluster, slurm_gres="gpu:1")
    j = ex.submit(job, 1000)
    out = j.result()
    assert out["job_id"] == j.job_id
    assert out["partition"] == "gpulab02"
    assert out["qos"] == "gpulab02"
    assert out["value"] == sum(i * i for i in range(1000))
    # one fake GPU was allocated: Slurm's gres/gpu plugin exports its index
    assert out["gpus"] is not None and len(out["gpus"].split(",")) == 1
    assert wait_sacct_state(j.job_id, ("COMPLETED", "FAILED", "CANCELLED")) == "COMPLETED"
    assert "gres/gpu=1" in sacct_field(j.job_id, "AllocTRES")
    # submitit's own view, read from sacct (job.state alone may answer from a stale cache)
    assert j.get_info(mode="force").get("State") == "COMPLETED"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("params, message", [
    ({"slurm_gres": "gpu:99"}, "Requested node configuration is not available"),
    ({"cpus_per_task": 4096}, "More processors requested than permitted"),
])
def test_impossible_request_is_rejected_at_submit(slurm_cluster, tmp_path, params, message):
    from submitit.core.utils import FailedJobError

    ex = make_executor(tmp_path / "submitit", slurm_cluster, **params)
    with pytest.raises(FailedJobError, match=message):
        ex.submit(abs, -1)


@pytest.mark.timeout(120)
def test_afterok_on_failed_job_is_cancelled_not_pending(slurm_cluster, tmp_path):
    from submitit.core.utils import FailedJobError

    def fails():
        raise ValueError("parent fails on purpose")

    ex = make_executor(tmp_path / "parent", slurm_cluster)
    parent = ex.submit(fails)
    child_ex = make_executor(tmp_path / "child", slurm_cluster,
                             slurm_additional_parameters={"dependency": f"afterok:{parent.job_id}"})
    child = child_ex.submit(abs, -1)
    assert wait_sacct_state(parent.job_id, ("COMPLETED", "FAILED", "CANCELLED")) == "FAILED"
    with pytest.raises(FailedJobError, match="parent fails on purpose"):
        parent.result()
    # kill_invalid_depend: the child is cancelled instead of pending forever
    assert wait_sacct_state(child.job_id, ("CANCELLED", "COMPLETED", "FAILED")).startswith("CANCELLED")
    # submitit sees it finished too (its result() would raise UncompletedJobError, after ~15 s
    # of waiting for an output file that never comes)
    assert child.done(force_check=True)
    assert child.get_info(mode="force").get("State", "").startswith("CANCELLED")
