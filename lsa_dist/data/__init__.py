"""Data: ImageNet conversion, dataset.json, and the WebDataset and FFCV pipelines.

The batch contract of both pipelines: an iterable of (images, labels) for this rank, images
uint8 (B, 3, S, S), labels int64 (B,); -1 marks evaluation padding. `len(loader)` batches per
epoch, the same on every rank; an epoch resumed under another world size or worker count
reads what the earlier layouts left (`layouts`, `batches_left`).
`loader.to_model_input(images)` turns a batch into model input on the device it is on:
float32, normalised with the dataset's mean/std from dataset.json, and randomly erased when
training the imagenet recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from ..config import DataConfig
from .dataset import DatasetError, DatasetInfo, dataset_identity, load_dataset_info
from .plan import PAD_LABEL, Layout


class BatchLoader(Protocol):
    """What both pipelines offer: a fixed number of batches per epoch and a restartable epoch."""

    num_batches: int
    batch_size: int
    to_model_input: Callable[[torch.Tensor], torch.Tensor]

    def __len__(self) -> int: ...

    def epoch(
        self, epoch: int, start_batch: int = 0, return_keys: bool = False, layouts: Sequence[Layout] = ()
    ) -> Iterator[tuple]: ...

    def batches_left(self, epoch: int, layouts: Sequence[Layout] = ()) -> int:
        """Batches of `epoch` read under this layout after `layouts` (len(self) without any)."""
        ...


def build_loader(
    cfg: DataConfig, split: str, rank: int, world_size: int, train: bool, seed: int = 0, info: DatasetInfo | None = None
) -> BatchLoader:
    """The loader of `split` for this rank, in the configured format."""
    info = info or load_dataset_info(cfg.root)
    if cfg.format == "wds":
        from .wds import WebDatasetLoader

        return WebDatasetLoader(info, split, cfg, rank, world_size, train, seed)
    if cfg.format == "ffcv":
        from .ffcv import FfcvLoader

        return FfcvLoader(info, split, cfg, rank, world_size, train, seed)
    raise DatasetError(f"data.format must be 'wds' or 'ffcv', got {cfg.format!r}")


__all__ = [
    "PAD_LABEL",
    "BatchLoader",
    "DatasetError",
    "DatasetInfo",
    "Layout",
    "build_loader",
    "dataset_identity",
    "load_dataset_info",
]
