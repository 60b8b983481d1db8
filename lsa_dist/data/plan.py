"""Which samples each rank (and each loader worker) reads in an epoch.

The contract both pipelines keep: every rank gets the same number of batches per epoch,
ranks see disjoint samples, and the assignment depends only on (seed, epoch, world size,
number of workers). A resume under another layout (world size, workers) mid-epoch reads the
positions the earlier layouts left (`remaining_sequence`), cut the same way. Training drops
the remainder that does not fill a batch on every rank; evaluation keeps every sample and pads
the last batches with label -1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

PAD_LABEL = -1


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *more])


def batches_per_rank(num_samples: int, world_size: int, batch_size: int, train: bool) -> int:
    if train:
        return num_samples // (world_size * batch_size)
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def rank_span(num_samples: int, world_size: int, rank: int, batch_size: int, train: bool) -> tuple[int, int]:
    """[start, end) of this rank's samples in the epoch's sample order."""
    if train:
        per_rank = batches_per_rank(num_samples, world_size, batch_size, True) * batch_size
        return rank * per_rank, (rank + 1) * per_rank
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


@dataclass(frozen=True)
class WorkerSpan:
    """A loader worker's share of its rank's batches: batches j with j % num_workers == worker."""

    worker: int
    start: int  # position in the rank's (padded) sample sequence
    num_batches: int


def worker_spans(num_batches: int, num_workers: int, batch_size: int) -> list[WorkerSpan]:
    """Contiguous sample ranges per worker; worker w produces the rank's batches w, w+W, ..."""
    spans, start = [], 0
    for w in range(num_workers):
        count = len(range(w, num_batches, num_workers))
        spans.append(WorkerSpan(w, start, count))
        start += count * batch_size
    return spans


def batches_to_skip(worker: int, num_workers: int, start_batch: int) -> int:
    """How many of its own batches worker `worker` has already delivered when the rank is at start_batch."""
    return len(range(worker, start_batch, num_workers))


@dataclass(frozen=True)
class Layout:
    """How an epoch was read for a while: by `world_size` ranks with `workers` loader workers
    each, for `batches` batches of `batch_size` per rank (a layout that ended mid-epoch: a
    resume changed it). batch_size 0: the run's data.batch_size (records from before it was kept)."""

    world_size: int
    workers: int
    batches: int
    batch_size: int = 0


# which positions of `sequence` rank `rank` consumed under `layout` (the k-th of its epoch)
Consumed = Callable[[np.ndarray, int, Layout, int], np.ndarray]


def remaining_sequence(num_samples: int, layouts: Sequence[Layout], consumed: Consumed) -> np.ndarray:
    """The positions of the epoch's sample sequence not yet read after the completed `layouts`,
    in sequence order. Read under a new layout, the rest of the epoch sees every sample that
    earlier layouts did not (none twice; those that do not fill a global batch are dropped)."""
    sequence = np.arange(num_samples)
    for k, layout in enumerate(layouts):
        taken = [consumed(sequence, k, layout, rank) for rank in range(layout.world_size)]
        sequence = sequence[~np.isin(sequence, np.concatenate(taken))]
    return sequence


def layout_seed(*parts: int, layout: int = 0) -> np.random.Generator:
    """epoch_rng(*parts) for the epoch's first layout (unchanged seeds for ordinary runs), and
    a distinct stream for each layout a resume on another world size started."""
    return epoch_rng(*parts) if layout == 0 else epoch_rng(*parts, 1_000_003, layout)
