"""Forward+backward time and peak memory of the Focal Loss family vs mmdet's FocalLoss.

``run(quick)`` returns rows in the benchmarks format (see docs/helpers-common.md); ratio =
reference / ours (> 1: ours is faster or smaller). The reference is mmdet's ``FocalLoss`` measured
in the same run on the same inputs: on the CPU it is mmdet's pure-PyTorch ``py_sigmoid_focal_loss``
(one-hot targets, autograd); on CUDA it is mmcv's fused ``sigmoid_focal_loss`` kernel. The device
defaults to CUDA when available, else the CPU; ``python benchmarks/bench_losses.py --device cuda``
forces one. Our losses are pure PyTorch on every device (no compiled kernel).

Memory: the peak of the bytes allocated during forward+backward beyond what was allocated before
(the gradient of the logits included), from :func:`peak_extra_bytes`: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU torch's own allocation records
(``torch.profiler`` with ``profile_memory=True``: every allocation and free of the CPU allocator,
summed in time order). The inputs (logits, labels, weights) are allocated before and not counted.

Input: N anchors x 80 classes (N = 100,000 -- one 800x1333 image has ~120k RetinaNet anchors --
or 20,000 with ``quick``), logits around RetinaNet's prior (p ~ 0.01) with spread, 1% positive
anchors, 90% background, the rest ignored (weight 0), avg_factor = number of positives, as
RetinaNet's head calls the loss.

    python benchmarks/bench_losses.py [--quick] [--device cpu|cuda]
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


def _fwd_bwd(loss_fn, x, labels, weight, avg_factor):
    loss = loss_fn(x, labels, weight, avg_factor=avg_factor)
    loss.backward()
    return loss


def _fwd_bwd_seconds(loss_fn, pred, labels, weight, avg_factor):
    import torch
    sync = torch.cuda.synchronize if pred.is_cuda else (lambda: None)
    x = pred.detach().clone().requires_grad_()
    sync()
    t0 = time.perf_counter()
    loss = _fwd_bwd(loss_fn, x, labels, weight, avg_factor)
    sync()
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"{loss_fn!r} gave a non-finite loss {loss.item()}")
    return elapsed


def peak_extra_bytes(fn, device="cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs, beyond those allocated before it (>= 0).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` before. CPU: the running sum of torch's CPU-allocator records
    (``torch.profiler``, ``profile_memory=True``; each allocation and free with its time), whose
    maximum is the peak; frees of tensors allocated before ``fn`` make the sum go below 0 and do not
    count as headroom. Raises RuntimeError if the profiler recorded no allocation at all.
    """
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    if not any(b > 0 for _, b in records):
        raise RuntimeError("torch.profiler recorded no CPU allocation: cannot measure memory")
    cur = peak = 0
    for _, nbytes in records:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _peak_mib(loss_fn, pred, labels, weight, avg_factor):
    x = pred.detach().clone().requires_grad_()
    return peak_extra_bytes(lambda: _fwd_bwd(loss_fn, x, labels, weight, avg_factor),
                            pred.device.type) / 2**20


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
    ref_mib = _peak_mib(reference, *inputs)
    logits_mib = inputs[0].numel() * inputs[0].element_size() / 2**20
    rows = []
    for name, loss in ours.items():
        ms, ref_ms = _interleaved_ms(loss, reference, inputs, repeats)
        mib = _peak_mib(loss, *inputs)
        size = f"{n // 1000}kx{num_classes}"
        rows.append({
            "name": f"loss_{name}_fwd_bwd_{device}_{size}",
            "value": round(ms, 2),
            "reference": round(ref_ms, 2),
            "ratio": round(ref_ms / ms, 3),
            "unit": "ms",
            "note": (f"{name} vs mmdet FocalLoss ({ref_impl}), forward+backward, median of "
                     f"{repeats} interleaved runs, {threads} torch threads, float32; "
                     f"ours = {ms / ref_ms:.2f}x FocalLoss's time"),
        })
        rows.append({
            "name": f"loss_{name}_peak_mem_{device}_{size}",
            "value": round(mib, 2),
            "reference": round(ref_mib, 2),
            "ratio": round(ref_mib / mib, 3),
            "unit": "MiB",
            "note": (f"{name} vs mmdet FocalLoss ({ref_impl}), peak extra memory of "
                     f"forward+backward (gradient {logits_mib:.1f} MiB included); "
                     f"ours = {mib / ref_mib:.2f}x FocalLoss's memory"),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = ap.parse_args()
    for row in run(args.quick, device=args.device):
        print(f"{row['name']:<44} {row['value']:>9.2f} {row['unit']:<3} ref {row['reference']:>9.2f}"
              f"  ratio {row['ratio']:.3f}  ({row['note']})")


if __name__ == "__main__":
    main()
