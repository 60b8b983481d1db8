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
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MARKER = ".lsa_demo_dataset"  # written into the folder: the only kind of folder --out may replace


class NotOursError(RuntimeError):
    """--out names a folder this tool did not write; nothing is deleted."""


def written_by_us(folder: Path) -> bool:
    """Whether `folder` is a demo dataset this tool wrote (its marker, or, from before the marker
    existed, the demo's own class list)."""
    if (folder / MARKER).is_file():
        return True
    mapping = folder / "LOC_synset_mapping.txt"
    return mapping.is_file() and mapping.read_text().startswith(f"{wnid(0)} digit zero\n")


def wnid(digit: int) -> str:
    return f"n9{digit:07d}"


def make_demo_dataset(out: Path, val_fraction: float = 0.2, seed: int = 0, size: int = 32) -> dict[str, int]:
    """Write the folder; returns the number of images per split. Replaces an earlier demo folder,
    never anything else (NotOursError)."""
    return replace_folder(out, written_by_us(out), "demo dataset", lambda tmp: _write(tmp, val_fraction, seed, size))


def replace_folder(out: Path, ours: bool, what: str, write: Callable[[Path], dict[str, int]]) -> dict[str, int]:
    """Write a dataset folder through `write(tmp)` into a new sibling, then swap it in for `out`.
    `out` may only be replaced when `ours` (a folder this tool wrote) or empty: otherwise
    NotOursError and nothing is deleted. A failed write leaves `out` as it was."""
    if out.exists() and not (out.is_dir() and (ours or not any(out.iterdir()))):
        raise NotOursError(
            f"{out} exists and is not a {what} written by this tool (no marker file); nothing was deleted: "
            "choose another --out or remove it yourself"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # a new name: nothing else is touched
    try:
        tmp.chmod(0o755)
        counts = write(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _write(folder: Path, val_fraction: float, seed: int, size: int) -> dict[str, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    rng = np.random.default_rng(seed)
    (folder / MARKER).write_text("written by tools/make_demo_dataset.py; --out may replace this folder\n")
    (folder / "val").mkdir(parents=True)
    val_rows = ["ImageId,PredictionString"]
    counts = {"train": 0, "val": 0}
    for digit in range(10):
        (folder / "train" / wnid(digit)).mkdir(parents=True)
        members = np.flatnonzero(labels == digit)
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        for rank, index in enumerate(members):
            pixels = (images[index] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            if rank < n_val:
                image_id = f"DEMO_val_{index:08d}"
                image.save(folder / "val" / f"{image_id}.JPEG", quality=95)
                val_rows.append(f"{image_id},{wnid(digit)} 0 0 {size - 1} {size - 1}")
                counts["val"] += 1
            else:
                image.save(folder / "train" / wnid(digit) / f"{wnid(digit)}_{index}.JPEG", quality=95)
                counts["train"] += 1
    (folder / "LOC_val_solution.csv").write_text("\n".join(val_rows) + "\n")
    (folder / "LOC_synset_mapping.txt").write_text("".join(f"{wnid(d)} digit {NAMES[d]}\n" for d in range(10)))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/demo/imagenet"),
        help="folder to write (an earlier demo folder is replaced)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must be between 0 and 1")
    return report(lambda: make_demo_dataset(args.out, args.val_fraction, args.seed, args.size), args.out)


def report(write: Callable[[], dict[str, int]], out: Path, errors: tuple[type[Exception], ...] = ()) -> int:
    """Run a dataset writer for a command line: its counts on success; one `error:` line and exit 2
    for a folder it may not replace or one of `errors`."""
    try:
        counts = write()
    except (NotOursError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} training and {counts['val']} validation images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
