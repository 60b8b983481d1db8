#!/usr/bin/env python
"""Write an ImageNet-like folder of photographic JPEGs for benchmarks.

ImageNet cannot be downloaded here, and the digits demo (32 px) says nothing about decode
cost at ImageNet sizes. These images are random crops, flips and colour shifts of the two
real photographs that ship with scikit-learn (china.jpg, flower.jpg), stored like ImageNet's
originals: longer side mostly 500 px (300-500), various aspect ratios, some sensor-like grain, JPEG quality 90
(about 60 KB per image; ImageNet's average is about 110 KB, real photographs carrying more
detail, so decoding originals costs a little less here than on ImageNet).

    python tools/make_photo_dataset.py --out data/photos --classes 10 --per-class 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def source_photos(seed: int = 0) -> list[Image.Image]:
    """The photographs the images are cut from: scikit-learn's two sample photographs where it is
    installed, else two generated 640x427 scenes (smooth colour fields with edges and texture, as
    costly to decode as photographs), so that a machine with numpy and Pillow alone can run this."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        rng = np.random.default_rng(seed)
        photos = []
        for _ in range(2):
            coarse = rng.uniform(0, 255, (7, 10, 3)).astype(np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((640, 427), Image.Resampling.BICUBIC), np.float32)
            stripes = 40 * np.sin(np.arange(640) / rng.uniform(3, 12))[None, :, None]
            field += np.where(np.arange(427)[:, None, None] > rng.integers(100, 300), stripes, 0)
            field += rng.normal(0, 20, field.shape)
            photos.append(Image.fromarray(field.clip(0, 255).astype(np.uint8)))
        return photos
    return [Image.fromarray(p) for p in load_sample_images().images]


def make_photo_dataset(
    out: Path, classes: int = 10, per_class: int = 200, val_per_class: int = 20, seed: int = 0, grain: float = 12.0
) -> int:
    """Write train/<wnid>/ and val/<wnid>/ folders; returns the number of images written."""
    photos = source_photos(seed)
    rng = np.random.default_rng(seed)
    written = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = out / split / f"n8{c:07d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                photo = photos[int(rng.integers(len(photos)))]
                w, h = photo.size
                cw, ch = int(rng.integers(w // 3, w + 1)), int(rng.integers(h // 3, h + 1))
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                image = photo.crop((x, y, x + cw, y + ch))
                if rng.random() < 0.5:
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                image = ImageEnhance.Color(image).enhance(float(rng.uniform(0.6, 1.4)))
                image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.8, 1.2)))
                side = 500 if rng.random() < 0.7 else int(rng.integers(300, 500))  # as ImageNet: mostly 500 px
                scale = side / max(image.size)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                pixels = np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
                # sensor-like grain: real photographs are far less smooth than upscaled crops
                pixels += rng.normal(0.0, grain, pixels.shape).astype(np.float32)
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                image.save(folder / f"n8{c:07d}_{split}_{i}.JPEG", quality=90)
                written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/photos"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=200, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = make_photo_dataset(args.out, args.classes, args.per_class, args.val_per_class, args.seed)
    print(f"wrote {n} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
