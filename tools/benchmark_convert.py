#!/usr/bin/env python
"""Images/s of the ImageNet converter, against limits measured in the same run.

Rows: reading the source files only (the I/O limit: what the converter cannot beat), the
per-image work alone (decode, fix, resize, encode on bytes already in memory), and the full
converter writing tar shards. All with the same number of worker processes.

    python tools/benchmark_convert.py [--src DIR] [--workers N] [--json out.json]

Without --src, a photographic ImageNet-like folder is generated first (tools/make_photo_dataset.py).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_photo_dataset import make_photo_dataset  # noqa: E402

from lsa_dist.data.convert import ConvertOptions, convert, process_image  # noqa: E402
from lsa_dist.data.imagenet import scan_imagenet  # noqa: E402


def _read(path: Path) -> int:
    return len(path.read_bytes())


def _process(data: bytes) -> int:
    options = ConvertOptions()
    return len(process_image(data, options.max_side, options.jpeg_quality, options.min_side).jpeg)


def _timed_pool(fn, items: list, workers: int) -> float:  # noqa: ANN001
    start = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(fn, items, chunksize=16):
            pass
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=None, help="ImageNet-layout folder (default: generate one)")
    parser.add_argument("--images", type=int, default=2000, help="images to generate without --src (default 2000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lsa-bench-convert-"))
    try:
        src = args.src
        if src is None:
            src = work / "photos"
            make_photo_dataset(src, classes=10, per_class=args.images // 10, val_per_class=0)
        samples = scan_imagenet(src, ("train",)).splits["train"]
        paths = [s.path for s in samples]
        n = len(paths)
        _timed_pool(_read, paths, args.workers)  # warm the page cache for every row alike
        read_s = _timed_pool(_read, paths, args.workers)
        blobs = [p.read_bytes() for p in paths]
        process_s = _timed_pool(_process, blobs, args.workers)
        start = time.perf_counter()
        convert(src, work / "out", "wds", ("train",), ConvertOptions(), workers=args.workers)
        convert_s = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = sum(len(b) for b in blobs) / 2**20
    rows = {
        "read source files only": n / read_s,
        "decode+fix+resize+encode only": n / process_s,
        "convert_imagenet (wds shards)": n / convert_s,
    }
    print(
        f"\n{n} source images ({mb / n * 1024:.0f} KB average), {args.workers} workers, "
        f"max side {ConvertOptions().max_side}, min side {ConvertOptions().min_side}, quality 90"
    )
    print(f"{'what':<32} {'images/s':>10} {'vs read limit':>14}")
    for name, rate in rows.items():
        print(f"{name:<32} {rate:>10.0f} {rate / rows['read source files only']:>13.3f}x")
    share = rows["convert_imagenet (wds shards)"] / rows["decode+fix+resize+encode only"]
    print(f"converter at {share:.2f}x of the per-image work alone")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"images": n, "workers": args.workers, "images_per_s": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
