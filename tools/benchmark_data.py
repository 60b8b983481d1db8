#!/usr/bin/env python
"""Images/s delivered by the WebDataset and FFCV pipelines at 224 px training augmentation,
against two baselines measured in the same run:

  imagefolder   torchvision.datasets.ImageFolder + DataLoader over the original JPEGs with
                the usual PIL transforms ending in ToTensor + Normalize (what users would
                otherwise run), same workers
  decode limit  our per-sample work (decode + random-resized-crop + flip of the stored
                images) in a tight loop, one process per worker, no loader around it

Our pipelines are timed twice: delivering the contract's uint8 batches (normalised on the
training device, free on a GPU), and with `to_model_input` normalising them in the main
process, as CPU training does.

    python tools/benchmark_data.py [--src DIR] [--workers 2] [--batch-size 64] [--recipe basic] [--json out.json]

Without --src, a photographic ImageNet-like folder is generated (tools/make_photo_dataset.py)
and converted with tools/convert_imagenet.py's defaults. `--recipe basic` is random resized
crop + flip + normalise (the decode-bound part of training input); `imagenet` adds
RandAugment and random erasing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_photo_dataset import make_photo_dataset  # noqa: E402

from lsa_dist.config import AugmentConfig, DataConfig  # noqa: E402
from lsa_dist.data import build_loader, load_dataset_info  # noqa: E402
from lsa_dist.data.convert import ConvertOptions, convert  # noqa: E402
from lsa_dist.data.transforms import sample_transform  # noqa: E402
from lsa_dist.data.wds import read_labels  # noqa: E402


def _rate_of(batches, max_batches: int, batch_size: int, finish=None) -> float:  # noqa: ANN001
    """Images/s over `max_batches` batches after the first (worker start-up excluded)."""
    iterator = iter(batches)
    next(iterator)
    start, n = time.perf_counter(), 0
    for _ in range(max_batches):
        try:
            images = next(iterator)[0]
        except StopIteration:
            break
        if finish is not None:
            finish(images)
        n += 1
    return n * batch_size / (time.perf_counter() - start)


def _users_transform(recipe: str, mean: tuple, std: tuple):  # noqa: ANN202
    """The float-output PIL transforms an ImageFolder user writes (timm's for the imagenet recipe)."""
    from timm.data import create_transform
    from torchvision import transforms as T

    if recipe == "imagenet":
        return create_transform(
            224,
            is_training=True,
            auto_augment="rand-m9-mstd0.5-inc1",
            re_prob=0.25,
            re_mode="pixel",
            interpolation="bicubic",
            mean=mean,
            std=std,
        )
    return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def _decode_loop(args: tuple) -> float:
    blobs, transform_args, seconds = args
    torch.set_num_threads(1)
    transform = sample_transform(*transform_args)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        transform(blobs[n % len(blobs)])
        n += 1
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=None, help="ImageNet-layout folder (default: generate one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per pipeline (default 30)")
    parser.add_argument("--recipe", default="basic", choices=["basic", "imagenet"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="lsa-bench-data-"))
    try:
        src = args.src
        if src is None:
            src = work / "photos"
            make_photo_dataset(src, classes=10, per_class=250, val_per_class=0)
        convert(src, work / "out", "both", ("train",), ConvertOptions(), workers=os.cpu_count() or 1)
        info = load_dataset_info(work / "out")
        aug = AugmentConfig(recipe=args.recipe)
        results = {}

        from torchvision import datasets

        folder = datasets.ImageFolder(src / "train", transform=_users_transform(args.recipe, info.mean, info.std))
        loader = torch.utils.data.DataLoader(
            folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
        )
        results["imagefolder (originals)"] = _rate_of(loader, args.batches, args.batch_size)

        for fmt in ("wds", "ffcv"):
            cfg = DataConfig(
                format=fmt,
                root=str(work / "out"),
                image_size=224,
                batch_size=args.batch_size,
                num_workers=args.workers,
                augment=aug,
            )
            pipeline = build_loader(cfg, "train", 0, 1, train=True, info=info)
            if fmt == "ffcv":
                for _ in pipeline.epoch(0):  # first epoch compiles FFCV's pipeline (numba)
                    pass
            results[f"lsa_dist {fmt} (uint8)"] = _rate_of(pipeline.epoch(1), args.batches, args.batch_size)
            rate = _rate_of(pipeline.epoch(2), args.batches, args.batch_size, pipeline.to_model_input)
            results[f"lsa_dist {fmt} + normalise"] = rate

        shard = work / "out" / "wds" / "train-000000.tar"
        import tarfile

        with tarfile.open(shard) as tar:
            blobs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
        per_worker = [(blobs, (aug, 224, True), 5.0)] * args.workers
        with mp.get_context("fork").Pool(args.workers) as pool:
            results["decode limit"] = sum(pool.map(_decode_loop, per_worker))
        assert len(read_labels([str(shard)])) == len(blobs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base, limit = results["imagefolder (originals)"], results["decode limit"]
    print(f"\n{args.recipe} augmentation at 224 px, batch {args.batch_size}, {args.workers} workers")
    print(f"{'pipeline':<30} {'images/s':>9} {'vs imagefolder':>15} {'of decode limit':>16}")
    for name, rate in results.items():
        print(f"{name:<30} {rate:>9.0f} {rate / base:>14.2f}x {rate / limit:>15.0%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "recipe": args.recipe,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "images_per_s": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
