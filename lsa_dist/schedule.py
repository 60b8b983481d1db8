"""The learning-rate schedule: the peak scaled with the global batch, linear warmup, then cosine
to min_lr, laid out in epochs so that a resume on another world size can place it."""

from __future__ import annotations

import math
from collections.abc import Callable

from .config import RunConfig


def peak_lr(cfg: RunConfig, world_size: int) -> float:
    """optim.lr scaled linearly from a global batch of optim.lr_batch to the run's."""
    global_batch = cfg.data.batch_size * world_size
    return cfg.optim.lr * global_batch / cfg.optim.lr_batch if cfg.optim.lr_batch else cfg.optim.lr


def lr_lambda(
    cfg: RunConfig, steps_per_epoch: int, world_size: int, origin: tuple[int, float] = (0, 0.0)
) -> Callable[[int], float]:
    """Multiplier of the peak lr at each optimizer step: linear warmup, then cosine to min_lr.

    The schedule is laid out in epochs; `origin` (step, epochs done at that step) places it
    after a resume on another world size, where an epoch has another number of steps."""
    peak = peak_lr(cfg, world_size)
    total = max(1, cfg.optim.epochs * steps_per_epoch)
    warmup = min(total, round(cfg.optim.warmup_epochs * steps_per_epoch))
    start, floor = cfg.optim.warmup_lr / peak, cfg.optim.min_lr / peak
    origin_step, origin_epochs = origin
    shift = origin_epochs * steps_per_epoch - origin_step  # 0 for a run on one world size

    def factor(step: int) -> float:
        step = step + shift if shift else step
        if step < warmup:
            return start + (1 - start) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
