"""WebDataset pipeline: tar shards streamed from local paths, `pipe:` commands or http(s) URLs.

Each epoch the shard order is shuffled (seed, epoch); the resulting sample sequence is cut
into equal contiguous spans per rank and, within a rank, per loader worker (see plan.py).
Workers stream their span shard by shard, mix it through a seeded shuffle buffer, decode and
transform, and hand out whole uint8 batches. A restart at (epoch, batch) replays
each worker's span up to where it stopped without decoding what it skips.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import multiprocessing
import os
import random
import shlex
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig
from ..redact import first_line
from ..rng import seeded
from ..stop import SHELL_IGNORES_STOP_SIGNALS, ignore_stop_signals
from .dataset import DatasetError, DatasetInfo
from .loader import EpochLoader
from .plan import (
    PAD_LABEL,
    Layout,
    batches_per_rank,
    batches_to_skip,
    epoch_rng,
    layout_seed,
    rank_span,
    worker_spans,
)
from .tar_index import tar_samples
from .transforms import normalization, sample_transform

Batch = tuple[torch.Tensor, torch.Tensor]


def shard_urls(info: DatasetInfo, split: str, template: str) -> list[str]:
    """Where to read each shard: local files, or `template` with {shard} replaced by the shard name
    (quoted for the shell in a `pipe:` command, which webdataset runs with one)."""
    if not template:
        return [str(p) for p in info.shard_paths(split)]
    if "{shard}" not in template:
        raise DatasetError(f"data.urls must contain '{{shard}}' where the shard name goes, got {template!r}")
    quote = shlex.quote if template.startswith("pipe:") else str
    return [template.replace("{shard}", quote(s.name)) for s in info.split(split).shards]


def reader_command(url: str) -> str:
    """What webdataset opens for `url`: a `pipe:` command, or an http(s) shard read with curl
    (as webdataset itself would), run by a shell that ignores the stop signals, so that a
    signal sent to every process of the job cannot kill a shard mid-read. Local files as given."""
    if url.startswith("pipe:"):
        return f"pipe:{SHELL_IGNORES_STOP_SIGNALS}; {url[len('pipe:') :]}"
    if url.startswith(("http://", "https://")):
        curl = "curl --connect-timeout 30 --retry 30 --retry-delay 2 -f -s -L"
        return f"pipe:{SHELL_IGNORES_STOP_SIGNALS}; exec {curl} {shlex.quote(url)}"
    return url


class WebDatasetLoader(EpochLoader):
    """Batches of one split for one rank; `epoch(e, start_batch)` iterates an epoch."""

    def __init__(
        self, info: DatasetInfo, split: str, cfg: DataConfig, rank: int, world_size: int, train: bool, seed: int
    ) -> None:
        self.split_info = info.split(split)
        mean, std = normalization(cfg, info.mean, info.std)
        super().__init__(cfg, self.split_info.num_samples, mean, std, rank, world_size, train, seed)
        info.check_size(split, world_size, self.batch_size)
        if not cfg.urls:  # remote shards are checked as they are read
            info.check_files(split, "wds", checksums=cfg.check_checksums)
        self.urls = shard_urls(info, split, cfg.urls)
        self.counts = [s.num_samples for s in self.split_info.shards]
        self.num_workers = cfg.num_workers
        self.shuffle_buffer = cfg.shuffle_buffer
        self._transforms: dict[int, Callable] = {}
        self._stream: _EpochStream | None = None  # with its DataLoader: built once, workers kept
        self._dataloader: DataLoader | None = None

    def epoch(
        self, epoch: int, start_batch: int = 0, return_keys: bool = False, layouts: Sequence[Layout] = ()
    ) -> Iterator[Batch]:
        """The rank's batches start_batch .. of `epoch`; after `layouts` (earlier ways this epoch
        was read: another world size or worker count), batches of the samples they left.

        With `return_keys`, each batch also carries its samples' keys ("" for padding).
        """
        self._batches_from(epoch, start_batch, layouts)
        if self._dataloader is None:
            if self.num_workers:
                atexit.unregister(_end_loader_workers)  # once, and after multiprocessing's: runs before it
                atexit.register(_end_loader_workers)
            self._stream = _EpochStream(self)
            self._dataloader = DataLoader(
                self._stream,
                batch_size=None,
                num_workers=self.num_workers,
                worker_init_fn=_worker_init,
                pin_memory=torch.cuda.is_available(),
                prefetch_factor=4 if self.num_workers else None,
                persistent_workers=self.num_workers > 0,  # the workers live across epochs and evaluations
            )
        self._stream.plan.set(epoch, start_batch, return_keys, layouts)  # read by each worker as the epoch starts
        self.skipped.start(epoch)
        for *batch, bad in self._dataloader:
            for shard, key, why in bad:
                self.skipped.note(shard, key, why)
            yield tuple(batch)

    # -- the epoch's plan -------------------------------------------------------------------
    def _consumed(self, epoch: int, sequence: np.ndarray, k: int, layout: Layout, rank: int) -> np.ndarray:
        # each worker read its span through its shuffle buffer: what it delivered is replayed on positions
        batch = layout.batch_size or self.batch_size
        per_rank = batches_per_rank(len(sequence), layout.world_size, batch, True) * batch
        taken = []
        for span in worker_spans(per_rank // batch, layout.workers, batch):
            start = rank * per_rank + span.start
            positions = sequence[start : start + span.num_batches * batch]
            count = batches_to_skip(span.worker, layout.workers, layout.batches) * batch
            mixed = self.mix(iter(positions.tolist()), epoch, rank, span.worker, k)
            taken.append(np.fromiter(itertools.islice(mixed, count), dtype=np.int64, count=count))
        return np.concatenate(taken)

    def mix(self, stream: Iterator[Any], epoch: int, rank: int, worker: int, layout: int) -> Iterator[Any]:
        """A worker's samples through its seeded shuffle buffer (training); the order does not
        depend on what the samples are, so a plan can replay it on positions."""
        if not (self.train and self.shuffle_buffer > 1):
            return stream
        seed = int(layout_seed(self.seed, epoch, rank, worker, layout=layout).integers(2**31))
        shuffle: Callable = webdataset.filters.shuffle(
            self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(seed)
        )
        return shuffle(stream)

    # -- what one worker reads --------------------------------------------------------------
    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.urls)
        return epoch_rng(self.seed, epoch).permutation(n) if self.train else np.arange(n)

    def raw_samples(self, epoch: int, positions: np.ndarray) -> Iterator[dict[str, Any] | None]:
        """The samples at `positions` (ascending) of the epoch's sample sequence; None for each
        position -1 (past the rank's last real sample: evaluation pads its last batches)."""
        order = self.shard_order(epoch)
        real = positions[positions >= 0]
        offsets = np.concatenate([[0], np.cumsum(np.asarray(self.counts)[order])])
        for i, shard in enumerate(order):
            lo, hi = np.searchsorted(real, [offsets[i], offsets[i + 1]])
            if lo < hi:
                yield from self._read_shard(shard, real[lo:hi] - offsets[i])
        for _ in range(len(positions) - len(real)):
            yield None

    def _read_shard(self, shard: int, wanted: np.ndarray) -> Iterator[dict[str, Any]]:
        """The shard's samples at the (ascending) indices `wanted`; the others are read past,
        not decoded. A local shard is entered at the first wanted sample (its tar headers are
        skimmed for the offset), so a span starting mid-shard reads no data before it."""
        url, wanted_set, last = self.urls[shard], set(wanted.tolist()), int(wanted[-1])
        seen, source = 0, None
        try:
            if int(wanted[0]) > 0 and os.path.isfile(url):
                seen, source = _from_sample(url, int(wanted[0]))
            if source is None:
                source = webdataset.tariterators.tarfile_samples([{"url": reader_command(url)}])
            for sample in source:
                if seen in wanted_set:
                    sample["__url__"] = url  # as configured (a reader's command is wrapped)
                    yield sample
                seen += 1
                if seen > last:
                    return
        except Exception as err:  # noqa: BLE001 - tar, I/O and subprocess errors alike
            raise DatasetError(f"cannot read shard {url}: {err}") from err
        raise DatasetError(
            f"shard {url} holds {seen} samples but dataset.json records {self.counts[shard]}: "
            "it is truncated or from another conversion"
        )

    def transform(self, epoch: int) -> Callable:
        size = self.image_size(epoch)
        if size not in self._transforms:
            self._transforms[size] = sample_transform(self.cfg.augment, size, self.train)
        return self._transforms[size]

    def make_batch(self, samples: list[dict[str, Any] | None], return_keys: bool = False, epoch: int = 0) -> tuple:
        """(images, labels[, keys], bad): a sample that cannot be decoded is left out, its place
        taken by a copy of another of the batch when training (the batch keeps its size) or by
        padding when evaluating (not scored); `bad` lists (shard, key, why) for each."""
        images, labels, keys, bad = [], [], [], []
        size, transform = self.image_size(epoch), self.transform(epoch)
        for sample in samples:
            image = None
            if sample is not None:
                try:
                    image = transform(sample["jpg"])
                except Exception as err:  # noqa: BLE001 - any decoder's error: the file is bad, not the run
                    bad.append((sample.get("__url__", "?"), sample["__key__"], first_line(err)))
            if image is None:
                images.append(torch.zeros(3, size, size, dtype=torch.uint8))
                labels.append(PAD_LABEL)
                keys.append("")
                continue
            images.append(image)
            labels.append(int(sample["cls"]))
            keys.append(sample["__key__"])
        if bad and self.train:
            if len(bad) == len(samples):
                shard, key, why = bad[0]
                raise DatasetError(f"no sample of a training batch can be decoded (first: {key} in {shard}: {why})")
            _fill_from_neighbours(images, labels, keys)
        batch = (torch.stack(images), torch.tensor(labels, dtype=torch.long))
        return (*batch, keys, bad) if return_keys else (*batch, bad)


def _fill_from_neighbours(images: list, labels: list[int], keys: list[str]) -> None:
    """Training: each padded place (a bad sample) takes a copy of the nearest good sample
    before it (after it, at the start of the batch), so the batch keeps its size (mixup pairs
    samples) and is the same whenever it is read."""
    good = [i for i, label in enumerate(labels) if label != PAD_LABEL]
    for i, label in enumerate(labels):
        if label == PAD_LABEL:
            source = max((g for g in good if g < i), default=good[0])
            images[i], labels[i], keys[i] = images[source], labels[source], keys[source]


def _from_sample(path: str, index: int) -> tuple[int, Iterator[dict[str, Any]]]:
    """(the index reached, the samples of a local tar from there): the tar is indexed up to
    sample `index` (headers only) to find where its first member starts."""
    reached, offset = 0, 0
    samples = tar_samples(path)
    for sample in samples:
        if reached == index:
            offset = sample.offset
            break
        reached, offset = reached + 1, sample.end
    samples.close()
    f = open(path, "rb")  # noqa: SIM115 - handed to the sample stream, which reads it to the end
    f.seek(offset)
    stream = webdataset.tariterators.tar_file_expander([{"url": path, "stream": f}])
    return reached, webdataset.tariterators.group_by_keys(stream)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    ignore_stop_signals()


def _end_loader_workers() -> None:
    """At exit, before multiprocessing's own exit handler (atexit runs last-registered first):
    that handler ends daemon children with SIGTERM and waits, and loader workers ignore SIGTERM.
    They hold nothing to save, so the ones still there (a rank has one set per loader) are
    killed, all of them before any is waited for. torch's SIGCHLD handler, there to report a
    worker dying mid-epoch, would raise on the first one killed: it is put back to the default."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


MAX_LAYOUTS = 32


class _Plan:
    """Which epoch the persistent workers read next, in shared memory: the main process sets it
    before each epoch (or evaluation) starts, every worker reads it as its iteration begins."""

    def __init__(self) -> None:
        self.values = torch.zeros(4 + 4 * MAX_LAYOUTS, dtype=torch.int64).share_memory_()

    def set(self, epoch: int, start_batch: int, return_keys: bool, layouts: Sequence[Layout]) -> None:
        if len(layouts) > MAX_LAYOUTS:
            raise ValueError(f"an epoch read under more than {MAX_LAYOUTS} layouts")
        flat = [v for layout in layouts for v in dataclasses.astuple(layout)]
        self.values.zero_()
        self.values[: 4 + len(flat)] = torch.tensor([epoch, start_batch, int(return_keys), len(layouts), *flat])

    def get(self) -> tuple[int, int, bool, list[Layout]]:
        v = self.values.tolist()
        layouts = [Layout(*v[4 + 4 * i : 8 + 4 * i]) for i in range(v[3])]
        return v[0], v[1], bool(v[2]), layouts


class _EpochStream(IterableDataset):
    """The rank's batches of the epoch the plan names, for the worker that iterates it."""

    def __init__(self, loader: WebDatasetLoader) -> None:
        super().__init__()
        self.loader, self.plan = loader, _Plan()

    def __iter__(self) -> Iterator[Batch]:
        ld = self.loader
        epoch, start_batch, return_keys, layouts = self.plan.get()
        self.epoch, self.start_batch, self.return_keys = epoch, start_batch, return_keys
        self.sequence, self.layout = ld.sequence(epoch, layouts), len(layouts)
        info = get_worker_info()
        workers, index = (info.num_workers, info.id) if info else (1, 0)
        # DataLoader hands out batches round robin from worker 0; after a restart at batch k the
        # next batch belongs to logical worker k % workers, so roles are rotated.
        logical = (index + self.start_batch) % workers
        size = len(self.sequence)
        num_batches = batches_per_rank(size, ld.world_size, ld.batch_size, ld.train)
        span = worker_spans(num_batches, workers, ld.batch_size)[logical]
        rank_start, rank_end = rank_span(size, ld.world_size, ld.rank, ld.batch_size, ld.train)
        start = rank_start + span.start
        where = np.arange(start, start + span.num_batches * ld.batch_size)
        positions = np.where(where < rank_end, self.sequence[np.minimum(where, size - 1)], -1)
        stream = ld.mix(ld.raw_samples(self.epoch, positions), self.epoch, ld.rank, logical, self.layout)
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
                seed = layout_seed(ld.seed, self.epoch, ld.rank, number, layout=self.layout)
                with seeded(int(seed.integers(2**63))):
                    yield ld.make_batch(batch, self.return_keys, self.epoch)
                batch = []


def read_labels(urls: list[str]) -> list[tuple[str, int]]:
    """(key, label) of every sample in the local shard files, in order (tests and tools)."""
    out = []
    for url in urls:
        with open(url, "rb") as f:
            out.extend((sample.key, int(sample.read(f, "cls"))) for sample in tar_samples(url))
    return out


__all__ = ["WebDatasetLoader", "read_labels", "shard_urls"]
