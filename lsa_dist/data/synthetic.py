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
from .plan import Layout, batches_per_rank
from .transforms import ModelInput

IMAGENET_TRAIN = 1_281_167
POOL = 4  # distinct batches kept in memory
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SyntheticLoader:
    """Batches of random images and labels for one rank; `epoch(e, start_batch)` as the real loaders."""

    def __init__(self, cfg: DataConfig, num_classes: int, rank: int, world_size: int, train: bool, seed: int) -> None:
        self.batch_size = cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size)
        self.num_batches = batches_per_rank(IMAGENET_TRAIN, world_size, self.batch_size, True) if train else 1
        self.to_model_input = ModelInput(IMAGENET_MEAN, IMAGENET_STD, cfg.augment, train)
        g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 2 + int(train))
        size, pin = cfg.train_size(0) if train else cfg.image_size, torch.cuda.is_available()
        self.pool = []
        for _ in range(POOL if train else 1):
            images = torch.randint(0, 256, (self.batch_size, 3, size, size), dtype=torch.uint8, generator=g)
            labels = torch.randint(0, num_classes, (self.batch_size,), generator=g)
            self.pool.append((images.pin_memory(), labels.pin_memory()) if pin else (images, labels))

    def __len__(self) -> int:
        return self.num_batches

    def batches_left(self, epoch: int, layouts: Sequence[Layout] = ()) -> int:
        return self.num_batches

    def epoch(
        self, epoch: int, start_batch: int = 0, return_keys: bool = False, layouts: Sequence[Layout] = ()
    ) -> Iterator[tuple]:
        for number in range(start_batch, self.num_batches):
            images, labels = self.pool[number % len(self.pool)]
            yield (images, labels, [""] * len(labels)) if return_keys else (images, labels)
