#!/usr/bin/env python
"""Write Fashion-MNIST as an ImageNet-layout folder, for the real converter.

Fashion-MNIST is 70,000 28x28 greyscale photographs of clothing in 10 classes (60,000 for
training, the 10,000 of its test set for validation). Its files come from Debian's package
`dataset-fashion-mnist` (tools/setup_system.sh installs it) or any folder holding the four
`*-idx?-ubyte.gz` files. Each image is padded with 2 px of its black background to 32x32 (the
CIFAR-family LSA's grid; no pixel is resampled) and stored as a lossless PNG in the layout of
ImageNet: train/<wnid>/<wnid>_<n>.png, a flat val/ folder with LOC_val_solution.csv, and
LOC_synset_mapping.txt.

    python tools/make_fashion_dataset.py --out data/fashion/imagenet [--limit-per-class N]
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_dataset import replace_folder, report  # noqa: E402

DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MARKER = ".lsa_fashion_dataset"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class SourceError(RuntimeError):
    """The Fashion-MNIST files are missing or not IDX files of the expected shape."""


def wnid(label: int) -> str:
    return f"n7{label:07d}"


def read_idx(path: Path, dims: int) -> np.ndarray:
    """One IDX file (gzip), as uint8 with `dims` dimensions; SourceError when it is not one."""
    try:
        data = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise SourceError(
            f"{path} is missing: install Debian's dataset-fashion-mnist (tools/setup_system.sh) "
            "or pass --src with the four *-ubyte.gz files"
        ) from None
    except (OSError, EOFError) as err:
        raise SourceError(f"{path} is not a readable gzip file ({err}): fetch it again") from None
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x0800 + dims or len(data) < 4 + 4 * dims:
        raise SourceError(f"{path} is not a {dims}-dimensional uint8 IDX file (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise SourceError(f"{path} holds {body.size} bytes for shape {shape}: it is truncated; fetch it again")
    return body.reshape(shape)


def load_split(src: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FILES[split]
    images, labels = read_idx(src / images_file, 3), read_idx(src / labels_file, 1)
    if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max(initial=0) >= len(CLASSES):
        raise SourceError(f"{src}: {split} images {images.shape} and labels {labels.shape} do not match Fashion-MNIST")
    return images, labels


def make_fashion_dataset(out: Path, src: Path = DEBIAN_FOLDER, limit_per_class: int = 0) -> dict[str, int]:
    """Write the folder; returns the images per split. `limit_per_class` > 0 keeps the first N of
    each class in each split (small subsets for tests). Replaces an earlier folder of this tool's,
    never anything else (NotOursError)."""
    splits = {split: load_split(src, split) for split in FILES}  # read all before touching `out`
    ours = (out / MARKER).is_file()
    return replace_folder(out, ours, "Fashion-MNIST folder", lambda tmp: _write(tmp, splits, limit_per_class))


def _write(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], limit: int) -> dict[str, int]:
    (folder / MARKER).write_text("written by tools/make_fashion_dataset.py; --out may replace this folder\n")
    (folder / "val").mkdir()
    for label in range(len(CLASSES)):
        (folder / "train" / wnid(label)).mkdir(parents=True)
    counts = {"train": 0, "val": 0}
    val_rows = ["ImageId,PredictionString"]
    for split, (images, labels) in splits.items():
        taken = np.zeros(len(CLASSES), np.int64)
        for index in tqdm(range(len(images)), desc=f"writing {split}", unit="img", leave=False, mininterval=1):
            label = int(labels[index])
            if limit and taken[label] >= limit:
                continue
            taken[label] += 1
            image = Image.fromarray(np.pad(images[index], 2), mode="L")
            if split == "train":
                image.save(folder / "train" / wnid(label) / f"{wnid(label)}_{index}.png", optimize=False)
            else:
                image_id = f"FASHION_val_{index:08d}"
                image.save(folder / "val" / f"{image_id}.png", optimize=False)
                val_rows.append(f"{image_id},{wnid(label)} 0 0 31 31")
            counts[split] += 1
    (folder / "LOC_val_solution.csv").write_text("\n".join(val_rows) + "\n")
    (folder / "LOC_synset_mapping.txt").write_text("".join(f"{wnid(i)} {name}\n" for i, name in enumerate(CLASSES)))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/fashion/imagenet"), help="folder to write")
    parser.add_argument(
        "--src", type=Path, default=DEBIAN_FOLDER, help=f"folder of the four *-ubyte.gz files (default {DEBIAN_FOLDER})"
    )
    parser.add_argument(
        "--limit-per-class", type=int, default=0, help="keep the first N images of each class per split (0: all)"
    )
    args = parser.parse_args(argv)
    if args.limit_per_class < 0:
        parser.error("--limit-per-class must be 0 or more")
    return report(lambda: make_fashion_dataset(args.out, args.src, args.limit_per_class), args.out, (SourceError,))


if __name__ == "__main__":
    sys.exit(main())
