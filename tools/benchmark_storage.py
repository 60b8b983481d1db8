#!/usr/bin/env python
"""What the converter's stored size costs and keeps: disk, decode speed, and the pixels that
evaluation and training crops get, for several --max-side / --min-side choices, against the
original JPEGs measured in the same run.

Rows: the originals, and each option's stored images (processed exactly as the converter
does). Columns: mean stored size, disk per 1,000 images, images/s per core of decode + the
training crop (random resized crop 224 and flip) and of decode + the evaluation crop (timm's:
shorter side to 256, center 224), and the share of images that evaluation must upsample
(shorter side under 256 px).

    python tools/benchmark_storage.py [--src DIR] [--images N] [--json out.json]

Without --src, a photographic ImageNet-like folder is generated first (tools/make_photo_dataset.py),
with some larger originals (up to 1000 px) to show what each option cuts.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_photo_dataset import make_photo_dataset  # noqa: E402

from lsa_dist.config import AugmentConfig  # noqa: E402
from lsa_dist.data.convert import ConvertOptions, process_image  # noqa: E402
from lsa_dist.data.imagenet import scan_imagenet  # noqa: E402
from lsa_dist.data.transforms import sample_transform  # noqa: E402

OPTIONS = {  # label: (max_side, min_side)
    "--max-side 256 --min-side 0 (before)": (256, 0),
    "--max-side 384 --min-side 256": (384, 256),
    "--max-side 500 --min-side 256 (default)": (500, 256),
}


def _rate(transform, blobs: list[bytes]) -> float:  # noqa: ANN001
    """Images/s of `transform` over `blobs` in this one process (one core)."""
    transform(blobs[0])
    start = time.perf_counter()
    for data in blobs:
        transform(data)
    return len(blobs) / (time.perf_counter() - start)


def measure(blobs: list[bytes], image_size: int = 224) -> dict[str, float]:
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
    train = sample_transform(AugmentConfig(recipe="basic"), image_size, train=True)
    evaluate = sample_transform(AugmentConfig(), image_size, train=False)
    need = round(image_size / AugmentConfig().crop_pct)
    return {
        "mean_width": float(np.mean([w for w, _ in sizes])),
        "mean_height": float(np.mean([h for _, h in sizes])),
        "mb_per_1000": sum(len(b) for b in blobs) / len(blobs) * 1000 / 2**20,
        "train_images_per_s": _rate(train, blobs),
        "eval_images_per_s": _rate(evaluate, blobs),
        "eval_upsampled_pct": 100.0 * sum(min(s) < need for s in sizes) / len(sizes),
    }


def enlarge_some(src: Path, share: float = 0.3, seed: int = 0) -> None:
    """ImageNet has originals larger than 500 px: scale a share of the generated ones up to 1000."""
    rng = np.random.default_rng(seed)
    for path in sorted(src.rglob("*.JPEG")):
        if rng.random() < share:
            image = Image.open(path)
            factor = float(rng.uniform(1.3, 2.0))
            image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC).save(
                path, quality=90
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=None, help="ImageNet-layout folder (default: generate one)")
    parser.add_argument("--images", type=int, default=500, help="images to generate without --src (default 500)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lsa-bench-storage-"))
    try:
        src = args.src
        if src is None:
            src = work / "photos"
            make_photo_dataset(src, classes=10, per_class=max(1, args.images // 10), val_per_class=0)
            enlarge_some(src)
        originals = [s.path.read_bytes() for s in scan_imagenet(src, ("train",)).splits["train"]]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    quality = ConvertOptions().jpeg_quality
    rows = {"original JPEGs": measure(originals)}
    for label, (max_side, min_side) in OPTIONS.items():
        stored = [process_image(b, max_side, quality, min_side).jpeg for b in originals]
        rows[label] = measure(stored)

    base = rows["original JPEGs"]
    print(f"\n{len(originals)} images, stored at JPEG quality {quality}; rates on one core, 224 px crops")
    print(f"{'stored as':<42} {'mean size':>10} {'MB/1000':>8} {'train img/s':>12} {'eval img/s':>11}", end="")
    print(f" {'eval upsamples':>15}")
    for label, r in rows.items():
        size = f"{r['mean_width']:.0f}x{r['mean_height']:.0f}"
        train = f"{r['train_images_per_s']:.0f} ({r['train_images_per_s'] / base['train_images_per_s']:.2f}x)"
        evaluate = f"{r['eval_images_per_s']:.0f} ({r['eval_images_per_s'] / base['eval_images_per_s']:.2f}x)"
        print(
            f"{label:<42} {size:>10} {r['mb_per_1000']:>8.1f} {train:>12} {evaluate:>11} "
            f"{r['eval_upsampled_pct']:>14.0f}%"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"images": len(originals), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
