"""The typed schema of a run.

YAML files in configs/ are instances of `RunConfig`; `key=value` overrides apply on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AugmentConfig:
    """Training augmentation (see lsa_dist.data.transforms for the recipes)."""

    recipe: str = "imagenet"  # imagenet | cifar | basic | none
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; "" for none
    color_jitter: float = 0.0
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize to image_size / crop_pct, center crop
    cifar_padding: int = 4
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class DataConfig:
    """Where the converted dataset is and how it is streamed."""

    format: str = "wds"  # wds | ffcv
    root: str = "data/demo/shards"  # the converter's --out folder (holds dataset.json)
    urls: str = ""  # WebDataset shard location template, e.g. "pipe:curl -s https://host/wds/{shard}"
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    batch_size: int = 64  # per rank
    eval_batch_size: int = 0  # per rank; 0 = batch_size
    num_workers: int = 4
    shuffle_buffer: int = 2000
    check_checksums: bool = False  # re-hash every data file before training (slow on ImageNet)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
