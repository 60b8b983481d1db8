"""FFCV pipeline and .beton writing, with the same batch contract as the WebDataset pipeline.

Decoding with random-resized-crop (train) or center crop (eval) and flips run in FFCV's
compiled pipeline. RandAugment of the imagenet recipe has no FFCV operation: it runs on the
decoded uint8 batch (torchvision's tensor RandAugment, 2 ops at the recipe's magnitude, each op
once per group of images that drew it) in a background thread two batches ahead of the trainer,
on its own CUDA stream on a GPU, its choices from its own seeded generator, so FFCV's ImageNet
recipe differs from timm's in RandAugment's details. Normalisation and random
erasing are applied per batch by `to_model_input`, as for WebDataset.

Each epoch gets its own index list (permuted with (seed, epoch), cut per rank as in plan.py)
and FFCV reads it in that order; a restart at (epoch, batch) starts the list at that batch.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from ..config import DataConfig
from ..fs import sha256_file
from .dataset import DatasetError, DatasetInfo
from .loader import EpochLoader
from .plan import PAD_LABEL, Layout, epoch_rng, rank_span
from .tar_index import TarMember, read_member, tar_samples
from .transforms import decode_pil, normalization

Batch = tuple[torch.Tensor, torch.Tensor]
# compiled ffcv Loaders of this process, by what their pipeline is: its numba compilation takes
# 5-15 s, so a loader built again with the same file and pipeline (another rank's in one
# process, a rebuilt evaluation loader) takes the compiled one, unless one is reading from it
_COMPILED: dict[tuple, Any] = {}
_READING: set[int] = set()  # id() of the compiled Loaders an epoch is being read from


def require_ffcv() -> None:
    """Fail with what to do when FFCV is not importable."""
    try:
        import ffcv  # noqa: F401
    except ImportError as err:
        raise DatasetError(
            f"FFCV is not installed ({err}); run 'make setup' (it installs FFCV and its system libraries) "
            "or convert with --format wds"
        ) from err


class _ShardImages:
    """Random access to the images of tar shards: (RGB uint8 array, label) by index."""

    def __init__(self, shards: Sequence[Path]) -> None:
        self.entries: list[tuple[Path, TarMember, int]] = []  # (shard, its image member, label)
        for shard in shards:
            with shard.open("rb") as f:
                for sample in tar_samples(shard):
                    if "jpg" in sample.fields and "cls" in sample.fields:
                        self.entries.append((shard, sample.fields["jpg"], int(sample.read(f, "cls"))))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        shard, image, label = self.entries[index]
        with shard.open("rb") as f:
            data = read_member(f, image)
        return np.asarray(decode_pil(data)), label


def write_beton(shards: Sequence[Path], target: Path, quality: int, workers: int) -> dict[str, Any]:
    """Write the shards' images into one FFCV file (atomically); returns its size and checksum.
    The images keep the size the converter gave them (no max_resolution: it would cut the
    longer side of a panorama that --min-side kept large)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    images = _ShardImages(shards)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        fields = {
            "image": RGBImageField(write_mode="jpg", max_resolution=None, jpeg_quality=quality),
            "label": IntField(),
        }
        DatasetWriter(str(tmp), fields, num_workers=max(1, workers)).from_indexed_dataset(images)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return {"num_samples": len(images), "bytes": target.stat().st_size, "sha256": sha256_file(target)}


