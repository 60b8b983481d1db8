"""Telemetry: what the step loop measures (loss, throughput, data wait, step time, memory, MFU)
over windows of logging steps, returned as metrics for the trainer to log.

Nothing here reads a device tensor between logging steps: a step's loss stays on the device
until a window that logs it closes.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import dist as D
from .config import RunConfig
from .engine import PRECISIONS, StepInfo
from .metrics import mfu, peak_flops


@dataclass
class StepOutput:
    """One optimizer step: its mean loss on this rank (a tensor on the device: reading it
    waits for the step) and what the engine reported at the step's end."""

    loss: torch.Tensor
    info: StepInfo | None


@dataclass
class Position:
    """Where the run stands, for the progress metrics: the epoch (fractional) and the steps left."""

    epoch: float
    steps_left: int
    lr: float
    image_size: int  # the epoch's training size (data.progressive)


class Window:
    """What happened since a window (of logging) began: steps, images, data wait, loss sum."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps, self.images, self.data_wait = 0, 0, 0.0
        self.loss_sum: torch.Tensor | float = 0.0

    def add(self, output: StepOutput, images: int) -> None:
        self.steps += 1
        self.images += images
        self.loss_sum = self.loss_sum + output.loss

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(self.steps, 1)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Telemetry:
    """train/* every tracking.log_every steps (MLflow's window), progress/* every train.log_every
    steps (the console's window: averaged over the ranks, a collective), train/first_step_s
    once (start-up cost: DeepSpeed's first step, torch.compile's compilation), and the epoch's
    mean loss."""

    def __init__(self, cfg: RunConfig, macs: dict[int, tuple[int, int]], world_size: int, device: torch.device) -> None:
        self.log_every, self.progress_every = cfg.tracking.log_every, cfg.train.log_every
        dtype = PRECISIONS[cfg.engine.precision]
        self.peak_flops = cfg.engine.peak_tflops * 1e12 or peak_flops(device, dtype)  # datasheet peak if not given
        self.macs, self.world_size, self.device = macs, world_size, device
        self.tracking, self.progress, self.epoch = Window(), Window(), Window()
        self.first_step_logged = False
        self.last_epoch: dict[str, float] = {}  # the last epoch's metrics (and evaluation)

    def start(self) -> None:
        self.tracking.reset()
        self.progress.reset()

    def waited(self, seconds: float) -> None:
        """Time the loop spent waiting for a batch."""
        self.tracking.data_wait += seconds
        self.progress.data_wait += seconds

    def count(
        self, output: StepOutput, images: int, step: int, last: bool, position: Callable[[], Position]
    ) -> list[dict[str, float]]:
        """Add a step; returns the metrics due at it (logged at `step`). `position` is asked only
        when a window closes."""
        due = []
        for window in (self.epoch, self.tracking, self.progress):
            window.add(output, images)
        if not self.first_step_logged:
            self.first_step_logged = True
            output.loss.item()  # the clock stops when the device has finished the step, not when it was queued
            due.append({"train/first_step_s": self.progress.elapsed() - self.progress.data_wait})
        if step % self.log_every == 0 or last:
            due.append(self._train_metrics(output, position()))
            self.tracking.reset()
        if step % self.progress_every == 0 or last:
            due.append(self._progress_metrics(position()))
            self.progress.reset()
        return due

    def _train_metrics(self, output: StepOutput, position: Position) -> dict[str, float]:
        window, info = self.tracking, output.info
        loss = output.loss.item()  # waits for the device: the window closes when its work is done
        images_per_s = window.images / window.elapsed()
        architecture, executed = self.macs[position.image_size]  # at the epoch's size
        return {
            "train/loss": loss,
            "train/lr": info.lr if info else position.lr,
            "train/grad_norm": info.norm() if info else math.nan,
            "train/images_per_s": images_per_s,
            "train/mfu": mfu(images_per_s, architecture, self.peak_flops, self.world_size),
            "train/mfu_executed": mfu(images_per_s, executed, self.peak_flops, self.world_size),
        }

    def _progress_metrics(self, position: Position) -> dict[str, float]:
        window = self.progress
        loss_sum = float(window.loss_sum)  # waits for the device before the clock is read
        elapsed, steps = window.elapsed(), max(window.steps, 1)
        total_loss, count = D.all_reduce_sum([loss_sum, window.steps], self.device)
        step_ms, wait_ms, memory = D.all_reduce_max(
            [1000 * (elapsed - window.data_wait) / steps, 1000 * window.data_wait / steps, peak_memory_mb(self.device)],
            self.device,
        )
        return {
            "progress/loss": total_loss / max(count, 1),
            "progress/lr": position.lr,
            "progress/epoch": position.epoch,
            "progress/images_per_s": window.images / elapsed,
            "progress/data_wait_ms": wait_ms,
            "progress/step_ms": step_ms,
            "progress/peak_mem_mb": memory,
            "progress/eta_s": position.steps_left * elapsed / steps,
        }
