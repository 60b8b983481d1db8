#!/usr/bin/env python
"""Write the built-in demo dataset as an ImageNet-layout folder.

The images are scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes, shipped
inside the scikit-learn package) upscaled to 32x32 RGB JPEGs. The layout mirrors ImageNet's:
train/<wnid>/<wnid>_<n>.JPEG, a flat val/ folder with LOC_val_solution.csv, and
LOC_synset_mapping.txt, so the demo exercises the same converter paths as ImageNet.

    python tools/make_demo_dataset.py --out data/demo/imagenet [--val-fraction 0.2] [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def wnid(digit: int) -> str:
    return f"n9{digit:07d}"


def make_demo_dataset(out: Path, val_fraction: float = 0.2, seed: int = 0, size: int = 32) -> dict[str, int]:
    """Write the folder; returns the number of images per split. Replaces an earlier demo folder."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "val").mkdir(parents=True)
    val_rows = ["ImageId,PredictionString"]
    counts = {"train": 0, "val": 0}
    for digit in range(10):
        (tmp / "train" / wnid(digit)).mkdir(parents=True)
        members = np.flatnonzero(labels == digit)
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        for rank, index in enumerate(members):
            pixels = (images[index] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            if rank < n_val:
                image_id = f"DEMO_val_{index:08d}"
                image.save(tmp / "val" / f"{image_id}.JPEG", quality=95)
                val_rows.append(f"{image_id},{wnid(digit)} 0 0 {size - 1} {size - 1}")
                counts["val"] += 1
            else:
                image.save(tmp / "train" / wnid(digit) / f"{wnid(digit)}_{index}.JPEG", quality=95)
                counts["train"] += 1
    (tmp / "LOC_val_solution.csv").write_text("\n".join(val_rows) + "\n")
    (tmp / "LOC_synset_mapping.txt").write_text("".join(f"{wnid(d)} digit {NAMES[d]}\n" for d in range(10)))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo/imagenet"), help="folder to write (replaced)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must be between 0 and 1")
    counts = make_demo_dataset(args.out, args.val_fraction, args.seed, args.size)
    print(f"wrote {counts['train']} training and {counts['val']} validation images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
