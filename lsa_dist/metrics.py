"""Metrics: accuracy over a split, peak FLOP/s and model FLOPs utilisation.

`evaluate` serves the trainer (every rank, its share of the split, summed across ranks) and
the export tool (one process, no process group) alike.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dist as D
from .data import PAD_LABEL

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peak:
    """A GPU's dense (no sparsity) tensor peak, TFLOP/s: bf16/fp16, and TF32 for fp32 runs."""

    pattern: str  # matched against torch.cuda.get_device_name()
    bf16: float
    tf32: float
    source: str


# first match wins: the more specific names first (H100 NVL and PCIe before H100 SXM, A100 before A10)
PEAKS = (
    Peak(
        r"H100.*NVL", 835, 418, "NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column (dense: half the sparse figure)"
    ),
    Peak(r"H100.*PCIe", 756, 378, "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column (dense)"),
    Peak(r"H100", 989, 495, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (dense)"),
    Peak(r"H200.*NVL", 835, 418, "NVIDIA H200 Tensor Core GPU datasheet, H200 NVL column (dense)"),
    Peak(r"H200", 989, 495, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (dense)"),
    Peak(r"B200", 2250, 1100, "NVIDIA HGX B200 datasheet, per GPU (dense: half the sparse figure)"),
    Peak(r"A100", 312, 156, "NVIDIA A100 Tensor Core GPU datasheet (40 GB and 80 GB, SXM and PCIe alike; dense)"),
    Peak(r"L40S", 362, 183, "NVIDIA L40S GPU datasheet (dense: half the sparse figure)"),
    Peak(r"\bA10\b", 125, 62.5, "NVIDIA A10 Tensor Core GPU datasheet (dense: half the sparse figure)"),
    Peak(r"V100.*PCIE", 112, 14, "NVIDIA V100 Tensor Core GPU datasheet, PCIe column (fp16 tensor; fp32: no TF32)"),
    Peak(r"V100", 125, 15.7, "NVIDIA V100 Tensor Core GPU datasheet, SXM2 column (fp16 tensor; fp32: no TF32)"),
)
_warned: set[str] = set()


def gpu_peak(name: str, dtype: torch.dtype) -> float:
    """Peak FLOP/s of the GPU called `name` in `dtype` (fp32 runs as TF32), from PEAKS; NaN (MFU
    not reported) with one warning per name for a GPU the table does not know."""
    peak = next((p for p in PEAKS if re.search(p.pattern, name, re.IGNORECASE)), None)
    if peak is None:
        if name not in _warned:
            _warned.add(name)
            logger.warning(
                f"warning: no peak FLOP/s known for GPU {name!r}; MFU is not reported: set engine.peak_tflops to "
                "its dense bf16 tensor TFLOP/s (datasheet)"
            )
        return math.nan
    return (peak.tf32 if dtype == torch.float32 else peak.bf16) * 1e12


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
    """Peak dense FLOP/s of one device for MFU: known GPUs by name; on CPU the faster of a
    float32 matmul and one in the run's precision, measured with this process's threads. A CPU
    without bf16 units emulates a bf16 matmul far slower than the model's bf16 convolutions and
    attention run, and MFU against that rate read above 100%. The data are constant: no random
    draw, so the run's random streams are the same whether or not this is measured."""
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), dtype)
    return max(_matmul_rate(torch.float32), _matmul_rate(dtype) if dtype != torch.float32 else 0.0)


def _matmul_rate(dtype: torch.dtype) -> float:
    """FLOP/s of a 256 x 256 matmul in `dtype`, over about 0.2 s (bounded: bf16 matmuls without
    CPU support run ~100x slower than float32 ones)."""
    a = torch.full((256, 256), 0.5, dtype=dtype)
    b = torch.full((256, 256), 0.25, dtype=dtype)
    a @ b
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < 0.2:
        a @ b
        calls += 1
    return calls * 2 * 256**3 / (time.perf_counter() - start)


def mfu(images_per_s: float, macs_per_image: float, peak: float, devices: int) -> float:
    """Model FLOPs utilisation: training FLOPs (3 passes x 2 FLOPs per MAC) over the peak."""
    return images_per_s * 6 * macs_per_image / (peak * devices)
