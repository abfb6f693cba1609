"""mmengine hooks the multi-task tests put into a run's config (``overrides: custom_imports/custom_hooks``).

* ``InjectNanHook(rank, iter, attempt)``: on that rank only, at that iteration of that attempt, the
  message hub's losses become NaN after the step (what the NaN guard reads), as a diverging loss
  on one GPU would look; every other rank's losses stay finite.
* ``WeightChecksumHook``: after training, every rank writes ``checksum.rank<K>.json`` in the work dir:
  the sha256 of its parameters (DDP keeps parameters identical; BatchNorm buffers are each rank's
  own, mmengine wraps with ``broadcast_buffers=False``), and the world size it ran in.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


def _rank_world():
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


class InjectNanHook(Hook):
    priority = 64  # after RuntimeInfoHook/LoggerHook wrote the scalars, before the guard (65)

    def __init__(self, rank: int = 1, iter: int = 2, attempt: str = "attempt-1"):
        self.rank, self.iter, self.attempt = int(rank), int(iter), attempt

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if Path(runner.work_dir).name != self.attempt or _rank_world()[0] != self.rank:
            return
        if int(runner.iter) + 1 != self.iter:
            return
        for key in list(outputs or {}):
            if "loss" in key:
                runner.message_hub.update_scalar(f"train/{key}", float("nan"))
                outputs[key] = float("nan")


class WeightChecksumHook(Hook):
    priority = "LOWEST"

    def after_train(self, runner):
        rank, world = _rank_world()
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        body = {"rank": rank, "world_size": world, "params_sha256": h.hexdigest(), "iter": int(runner.iter),
                "pid": os.getpid()}
        (Path(runner.work_dir) / f"checksum.rank{rank}.json").write_text(json.dumps(body))


HOOKS.register_module(name="InjectNanHook", module=InjectNanHook, force=True)
HOOKS.register_module(name="WeightChecksumHook", module=WeightChecksumHook, force=True)
