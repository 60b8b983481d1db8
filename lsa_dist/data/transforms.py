"""Per-sample transforms (JPEG bytes -> uint8 image) and the per-batch step that turns uint8
batches into model input on the training device, assembled from timm and torchvision parts.

Loader workers only decode, crop, flip (and RandAugment): they hand uint8 batches over, a
quarter of the bytes of float ones. Normalisation and random erasing run per batch where the
batch is used (`ModelInput`, on the GPU when there is one), as timm's prefetching loader does.

Recipes:
  imagenet  random resized crop, flip, RandAugment (timm, e.g. rand-m9-mstd0.5-inc1) per
            sample; random erasing per batch; mixup/cutmix with label smoothing per batch in
            the training loop (`build_mixup`). Eval (all recipes but cifar): timm's own eval
            transform, bicubic resize of the shorter side to image_size / crop_pct, center crop.
  basic     random resized crop and flip only (the decode-bound part of the imagenet recipe).
  cifar     random crop with zero padding, flip; eval: resize to image_size.
  none      resize and center crop, also for training.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2

from ..config import AugmentConfig, DataConfig

RECIPES = ("imagenet", "basic", "cifar", "none")
SampleTransform = Callable[[bytes], torch.Tensor]


def decode_pil(data: bytes) -> Image.Image:
    """JPEG bytes -> RGB PIL image (simplejpeg; Pillow for anything that is not baseline JPEG)."""
    try:
        return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    except ValueError:
        return Image.open(io.BytesIO(data)).convert("RGB")


def decode_tensor(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W) tensor (a channels-last view of simplejpeg's output)."""
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        pixels = np.asarray(decode_pil(data))
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _interp(name: str) -> v2.InterpolationMode:
    return v2.InterpolationMode(name)


def _check_recipe(aug: AugmentConfig) -> None:
    if aug.recipe not in RECIPES:
        raise ValueError(f"data.augment.recipe must be one of {', '.join(RECIPES)}, got {aug.recipe!r}")


def sample_transform(aug: AugmentConfig, image_size: int, train: bool) -> SampleTransform:
    """JPEG bytes -> uint8 (3, image_size, image_size) tensor."""
    _check_recipe(aug)
    size, interp = image_size, _interp(aug.interpolation)
    if train and aug.recipe == "imagenet":
        pil = create_transform(
            input_size=size,
            is_training=True,
            scale=tuple(aug.scale),
            ratio=tuple(aug.ratio),
            hflip=aug.hflip,
            auto_augment=aug.rand_augment or None,
            color_jitter=aug.color_jitter or 0.0,
            interpolation=aug.interpolation,
            use_prefetcher=True,  # uint8 tensor out; erasing and normalisation happen per batch
        )
        return lambda data: pil(decode_pil(data))
    if train and aug.recipe == "basic":
        ops = [v2.RandomResizedCrop(size, tuple(aug.scale), tuple(aug.ratio), interp, antialias=True)]
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    elif train and aug.recipe == "cifar":
        ops = [v2.Resize(size, interp, antialias=True), v2.RandomCrop(size, padding=aug.cifar_padding)]
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    elif aug.recipe == "cifar":
        ops = [v2.Resize(size, interp, antialias=True), v2.CenterCrop(size)]
    else:  # evaluation, and training with recipe "none": exactly timm's eval preprocessing (PIL)
        pil = create_transform(
            input_size=size, crop_pct=aug.crop_pct, interpolation=aug.interpolation, use_prefetcher=True
        )
        return lambda data: pil(decode_pil(data))
    pipeline = v2.Compose(ops)
    return lambda data: pipeline(decode_tensor(data))


def normalization(cfg: DataConfig, dataset_mean: Sequence[float], dataset_std: Sequence[float]) -> tuple:
    """(mean, std) in [0, 1] units: timm's ImageNet constants (what the paper's weights were
    trained with) for data.normalize=imagenet, the dataset's measured ones for `dataset`."""
    if cfg.normalize == "dataset":
        return tuple(dataset_mean), tuple(dataset_std)
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


class ModelInput:
    """uint8 batch -> normalised float batch (+ random erasing when training), on the batch's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], aug: AugmentConfig, train: bool) -> None:
        self.mean = torch.tensor([255 * m for m in mean]).view(1, 3, 1, 1)
        self.inv_std = torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copies resident per device
        self.erase_prob = aug.reprob if train and aug.recipe == "imagenet" else 0.0
        self.erase_mode = aug.remode

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = images.device
        if device not in self._on:  # once: not a copy from pageable memory every batch
            self._on[device] = (self.mean.to(device), self.inv_std.to(device))
        mean, inv_std = self._on[device]
        out = images.float().sub_(mean).mul_(inv_std)
        if self.erase_prob > 0:
            out = RandomErasing(self.erase_prob, mode=self.erase_mode, device=device)(out)
        return out


def build_mixup(aug: AugmentConfig, num_classes: int) -> Mixup | None:
    """timm's batch mixup/cutmix with label smoothing, or None when both are off."""
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=aug.mixup_prob,
        switch_prob=aug.mixup_switch_prob,
        label_smoothing=aug.label_smoothing,
        num_classes=num_classes,
    )
