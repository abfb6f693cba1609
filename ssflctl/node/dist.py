"""Several processes, one run: who is who, the process group, and deciding once for all ranks.

A job of ``nodes × gpus`` tasks (``resources``) runs one process per GPU:

* Slurm: ``srun`` starts the tasks (submitit's ``tasks_per_node``/``nodes``); each sees
  ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` and mmengine's ``launcher='slurm'`` applies.
* local executor: the runner starts ``gpus`` processes with torchrun's variables
  (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``): ``launcher='pytorch'``.

:func:`setup` creates the process group once per process, before any Runner, because the node's
own decisions (which attempt, which checkpoint, the retry) are taken by rank 0 and broadcast
(:func:`on_main`) between trainings. On CUDA it is mmengine's own ``init_dist`` (NCCL,
``torch.cuda.set_device(local_rank)``); without CUDA mmengine 0.10.7's ``init_dist`` cannot be used
(it calls ``torch.cuda.set_device`` unconditionally), so the same variables initialise a ``gloo``
group here. Either way mmengine's ``Runner.setup_env`` then finds ``is_distributed()`` and keeps it.

Light at import (no torch): the login node imports :func:`world` through ``ssflctl.node.job``.
"""
from __future__ import annotations

import datetime as _dt
import os
import pickle
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")

#: default port base for the Slurm launcher; the job id picks one of 20000 ports above it, so two
#: jobs sharing a node do not collide on mmengine's fixed default (29500)
PORT_BASE = 20000
#: seconds a rank waits in a collective before gloo/NCCL give up (the NaN guard never lets a rank wait)
TIMEOUT_S = int(os.environ.get("SSFLCTL_DIST_TIMEOUT", "1800"))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    srun: bool = False       # started by srun (SLURM_* variables), else by torchrun-style variables

    @property
    def launcher(self) -> str:
        """mmengine's launcher name for this process."""
        if not self.distributed:
            return "none"
        return "slurm" if self.srun else "pytorch"

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def world() -> World:
    """This process's place, from the environment alone (no process group needed)."""
    if _int("SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in os.environ:
        return World(_int("SLURM_PROCID", 0), _int("SLURM_NTASKS", 1), _int("SLURM_LOCALID", 0), srun=True)
    if _int("WORLD_SIZE", 1) > 1 and "RANK" in os.environ:
        return World(_int("RANK", 0), _int("WORLD_SIZE", 1), _int("LOCAL_RANK", 0))
    return World()


def rank() -> int:
    """The global rank: the process group's when there is one, else the environment's."""
    if initialized():
        import torch.distributed as td

        return td.get_rank()
    return world().rank


def is_main() -> bool:
    return rank() == 0


def initialized() -> bool:
    try:
        import torch.distributed as td
    except ImportError:  # pragma: no cover
        return False
    return td.is_available() and td.is_initialized()


def cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
    out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                         timeout=60).stdout.split()
    return out[0] if out else "127.0.0.1"


def setup() -> World:
    """Create the process group if this process is one of several (idempotent); return its World."""
    w = world()
    if not w.distributed or initialized():
        return w
    timeout = _dt.timedelta(seconds=TIMEOUT_S)
    if w.srun:
        # SLURM_JOB_ID is unique per array task too
        os.environ.setdefault("MASTER_PORT", str(PORT_BASE + _int("SLURM_JOB_ID", 0) % 20000))
    if cuda():  # mmengine's own path: set_device(local rank), NCCL
        from mmengine.dist import init_dist

        init_dist(w.launcher, backend="nccl", timeout=TIMEOUT_S)
        return w
    import torch.distributed as td

    if w.srun:  # what mmengine's _init_dist_slurm sets, without torch.cuda
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ["WORLD_SIZE"], os.environ["RANK"] = str(w.size), str(w.rank)
        os.environ["LOCAL_RANK"] = str(w.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    td.init_process_group(backend="gloo", rank=w.rank, world_size=w.size, timeout=timeout)
    return w


def teardown() -> None:
    """Leave the process group (all ranks, after training): the test step then runs on rank 0 alone."""
    if initialized():
        import torch.distributed as td

        try:
            td.barrier()
        finally:
            td.destroy_process_group()


def device():
    """Where collective tensors live: the current CUDA device under NCCL, else the CPU."""
    import torch
    import torch.distributed as td

    if initialized() and td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (as is without a process group)."""
    if not initialized():
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0, device=device())
    return box[0]


def barrier() -> None:
    if initialized():
        import torch.distributed as td

        td.barrier()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank (an exception raised by it is
    raised on every rank): decisions that read and write the run directory are taken once."""
    if not initialized():
        return fn()
    if is_main():
        try:
            out: Any = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            out = _Raised(exc)
            try:
                pickle.dumps(out)
            except Exception:  # noqa: BLE001 - the other ranks must not wait for a broadcast that never comes
                out = _Raised(RuntimeError(f"{type(exc).__name__}: {exc}"))
    else:
        out = None
    out = broadcast(out)
    if isinstance(out, _Raised):
        raise out.exc
    return out