class FfcvLoader(EpochLoader):
    """Batches of one split for one rank, read by ffcv.loader.Loader."""

    def __init__(
        self, info: DatasetInfo, split: str, cfg: DataConfig, rank: int, world_size: int, train: bool, seed: int
    ) -> None:
        require_ffcv()
        self.path = info.beton_path(split)
        mean, std = normalization(cfg, info.mean, info.std)
        super().__init__(cfg, info.split(split).num_samples, mean, std, rank, world_size, train, seed)
        info.check_size(split, world_size, self.batch_size)
        info.check_files(split, "ffcv")
        # batches arrive on the training device (the trainer has chosen it before the loaders)
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.rand_augment = None
        aug = cfg.augment
        if train and aug.recipe == "imagenet" and aug.rand_augment:
            spec = aug.rand_augment
            magnitude = int(spec.split("-m")[1].split("-")[0]) if "-m" in spec else 9
            self.rand_augment = SeededRandAugment(num_ops=2, magnitude=magnitude)

    def indices(self, epoch: int, layouts: Sequence[Layout] = ()) -> np.ndarray:
        """This rank's sample indices for `epoch` (after `layouts`: of the samples they left), in
        reading order."""
        order = epoch_rng(self.seed, epoch).permutation(self.num_samples) if self.train else np.arange(self.num_samples)
        sequence = self.sequence(epoch, layouts)
        start, end = rank_span(len(sequence), self.world_size, self.rank, self.batch_size, self.train)
        return order[sequence[start:end]]

    def _pipelines(self, size: int) -> dict[str, list]:
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.transforms import (
            RandomHorizontalFlip,
            RandomTranslate,
            Squeeze,
            ToTensor,
            ToTorchImage,
        )

        aug = self.cfg.augment
        if not self.train:
            ratio = 1.0 if aug.recipe == "cifar" else aug.crop_pct
            image: list = [CenterCropRGBImageDecoder((size, size), ratio=ratio)]
        elif aug.recipe == "cifar":
            image = [
                CenterCropRGBImageDecoder((size, size), ratio=1.0),
                RandomTranslate(padding=aug.cifar_padding),
                RandomHorizontalFlip(aug.hflip),
            ]
        elif aug.recipe == "none":
            image = [CenterCropRGBImageDecoder((size, size), ratio=aug.crop_pct)]
        else:
            image = [
                RandomResizedCropRGBImageDecoder((size, size), scale=tuple(aug.scale), ratio=tuple(aug.ratio)),
                RandomHorizontalFlip(aug.hflip),
            ]
        image += [ToTensor(), ToTorchImage()]  # uint8; to_model_input normalises per batch, on the device
        label = [IntDecoder(), ToTensor(), Squeeze()]
        if self.device.type == "cuda":  # FFCV copies its batches to the GPU itself, asynchronously
            from ffcv.transforms import ToDevice

            image.append(ToDevice(self.device, non_blocking=True))
            label.append(ToDevice(self.device, non_blocking=True))
        return {"image": image, "label": label}

    def _loader(self, indices: np.ndarray, size: int):  # noqa: ANN202 - ffcv.loader.Loader
        """A compiled ffcv Loader for this pipeline at `size`, kept for the process's life (its
        pipeline is compiled once), with its order set to `indices`."""
        from ffcv.loader import Loader, OrderOption

        workers = max(1, self.cfg.num_workers)
        key = (str(self.path), self.batch_size, workers, size, self.train, repr(self.cfg.augment), str(self.device))
        loader = _COMPILED.get(key)
        if loader is None or id(loader) in _READING:
            loader = Loader(
                str(self.path),
                batch_size=self.batch_size,
                num_workers=workers,
                order=OrderOption.SEQUENTIAL,
                indices=indices,
                pipelines=self._pipelines(size),
                drop_last=False,
            )
            _COMPILED.setdefault(key, loader)
        # ffcv asks its traversal order for each epoch's sample order and sizes the epoch by the
        # first one; both are pointed at this epoch's list.
        loader.traversal_order = _GivenOrder(indices)
        loader.first_traversal_order = indices
        return loader

    def epoch(
        self, epoch: int, start_batch: int = 0, return_keys: bool = False, layouts: Sequence[Layout] = ()
    ) -> Iterator[Batch]:
        """The rank's batches start_batch .. of `epoch` (after `layouts`: of the samples they left).

        The samples and their order are deterministic; FFCV's crop and flip randomness is not.
        With `return_keys`, each batch also carries its samples' indices in the file (-1: padding).
        """
        num_batches = self._batches_from(epoch, start_batch, layouts)
        indices = self.indices(epoch, layouts)[start_batch * self.batch_size : num_batches * self.batch_size]
        produced = start_batch
        if len(indices):
            loader = self._loader(indices, self.image_size(epoch))
            _READING.add(id(loader))
            reader = batches = iter(loader)
            try:
                if self.rand_augment is not None:  # in a thread beside the training step
                    batches = _augmented(reader, self.rand_augment, (self.seed, epoch, self.rank, start_batch))
                for images, labels in batches:
                    if self.rand_augment is None:
                        images, labels = images.clone(), labels.clone().view(-1).long()  # FFCV reuses its buffers
                    batch = self._pad(images, labels)
                    taken = (produced - start_batch) * self.batch_size
                    keys = indices[taken : taken + len(labels)].tolist()
                    yield (*batch, keys + [-1] * (self.batch_size - len(keys))) if return_keys else batch
                    produced += 1
            finally:  # read to the end or left early: the augmenting thread ends, then FFCV's
                if batches is not reader:
                    batches.close()
                reader.close()
                _READING.discard(id(loader))
        while produced < num_batches:  # a rank with fewer evaluation samples
            size = self.cfg.image_size
            empty = torch.zeros(0, 3, size, size, dtype=torch.uint8, device=self.device)
            batch = self._pad(empty, torch.zeros(0, dtype=torch.long, device=self.device))
            yield (*batch, [-1] * self.batch_size) if return_keys else batch
            produced += 1

    def _pad(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        missing = self.batch_size - len(labels)
        if missing <= 0:
            return images.contiguous(), labels
        pad = torch.zeros(missing, *images.shape[1:], dtype=images.dtype, device=images.device)
        fill = torch.full((missing,), PAD_LABEL, device=labels.device)
        return torch.cat([images, pad]).contiguous(), torch.cat([labels, fill])


class SeededRandAugment(v2.RandAugment):
    """torchvision's RandAugment with its choices (operation, sign) drawn from a generator the
    caller gives, not torch's global one: it can run in another thread without touching the
    training step's random streams, and the same seed gives the same augmentation."""

    def augment(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        height, width = image.shape[-2:]
        space = list(self._AUGMENTATION_SPACE.items())
        for _ in range(self.num_ops):
            transform_id, (magnitudes_fn, signed) = space[int(rng.integers(len(space)))]
            magnitudes = magnitudes_fn(self.num_magnitude_bins, height, width)
            magnitude = 0.0 if magnitudes is None else float(magnitudes[self.magnitude])
            if signed and rng.random() <= 0.5:
                magnitude = -magnitude
            image = self._apply_image_or_video_transform(
                image, transform_id, magnitude, interpolation=self.interpolation, fill=self._fill
            )
        return image

    def augment_batch(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The batch (B, C, H, W) as `augment` leaves each image, drawing in the same order, with
        each operation run once per group of images that drew it (sorted together by one index,
        its host copy pinned): on a GPU a few batched kernels instead of two small kernel chains,
        and two pageable-memory copies of an affine matrix, per image."""
        height, width = images.shape[-2:]
        space = list(self._AUGMENTATION_SPACE.items())
        draws = np.zeros((len(images), self.num_ops), dtype=np.int64)  # operation * 2 + negative
        for i in range(len(images)):
            for r in range(self.num_ops):
                op = int(rng.integers(len(space)))
                negative = space[op][1][1] and rng.random() <= 0.5
                draws[i, r] = 2 * op + int(negative)
        out = images
        for r in range(self.num_ops):
            order = np.argsort(draws[:, r], kind="stable")
            keys, starts = np.unique(draws[order, r], return_index=True)
            pieces = []
            grouped = out.index_select(0, _to_device(order, out.device))
            for key, start, end in zip(keys, starts, [*starts[1:], len(order)]):
                transform_id, (magnitudes_fn, _) = space[int(key) // 2]
                magnitudes = magnitudes_fn(self.num_magnitude_bins, height, width)
                magnitude = 0.0 if magnitudes is None else float(magnitudes[self.magnitude])
                pieces.append(
                    self._apply_image_or_video_transform(
                        grouped[start:end],
                        transform_id,
                        -magnitude if key % 2 else magnitude,
                        interpolation=self.interpolation,
                        fill=self._fill,
                    )
                )
            out = torch.cat(pieces).index_select(0, _to_device(np.argsort(order), out.device))
        return out


def _to_device(index: np.ndarray, device: torch.device) -> torch.Tensor:
    """An index on `device`: copied from pinned memory, without waiting on the host."""
    tensor = torch.from_numpy(index)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _augmented(batches: Iterator[Batch], augment: SeededRandAugment, key: tuple[int, ...]) -> Iterator[Batch]:
    """FFCV's batches copied out of its buffers and RandAugmented, batched, in a background
    thread, two batches ahead, while the trainer runs its step (torch's kernels release the GIL);
    batch k's choices come from a generator seeded with (seed, epoch, rank, start batch, k).
    On a GPU the thread works on its own CUDA stream (FFCV's batches are taken inside it), and
    each batch carries an event the training stream waits for: no host synchronisation with the
    training step, and its kernels are not queued behind the augmentation's."""
    out: queue.Queue = queue.Queue(maxsize=2)
    done = threading.Event()
    side = torch.cuda.Stream() if torch.cuda.is_available() else None

    def produce() -> None:
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for k, (images, labels) in enumerate(batches):
                    rng = np.random.default_rng([*key, k])
                    images = augment.augment_batch(images.clone(), rng)
                    labels = labels.clone().view(-1).long()
                    ready = None
                    if side is not None and images.is_cuda:
                        ready = torch.cuda.Event()
                        ready.record(side)
                    item: Any = (images, labels, ready)
                    while not done.is_set():
                        try:
                            out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if done.is_set():
                        return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            out.put(err)
            return
        out.put(None)

    thread = threading.Thread(target=produce, name="ffcv-randaugment", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            images, labels, ready = item
            if ready is not None:  # the training stream waits on the device, not the host
                stream = torch.cuda.current_stream(images.device)
                stream.wait_event(ready)
                images.record_stream(stream)  # made on the side stream, used on this one
                labels.record_stream(stream)
            yield images, labels
    finally:  # the consumer stopped early (a stop request, max_steps): end the thread first
        done.set()
        thread.join()


class _GivenOrder:
    """An ffcv traversal order that returns a fixed list of sample indices."""

    def __init__(self, indices: np.ndarray) -> None:
        self.indices = indices

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.indices


def beton_labels(path: Path) -> list[int]:
    """Every label of a .beton in order (tests and tools)."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(
        str(path),
        batch_size=256,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": None, "label": [IntDecoder(), ToTensor()]},
    )
    return [int(v) for (labels,) in loader for v in labels.view(-1)]


__all__ = ["FfcvLoader", "beton_labels", "require_ffcv", "write_beton"]
