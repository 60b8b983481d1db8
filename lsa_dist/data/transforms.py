"""Train/eval transforms and mixup/cutmix, assembled from timm and torchvision parts.

Recipes:
  imagenet  random resized crop, flip, RandAugment (timm, e.g. rand-m9-mstd0.5-inc1), random
            erasing; eval resizes to image_size / crop_pct and center-crops. Mixup/cutmix with
            label smoothing are applied per batch by the training loop (`build_mixup`).
  cifar     random crop with padding, flip; eval: resize to image_size if needed.
  basic     random resized crop and flip only (the decode-bound part of the imagenet recipe).
  none      resize and center crop, also for training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from timm.data import Mixup, create_transform
from torchvision import transforms as T

from ..config import AugmentConfig

RECIPES = ("imagenet", "cifar", "basic", "none")


def _interp(name: str) -> T.InterpolationMode:
    return T.InterpolationMode(name)


def train_transform(
    aug: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor (3, image_size, image_size) for training."""
    if aug.recipe == "imagenet":
        return create_transform(
            input_size=image_size,
            is_training=True,
            scale=tuple(aug.scale),
            ratio=tuple(aug.ratio),
            hflip=aug.hflip,
            auto_augment=aug.rand_augment or None,
            color_jitter=aug.color_jitter or 0.0,
            interpolation=aug.interpolation,
            re_prob=aug.reprob,
            re_mode=aug.remode,
            mean=tuple(mean),
            std=tuple(std),
        )
    if aug.recipe == "basic":
        return T.Compose(
            [
                T.RandomResizedCrop(
                    image_size, scale=tuple(aug.scale), ratio=tuple(aug.ratio), interpolation=_interp(aug.interpolation)
                ),
                T.RandomHorizontalFlip(aug.hflip),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    if aug.recipe == "cifar":
        return T.Compose(
            [
                T.Resize(image_size, interpolation=_interp(aug.interpolation)),
                T.RandomCrop(image_size, padding=aug.cifar_padding),
                T.RandomHorizontalFlip(aug.hflip),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    if aug.recipe == "none":
        return eval_transform(aug, image_size, mean, std)
    raise ValueError(f"data.augment.recipe must be one of {', '.join(RECIPES)}, got {aug.recipe!r}")


def eval_transform(
    aug: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor: resize to image_size / crop_pct, center crop."""
    if aug.recipe == "cifar":
        return T.Compose(
            [
                T.Resize(image_size, interpolation=_interp(aug.interpolation)),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    return create_transform(
        input_size=image_size,
        is_training=False,
        interpolation=aug.interpolation,
        crop_pct=aug.crop_pct,
        mean=tuple(mean),
        std=tuple(std),
    )


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
