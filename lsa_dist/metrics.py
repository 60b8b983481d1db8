"""Metrics: accuracy over a split, peak FLOP/s and model FLOPs utilisation.

`evaluate` serves the trainer (every rank, its share of the split, summed across ranks) and
the export tool (one process, no process group) alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from . import dist as D
from .data import PAD_LABEL

# Dense bf16/fp16 tensor-core peak per device, TFLOP/s (fp32 runs as TF32 at half of it)
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40": 181, "A10": 125, "V100": 125}
UNKNOWN_GPU_TFLOPS = 100


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float, float]:
    """(loss sum, top-1 correct, top-5 correct, count) over the non-padding samples."""
    keep = labels != PAD_LABEL
    logits, labels = logits[keep], labels[keep]
    if labels.numel() == 0:
        return 0.0, 0.0, 0.0, 0.0
    loss = F.cross_entropy(logits, labels, reduction="sum").item()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (top[:, 0] == labels).sum().item()
    top5 = (top == labels[:, None]).any(dim=1).sum().item()
    return loss, top1, top5, float(labels.numel())


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    to_model_input: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> dict[str, float]:
    """val/loss, val/top1 and val/top5 (percent) and val/images (the count) over this rank's
    batches, summed over the ranks of the process group when there is one. The caller puts the
    model in eval mode."""
    sums = [0.0, 0.0, 0.0, 0.0]
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = forward(to_model_input(images))
        sums = [a + b for a, b in zip(sums, accuracy_counts(logits.float(), labels))]
    loss, top1, top5, count = D.all_reduce_sum(sums, device)
    n = max(count, 1)
    return {"val/loss": loss / n, "val/top1": 100 * top1 / n, "val/top5": 100 * top5 / n, "val/images": count}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak dense FLOP/s of one device for MFU: known GPUs by name, on CPU a matmul rate measured
    in the run's precision with this process's threads (on constant data: no random draw, so
    the run's random streams are the same whether or not this is measured)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = next((v for key, v in PEAK_TFLOPS.items() if key in name), UNKNOWN_GPU_TFLOPS)
        return tflops * 1e12 * (0.5 if dtype == torch.float32 else 1.0)
    a = torch.full((1024, 1024), 0.5, dtype=dtype)
    b = torch.full((1024, 1024), 0.25, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(8):
        a @ b
    return 8 * 2 * 1024**3 / (time.perf_counter() - start)


def mfu(images_per_s: float, macs_per_image: float, peak: float, devices: int) -> float:
    """Model FLOPs utilisation: training FLOPs (3 passes x 2 FLOPs per MAC) over the peak."""
    return images_per_s * 6 * macs_per_image / (peak * devices)
