#!/usr/bin/env python
"""Convert an ImageNet folder into WebDataset tar shards and/or FFCV .beton files.

    python tools/convert_imagenet.py --src /data/imagenet --out /data/imagenet-lsa --format both

Output: OUT/wds/{train,val}-NNNNNN.tar (keys 'jpg' and 'cls'), OUT/ffcv/{train,val}.beton and
OUT/dataset.json (classes, shards with sample counts and checksums, skipped files, options,
the training set's mean/std). Re-running after an interruption finishes what is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsa_dist.data.convert import FORMATS, ConversionError, ConvertOptions, convert, summary  # noqa: E402
from lsa_dist.data.dataset import DatasetError  # noqa: E402
from lsa_dist.data.imagenet import SourceError  # noqa: E402
from lsa_dist.log import setup_logging  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", type=Path, required=True, help="ImageNet folder: train/<wnid>/*.JPEG, val/...")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; resumed if it exists)")
    parser.add_argument("--format", choices=FORMATS, default="both", help="what to write (default both)")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits (default train,val)")
    parser.add_argument(
        "--max-side", type=int, default=500, help="longer image side stored, px (default 500, as FFCV's ImageNet)"
    )
    parser.add_argument(
        "--min-side",
        type=int,
        default=256,
        help="no shorter side is brought below this, px (default 256: eval's 224/0.875 and full-scale crops)",
    )
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of stored images (default 90)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=ConvertOptions.max_pixels,
        help=f"skip larger images (decompression bombs; default {ConvertOptions.max_pixels}, Pillow's limit)",
    )
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="images per tar shard (default 1000)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (default: all cores)"
    )
    parser.add_argument("--limit-per-class", type=int, default=None, help="convert at most N images per class")
    parser.add_argument(
        "--val-labels",
        type=Path,
        default=None,
        help="LOC_val_solution.csv for a flat val/ folder (default: SRC/LOC_val_solution.csv)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the training shards' sample order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(0)  # the library's lines (a resumed conversion's count of finished shards)
    options = ConvertOptions(
        args.max_side,
        args.jpeg_quality,
        args.samples_per_shard,
        args.limit_per_class,
        args.seed,
        args.min_side,
        args.max_pixels,
    )
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    start = time.perf_counter()
    try:
        manifest = convert(args.src, args.out, args.format, splits, options, args.workers, args.val_labels)
    except (ConversionError, SourceError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary(manifest))
    print(f"done in {time.perf_counter() - start:.1f} s; dataset description in {args.out / 'dataset.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
