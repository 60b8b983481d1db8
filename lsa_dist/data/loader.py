"""What every loader shares, whatever it reads: the batch size, the number of batches per
epoch, the sample sequence an epoch still owes after earlier layouts (kept, since the trainer
asks for it more than once), and the image size of each epoch. A subclass says how samples
are read (`epoch`) and, when its readers do not take a rank's span in order, which positions
an earlier layout consumed (`_consumed`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence

import numpy as np

from ..config import DataConfig
from .dataset import DatasetError
from .plan import Layout, batches_per_rank, rank_span, remaining_sequence
from .transforms import ModelInput

logger = logging.getLogger(__name__)


class SkippedSamples:
    """Samples a loader leaves out because they cannot be decoded: each named in a warning
    (shard, key, why), counted in each pass over an epoch, and the run stopped with a one-line
    DatasetError (exit 2) once a pass skips more than `ceiling` on this rank. A few bad files
    must not end a week-long run; a broken dataset must."""

    def __init__(self, ceiling: int, what: str, rank: int) -> None:
        self.ceiling, self.what, self.rank = ceiling, what, rank
        self.epoch, self.count = 0, 0

    def start(self, epoch: int) -> None:
        """A pass over `epoch` begins (a training epoch, or its resumed rest; an evaluation)."""
        self.epoch, self.count = epoch, 0

    def note(self, shard: str, key: str, why: str) -> None:
        self.count += 1
        where = f"{self.what} epoch {self.epoch} on rank {self.rank}"
        logger.warning(f"skipped sample {key} of {shard}: it cannot be decoded ({why}); {self.count} in {where}")
        if self.count > self.ceiling:
            raise DatasetError(
                f"{self.count} samples skipped in {where}, more than data.max_bad_samples={self.ceiling} (last: "
                f"{key} of {shard}: {why}); repair or re-convert the shards, or raise data.max_bad_samples"
            )


class EpochLoader:
    """Batches of one split for one rank; `epoch(e, start_batch)` iterates an epoch."""

    def __init__(
        self,
        cfg: DataConfig,
        num_samples: int,
        mean: Sequence[float],
        std: Sequence[float],
        rank: int,
        world_size: int,
        train: bool,
        seed: int,
    ) -> None:
        self.cfg = cfg
        self.rank, self.world_size, self.train, self.seed = rank, world_size, train, seed
        self.batch_size = cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size)
        self.num_samples = num_samples
        self.num_batches = batches_per_rank(num_samples, world_size, self.batch_size, train)
        self.to_model_input = ModelInput(mean, std, cfg.augment, train)
        self._sequence: tuple[tuple, np.ndarray] | None = None  # sequence()'s last (key, answer)
        self.skipped = SkippedSamples(cfg.max_bad_samples, "training" if train else "evaluation", rank)

    def __len__(self) -> int:
        return self.num_batches

    def epoch(
        self, epoch: int, start_batch: int = 0, return_keys: bool = False, layouts: Sequence[Layout] = ()
    ) -> Iterator[tuple]:
        """The rank's batches start_batch .. of `epoch` (after `layouts`: of the samples they left)."""
        raise NotImplementedError

    def image_size(self, epoch: int) -> int:
        """The epoch's image size: data.progressive's when training, image_size when evaluating."""
        return self.cfg.train_size(epoch) if self.train else self.cfg.image_size

    def sequence(self, epoch: int, layouts: Sequence[Layout] = ()) -> np.ndarray:
        """Positions of the epoch's sample sequence still to be read after `layouts` (the last
        answer is kept: the trainer asks for an epoch's length, then for its batches, and after a
        layout change each answer replays what every earlier layout read)."""
        key = (epoch, tuple(layouts) if self.train else ())
        if self._sequence is None or self._sequence[0] != key:
            consumed = functools.partial(self._consumed, epoch)
            self._sequence = (key, remaining_sequence(self.num_samples, key[1], consumed))
        return self._sequence[1]

    def batches_left(self, epoch: int, layouts: Sequence[Layout] = ()) -> int:
        """The rank's batches of `epoch` under this layout, after `layouts`."""
        if not (layouts and self.train):
            return self.num_batches
        return batches_per_rank(len(self.sequence(epoch, layouts)), self.world_size, self.batch_size, True)

    def _batches_from(self, epoch: int, start_batch: int, layouts: Sequence[Layout]) -> int:
        """batches_left(epoch, layouts), once start_batch is known to lie within them."""
        left = self.batches_left(epoch, layouts)
        if not 0 <= start_batch <= left:
            raise ValueError(f"start_batch {start_batch} outside 0..{left}")
        return left

    def _consumed(self, epoch: int, sequence: np.ndarray, k: int, layout: Layout, rank: int) -> np.ndarray:
        """The positions of `sequence` rank `rank` read under `layout` (the k-th of the epoch):
        by default its span's first batches, in order, whatever its number of workers."""
        batch = layout.batch_size or self.batch_size
        start, _ = rank_span(len(sequence), layout.world_size, rank, batch, True)
        return sequence[start : start + layout.batches * batch]


__all__ = ["EpochLoader"]
