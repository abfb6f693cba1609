"""ssflctl.backends.slurm without a cluster: the sbatch parameters a run's resources and the
experiment's executor.slurm options become, and how an interruption is told apart."""
import pickle
import subprocess

import pytest

from ssflctl.backends import slurm

pytestmark = pytest.mark.unit


def test_threads_follow_the_allocation_and_user_setup_comes_after():
    p = slurm._params({"cpus": 6, "time_min": 600}, {"setup": ["module load cuda"]}, "train-x")
    assert p["cpus_per_task"] == 6
    assert p["setup"] == ["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-6}",
                          "export MKL_NUM_THREADS=${SLURM_CPUS_PER_TASK:-6}", "module load cuda"]
    # the lines do what they say in bash, whatever the submitting shell exported
    out = subprocess.run(["bash", "-c", "; ".join(p["setup"][:2]) + "; echo $OMP_NUM_THREADS $MKL_NUM_THREADS"],
                         env={"SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "64", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["3", "3"]


def test_signal_delay_and_max_num_timeout(tmp_path):
    assert slurm._params({"time_min": 600}, {}, "n")["signal_delay_s"] == 60
    assert slurm._params({"time_min": 2}, {}, "n")["signal_delay_s"] == 10
    assert slurm._params({"time_min": 600}, {"signal_delay_s": 300}, "n")["signal_delay_s"] == 300
    ex = slurm.make_executor(tmp_path, {"time_min": 1},
                             {"max_num_timeout": 12})
    assert ex.max_num_timeout == 12
    assert slurm.make_executor(tmp_path, {}, {}).max_num_timeout == 3


def test_time_limit_or_preemption_by_submitits_rule():
    t = slurm.TrainTask("ssflctl.node.job:train_run", timeout_min=60)
    assert t.cause() == "SIGUSR2 (time limit or preemption)"   # not started: no claim either way
    t._started = 1000.0
    # submitit counts a timeout when the job ran >= min(80% of the limit, limit - 10 min): 50 min here
    assert t.cause(now=1000.0 + 51 * 60) == "SIGUSR2, a time limit by submitit's rule (ran 51.0 of 60 min)"
    assert t.cause(now=1000.0 + 5 * 60) == "SIGUSR2, a preemption by submitit's rule (ran 5.0 of 60 min)"
    short = slurm.TrainTask(timeout_min=1)
    short._started = 0.0
    assert "a time limit" in short.cause(now=50.0)               # 0.8 x 1 min = 48 s
    back = pickle.loads(pickle.dumps(t))                         # submitit pickles the task
    assert back.fn == t.fn and back.timeout_min == 60
