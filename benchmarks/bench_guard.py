"""NaN guard cost per iteration vs one tiny CPU training iteration (target: under 1 %).

The guard's ``after_train_iter`` is timed on realistic inputs: the parsed loss dict of an
mmdet detector (0-dim tensors ``loss``, ``loss_cls``, ``loss_bbox``) and a real mmengine
``MessageHub`` whose ``train/<key>`` buffers are updated each iteration exactly as
``RuntimeInfoHook`` does before the guard runs (that update is mmengine's cost, not ours, and
is outside the timed region). The reference is one training iteration (forward, backward, SGD
step) of a ResNet-18-shaped network on 2 × 3 × 64 × 64 images on the CPU — the smallest
iteration a real run would have. ratio = budget (1 % of the iteration) / guard cost, so > 1
means the guard is under its 1 % target.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from types import SimpleNamespace

TARGET_FRACTION = 0.01


def _resnet18_ish():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            idt = x if self.down is None else self.down(x)
            y = self.relu(self.b1(self.c1(x)))
            return self.relu(self.b2(self.c2(y)) + idt)

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def _iteration_time(reps: int) -> float:
    import torch
    torch.manual_seed(0)
    model = _resnet18_ish()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([1, 3])
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        out = model(x)
        cls = loss_fn(out, y)
        bbox = out.pow(2).mean() * 1e-3
        loss = cls + bbox
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "loss_cls": cls.detach(), "loss_bbox": bbox.detach()}

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _guard_time(calls: int, rounds: int) -> float:
    import torch
    from mmengine.logging import MessageHub

    from ssflctl.node.guard import NanGuardHook

    hub = MessageHub.get_instance(f"bench_guard_{time.time_ns()}")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)

    class _Wrapper:
        optimizer = opt

        def get_lr(self):
            return {"lr": [g["lr"] for g in opt.param_groups]}

    tmp = tempfile.mkdtemp(prefix="bench_guard_")
    runner = SimpleNamespace(message_hub=hub, iter=0, epoch=0, work_dir=tmp,
                             optim_wrapper=_Wrapper(), logger=None,
                             train_loop=SimpleNamespace())
    hook = NanGuardHook()
    hook.before_train(runner)
    outputs = {"loss": torch.tensor(1.25), "loss_cls": torch.tensor(0.75), "loss_bbox": torch.tensor(0.5)}
    best = float("inf")
    for _ in range(rounds):
        elapsed = 0.0
        for i in range(calls):
            runner.iter = i
            for k, v in outputs.items():  # RuntimeInfoHook's work, not timed
                hub.update_scalar(f"train/{k}", v)
            t0 = time.perf_counter()
            hook.after_train_iter(runner, i, None, outputs)
            elapsed += time.perf_counter() - t0
        best = min(best, elapsed / calls)
    return best


def run(quick: bool = False) -> list[dict]:
    it = _iteration_time(5 if quick else 30)
    guard = _guard_time(2000 if quick else 20000, 3 if quick else 5)
    frac = guard / it
    budget = TARGET_FRACTION * it
    return [
        {
            "name": "NaN guard cost per iteration (after_train_iter)",
            "value": guard * 1e6,
            "reference": budget * 1e6,
            "ratio": budget / guard,
            "unit": "us",
            "note": (f"{100 * frac:.4f} % of one tiny CPU iteration "
                     f"(ResNet-18-shaped, 2x3x64x64, fwd+bwd+SGD: {it * 1e3:.1f} ms); "
                     f"reference = target budget 1 % of it"),
        },
    ]


if __name__ == "__main__":  # pragma: no cover
    for row in run(quick=True):
        print(row)
