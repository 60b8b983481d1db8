"""In-memory synthetic batches with the pipelines' batch contract (`train.synthetic`): the
real engine and step loop measured without the data loader, as torchtitan and Composer offer.

A few distinct uint8 batches are drawn once (seeded per rank) and handed out in turn, in pinned
memory on a GPU machine; labels are uniform over the classes. An epoch has as many batches as
ImageNet-1k's training split gives at this world size and batch size; evaluation has one batch
per rank (its metrics mean nothing: the data is noise).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..config import DataConfig
from .loader import EpochLoader
from .plan import Layout

IMAGENET_TRAIN = 1_281_167
POOL = 4  # distinct batches kept in memory
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SyntheticLoader(EpochLoader):
    """Batches of random images and labels for one rank; `epoch(e, start_batch)` as the real loaders."""

    def __init__(self, cfg: DataConfig, num_classes: int, rank: int, world_size: int, train: bool, seed: int) -> None:
        super().__init__(cfg, IMAGENET_TRAIN, IMAGENET_MEAN, IMAGENET_STD, rank, world_size, train, seed)
        if not train:  # one evaluation batch per rank: on noise, more would measure nothing
            self.num_batches = 1
        g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 2 + int(train))
        size, pin = self.image_size(0), torch.cuda.is_available()
        self.pool = []
        for _ in range(POOL if train else 1):
            images = torch.randint(0, 256, (self.batch_size, 3, size, size), dtype=torch.uint8, generator=g)
            labels = torch.randint(0, num_classes, (self.batch_size,), generator=g)
            self.pool.append((images.pin_memory(), labels.pin_memory()) if pin else (images, labels))

    def batches_left(self, epoch: int, layouts: Sequence[Layout] = ()) -> int:
        """Every epoch is as long: its batches are drawn, not read, so no earlier layout took any."""
        return self.num_batches

    def epoch(
        self, epoch: int, start_batch: int = 0, return_keys: bool = False, layouts: Sequence[Layout] = ()
    ) -> Iterator[tuple]:
        for number in range(start_batch, self.num_batches):
            images, labels = self.pool[number % len(self.pool)]
            yield (images, labels, [""] * len(labels)) if return_keys else (images, labels)
