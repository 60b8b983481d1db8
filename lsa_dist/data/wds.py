"""WebDataset pipeline: tar shards streamed from local paths, `pipe:` commands or http(s) URLs.

Each epoch the shard order is shuffled (seed, epoch); the resulting sample sequence is cut
into equal contiguous spans per rank and, within a rank, per loader worker (see plan.py).
Workers stream their span shard by shard, mix it through a seeded shuffle buffer, decode and
transform, and hand out whole uint8 batches. A restart at (epoch, batch) replays
each worker's span up to where it stopped without decoding what it skips.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig
from ..rng import seeded
from .dataset import DatasetError, DatasetInfo
from .plan import PAD_LABEL, batches_per_rank, batches_to_skip, epoch_rng, rank_span, worker_spans
from .transforms import ModelInput, normalization, sample_transform

Batch = tuple[torch.Tensor, torch.Tensor]


def shard_urls(info: DatasetInfo, split: str, template: str) -> list[str]:
    """Where to read each shard: local files, or `template` with {shard} replaced by the shard name."""
    if not template:
        return [str(p) for p in info.shard_paths(split)]
    if "{shard}" not in template:
        raise DatasetError(f"data.urls must contain '{{shard}}' where the shard name goes, got {template!r}")
    return [template.replace("{shard}", s.name) for s in info.split(split).shards]


class WebDatasetLoader:
    """Batches of one split for one rank; `epoch(e, start_batch)` iterates an epoch."""

    def __init__(
        self, info: DatasetInfo, split: str, cfg: DataConfig, rank: int, world_size: int, train: bool, seed: int
    ) -> None:
        self.split_info = info.split(split)
        self.batch_size = cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size)
        info.check_size(split, world_size, self.batch_size)
        if not cfg.urls:  # remote shards are checked as they are read
            info.check_files(split, "wds", checksums=cfg.check_checksums)
        self.urls = shard_urls(info, split, cfg.urls)
        self.counts = [s.num_samples for s in self.split_info.shards]
        self.rank, self.world_size, self.train, self.seed = rank, world_size, train, seed
        self.num_workers = cfg.num_workers
        self.shuffle_buffer = cfg.shuffle_buffer
        self.cfg = cfg
        self._transforms: dict[int, Callable] = {}
        self.to_model_input = ModelInput(*normalization(cfg, info.mean, info.std), cfg.augment, train)
        self.num_batches = batches_per_rank(self.split_info.num_samples, world_size, self.batch_size, train)

    def __len__(self) -> int:
        return self.num_batches

    def epoch(self, epoch: int, start_batch: int = 0, return_keys: bool = False) -> Iterator[Batch]:
        """The rank's batches start_batch .. num_batches-1 of `epoch`.

        With `return_keys`, each batch also carries its samples' keys ("" for padding).
        """
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.num_batches}")
        stream = _EpochStream(self, epoch, start_batch, return_keys)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            worker_init_fn=_worker_init,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.num_workers else None,
        )
        yield from loader

    # -- what one worker reads --------------------------------------------------------------
    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.urls)
        return epoch_rng(self.seed, epoch).permutation(n) if self.train else np.arange(n)

    def raw_samples(self, epoch: int, start: int, stop: int, end: int) -> Iterator[dict[str, Any] | None]:
        """Samples at positions [start, stop) of the epoch's sample sequence; None from `end` on
        (past the rank's last real sample: evaluation pads its last batches)."""
        order = self.shard_order(epoch)
        real_stop = min(stop, end)
        offset = 0
        for shard in order:
            if offset >= real_stop:
                break
            count = self.counts[shard]
            lo, hi = max(start, offset), min(real_stop, offset + count)
            if lo < hi:
                yield from self._read_shard(shard, lo - offset, hi - offset)
            offset += count
        for _ in range(max(start, real_stop), stop):
            yield None

    def _read_shard(self, shard: int, skip: int, stop: int) -> Iterator[dict[str, Any]]:
        url = self.urls[shard]
        seen = 0
        try:
            for sample in webdataset.tariterators.tarfile_samples([{"url": url}]):
                if seen >= skip:
                    yield sample
                seen += 1
                if seen >= stop:
                    return
        except Exception as err:  # noqa: BLE001 - tar, I/O and subprocess errors alike
            raise DatasetError(f"cannot read shard {url}: {err}") from err
        if seen < stop:
            raise DatasetError(
                f"shard {url} holds {seen} samples but dataset.json records {self.counts[shard]}: "
                "it is truncated or from another conversion"
            )

    def image_size(self, epoch: int) -> int:
        """The epoch's image size: data.progressive's when training, image_size when evaluating."""
        return self.cfg.train_size(epoch) if self.train else self.cfg.image_size

    def transform(self, epoch: int) -> Callable:
        size = self.image_size(epoch)
        if size not in self._transforms:
            self._transforms[size] = sample_transform(self.cfg.augment, size, self.train)
        return self._transforms[size]

    def make_batch(self, samples: list[dict[str, Any] | None], return_keys: bool = False, epoch: int = 0) -> tuple:
        images, labels, keys = [], [], []
        size, transform = self.image_size(epoch), self.transform(epoch)
        for sample in samples:
            if sample is None:
                images.append(torch.zeros(3, size, size, dtype=torch.uint8))
                labels.append(PAD_LABEL)
                keys.append("")
                continue
            images.append(transform(sample["jpg"]))
            labels.append(int(sample["cls"]))
            keys.append(sample["__key__"])
        batch = (torch.stack(images), torch.tensor(labels, dtype=torch.long))
        return (*batch, keys) if return_keys else batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class _EpochStream(IterableDataset):
    def __init__(self, loader: WebDatasetLoader, epoch: int, start_batch: int, return_keys: bool) -> None:
        super().__init__()
        self.loader, self.epoch, self.start_batch, self.return_keys = loader, epoch, start_batch, return_keys

    def __iter__(self) -> Iterator[Batch]:
        ld = self.loader
        info = get_worker_info()
        workers, index = (info.num_workers, info.id) if info else (1, 0)
        # DataLoader hands out batches round robin from worker 0; after a restart at batch k the
        # next batch belongs to logical worker k % workers, so roles are rotated.
        logical = (index + self.start_batch) % workers
        span = worker_spans(ld.num_batches, workers, ld.batch_size)[logical]
        rank_start, rank_end = rank_span(ld.split_info.num_samples, ld.world_size, ld.rank, ld.batch_size, ld.train)
        start = rank_start + span.start
        stop = start + span.num_batches * ld.batch_size
        stream: Iterator[dict[str, Any] | None] = ld.raw_samples(self.epoch, start, stop, rank_end)
        if ld.train and ld.shuffle_buffer > 1:
            seed = int(epoch_rng(ld.seed, self.epoch, ld.rank, logical).integers(2**31))
            shuffle: Callable = webdataset.filters.shuffle(
                ld.shuffle_buffer, initial=ld.shuffle_buffer, rng=random.Random(seed)
            )
            stream = shuffle(stream)
        skipped = batches_to_skip(logical, workers, self.start_batch)
        batch: list[dict[str, Any] | None] = []
        for position, sample in enumerate(stream):
            if position < skipped * ld.batch_size:
                continue
            batch.append(sample)
            if len(batch) == ld.batch_size:
                # the rank's batch number: augmentation randomness depends on it alone, so a
                # restarted epoch reproduces the pixels of the uninterrupted one
                number = logical + (position // ld.batch_size) * workers
                with seeded(int(epoch_rng(ld.seed, self.epoch, ld.rank, number).integers(2**63))):
                    yield ld.make_batch(batch, self.return_keys, self.epoch)
                batch = []


def read_labels(urls: list[str]) -> list[tuple[str, int]]:
    """(key, label) of every sample in the shards, in order (tests and tools)."""
    out = []
    for url in urls:
        for sample in webdataset.tariterators.tarfile_samples([{"url": url}]):
            out.append((sample["__key__"], int(sample["cls"])))
    return out


__all__ = ["WebDatasetLoader", "read_labels", "shard_urls"]
