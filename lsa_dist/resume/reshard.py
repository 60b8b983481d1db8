"""Resharding: a checkpoint continued on another world size, number of loader workers or batch
size. The epoch in progress goes on with the samples its earlier layouts left (typed `Layout`s
in the TrainState), the lr schedule is placed where the run stands in epochs, and ZeRO
partitions are converted with DeepSpeed's universal checkpoint tools."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist as D
from ..checkpoint import TrainState
from ..data.plan import Layout, batches_per_rank


@dataclass(frozen=True)
class Here:
    """How this run reads its data: world size, loader workers and batch size per rank, the
    training split's size (for the steps an epoch had under the saved layout) and the steps of
    an epoch read this way."""

    world_size: int
    workers: int
    batch_size: int
    train_samples: int
    steps_per_epoch: int


def saved_layout(state: TrainState, here: Here) -> Layout:
    """The layout the checkpoint was written under (records without workers or batch size: this run's)."""
    return Layout(state.world_size, state.data_workers or here.workers, 0, state.batch_size or here.batch_size)


def continue_layout(state: TrainState, here: Here) -> bool:
    """Record in `state` that the epoch in progress was read under the saved layout up to here, and
    move the lr schedule's origin to where the run stands in epochs when an epoch now has another
    number of steps (returned: the schedule must then be placed again)."""
    saved = saved_layout(state, here)
    if (saved.world_size, saved.workers, saved.batch_size) == (here.world_size, here.workers, here.batch_size):
        return False
    done = state.batches_before()
    if state.batch > done:
        state.layouts.append(Layout(saved.world_size, saved.workers, state.batch - done, saved.batch_size))
    new_steps = (saved.world_size, saved.batch_size) != (here.world_size, here.batch_size)
    if new_steps:
        saved_steps = batches_per_rank(here.train_samples, saved.world_size, saved.batch_size, True)
        origin_step, origin_epochs = state.lr_origin
        state.lr_origin = [state.step, origin_epochs + (state.step - origin_step) / saved_steps]
    state.world_size, state.data_workers, state.batch_size = here.world_size, here.workers, here.batch_size
    return new_steps


def to_universal(folder: Path, tag: str, device: torch.device) -> Path:
    """Rank 0 converts folder/tag into DeepSpeed's universal checkpoint format (its own
    converter, in a subprocess) under folder/.universal/tag; every rank waits. Returns the
    folder that holds the converted tag. A collective."""
    target = folder / ".universal"

    def convert() -> None:
        shutil.rmtree(target, ignore_errors=True)
        command = [sys.executable, "-m", "lsa_dist.resume.universal"]  # DeepSpeed's, reading weights only
        command += ["--input_folder", str(folder / tag), "--output_folder", str(target / tag)]
        command += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
        command += ["--inject_missing_state"]  # our checkpoints carry no Megatron-style universal info
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise RuntimeError(
                f"converting {folder / tag} for another world size failed: {lines[-1] if lines else proc.returncode}"
            )

    D.rank0_acts(convert, device, f"converting {folder / tag} for another world size")
    return target
