"""Forward+backward time of the Focal Loss family vs mmdet's FocalLoss on a RetinaNet-sized input.

``run(quick)`` returns rows in the benchmarks format (see docs/helpers-common.md); ratio =
reference time / our time (> 1: ours is faster). The reference is mmdet's ``FocalLoss`` measured in
the same run on the same inputs: on the CPU it is mmdet's pure-PyTorch ``py_sigmoid_focal_loss``
(one-hot targets, autograd); on CUDA it is mmcv's fused ``sigmoid_focal_loss`` kernel. The device
defaults to CUDA when available, else the CPU; ``python benchmarks/bench_losses.py --device cuda``
forces one. Our losses are pure PyTorch on every device (no compiled kernel).

Input: N anchors x 80 classes (N = 100,000 -- one 800x1333 image has ~120k RetinaNet anchors --
or 20,000 with ``quick``), logits around RetinaNet's prior (p ~ 0.01) with spread, 1% positive
anchors, 90% background, the rest ignored (weight 0), avg_factor = number of positives, as
RetinaNet's head calls the loss.
"""
from __future__ import annotations

import argparse
import statistics
import time


def _make_inputs(n, num_classes, device, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, num_classes, generator=g) * 2.0 - 4.6
    labels = torch.full((n,), num_classes, dtype=torch.long)
    u = torch.rand(n, generator=g)
    pos = u < 0.01
    labels[pos] = torch.randint(0, num_classes, (int(pos.sum()),), generator=g)
    weight = torch.ones(n)
    weight[u > 0.91] = 0.0                                 # ignored anchors
    avg_factor = max(1.0, float(pos.sum()))
    return pred.to(device), labels.to(device), weight.to(device), avg_factor


def _fwd_bwd_seconds(loss_fn, pred, labels, weight, avg_factor):
    import torch
    sync = torch.cuda.synchronize if pred.is_cuda else (lambda: None)
    x = pred.detach().clone().requires_grad_()
    sync()
    t0 = time.perf_counter()
    loss = loss_fn(x, labels, weight, avg_factor=avg_factor)
    loss.backward()
    sync()
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"{loss_fn!r} gave a non-finite loss {loss.item()}")
    return elapsed


def _interleaved_ms(ours, reference, inputs, repeats):
    """Median ms of ours and of the reference, timed alternately (fair on a shared machine)."""
    _fwd_bwd_seconds(ours, *inputs)                        # warm-up
    _fwd_bwd_seconds(reference, *inputs)
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t_ref.append(_fwd_bwd_seconds(reference, *inputs))
        t_ours.append(_fwd_bwd_seconds(ours, *inputs))
    return statistics.median(t_ours) * 1000.0, statistics.median(t_ref) * 1000.0


def run(quick: bool, device: str | None = None) -> list[dict]:
    import torch
    from mmdet.models.losses import FocalLoss

    from ssflctl.extensions.losses import FocalFamilyLoss, ShiftStepFocalLoss

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    n, num_classes = (20_000, 80) if quick else (100_000, 80)
    repeats = 3 if quick else 7
    inputs = _make_inputs(n, num_classes, device)
    ref_impl = ("mmcv CUDA sigmoid_focal_loss kernel" if device.startswith("cuda")
                else "mmdet py_sigmoid_focal_loss (PyTorch autograd)")
    threads = torch.get_num_threads()
    reference = FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25)
    ours = {
        "ssfl": ShiftStepFocalLoss(gamma=2.0, alpha=0.25, shift=0.1),
        "gfl_star": ShiftStepFocalLoss(gamma=2.0, alpha=0.25, shift=0.0),
        "focal_logdomain": FocalFamilyLoss(modulation="focal", gamma=2.0, alpha=0.25),
    }
    rows = []
    for name, loss in ours.items():
        ms, ref_ms = _interleaved_ms(loss, reference, inputs, repeats)
        rows.append({
            "name": f"loss_{name}_fwd_bwd_{device}_{n // 1000}kx{num_classes}",
            "value": round(ms, 2),
            "reference": round(ref_ms, 2),
            "ratio": round(ref_ms / ms, 3),
            "unit": "ms",
            "note": (f"{name} vs mmdet FocalLoss ({ref_impl}), forward+backward, median of "
                     f"{repeats} interleaved runs, {threads} torch threads, float32"),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = ap.parse_args()
    for row in run(args.quick, device=args.device):
        print(f"{row['name']:<44} {row['value']:>9.2f} {row['unit']}  ref {row['reference']:>9.2f}"
              f"  ratio {row['ratio']:.3f}  ({row['note']})")


if __name__ == "__main__":
    main()
