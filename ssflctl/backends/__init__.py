"""Schedulers behind one interface (:class:`ssflctl.backends.base.Backend`), registered by name.

``get("slurm")`` / ``get("local")`` return the backend; only the modules of this package import
submitit or know a scheduler's commands and states.
"""
from ssflctl.backends.base import (ALIVE, TEST_FN, THREAD_VARS, TRAIN_AND_TEST_FN, TRAIN_FN, Backend, JobKind,
                                   JobRef, JobStatus, Task, get, names, register)

__all__ = ["ALIVE", "TEST_FN", "THREAD_VARS", "TRAIN_AND_TEST_FN", "TRAIN_FN", "Backend", "JobKind", "JobRef",
           "JobStatus", "Task", "get", "names", "register"]
