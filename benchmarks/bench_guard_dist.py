"""NaN guard cost per iteration with 2 ranks (its all-reduce of a flag per rank) vs one DDP iteration.

Two CPU processes in a gloo group (as the CPU/test path runs; on GPUs the flag is one NCCL all-reduce
of world_size floats after the loss was already synchronised by mmengine's ``.item()``). Timed on
rank 0: the guard's ``after_train_iter`` with the message hub filled as ``RuntimeInfoHook`` fills it,
the agreement included (every rank calls it every iteration, so the all-reduce waits only for the
slower rank: both call it back to back here). Reference: one DDP iteration (forward, backward with
the gradient all-reduce, SGD step) of the ResNet-18-shaped net of bench_guard on 2 × 3 × 64 × 64 per
rank — smaller than any real run's. ratio = budget (1 % of the iteration) / guard cost.

    python -m benchmarks.bench_guard_dist
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from types import SimpleNamespace

TARGET_FRACTION = 0.01


def _worker(rank: int, world: int, port: int, calls: int, reps: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as td
    from mmengine.logging import MessageHub

    from benchmarks.bench_guard import _resnet18_ish
    from ssflctl.node.guard import NanGuardHook

    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world)
    # the guard
    hub = MessageHub.get_instance(f"bench_guard_dist_{rank}_{time.time_ns()}")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)

    class _Wrapper:
        optimizer = opt

        def get_lr(self):
            return {"lr": [g["lr"] for g in opt.param_groups]}

    runner = SimpleNamespace(message_hub=hub, iter=0, epoch=0, work_dir=tempfile.mkdtemp(prefix="bgd_"),
                             optim_wrapper=_Wrapper(), logger=None, train_loop=SimpleNamespace())
    hook = NanGuardHook()
    hook.before_train(runner)
    outputs = {"loss": torch.tensor(1.25), "loss_cls": torch.tensor(0.75), "loss_bbox": torch.tensor(0.5)}
    td.barrier()
    times = []
    for i in range(calls):
        runner.iter = i
        for k, v in outputs.items():
            hub.update_scalar(f"train/{k}", v)
        t0 = time.perf_counter()
        hook.after_train_iter(runner, i, None, outputs)
        times.append(time.perf_counter() - t0)
    guard = statistics.median(times)
    # the reference: a DDP iteration
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(_resnet18_ish())
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    loss_fn = torch.nn.CrossEntropyLoss()
    its = []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        sgd.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        sgd.step()
        if i >= 3:
            its.append(time.perf_counter() - t0)
    if rank == 0:
        q.put((guard, statistics.median(its)))
    td.barrier()
    td.destroy_process_group()


def run(quick: bool = False) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    calls, reps = (500, 5) if quick else (3000, 20)
    mp.start_processes(_worker, args=(2, port, calls, reps, q), nprocs=2, join=True, start_method="spawn")
    guard, it = q.get()
    budget = TARGET_FRACTION * it
    return [{
        "name": "NaN guard cost per iteration, 2 ranks (gloo all-reduce of the flags included)",
        "value": guard * 1e6, "reference": budget * 1e6, "ratio": budget / guard, "unit": "us",
        "note": (f"{100 * guard / it:.4f} % of one 2-rank DDP CPU iteration (ResNet-18-shaped, 2x3x64x64 "
                 f"per rank, fwd+bwd+allreduce+SGD: {it * 1e3:.1f} ms); reference = budget 1 % of it"),
    }]


if __name__ == "__main__":  # pragma: no cover
    for row in run(quick=False):
        print(row)
