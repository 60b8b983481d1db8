"""Reading an ImageNet folder: class folders, label files and the list of samples per split.

Layouts understood:
  DIR/train/<wnid>/*.JPEG                      training images, one folder per class
  DIR/val/<wnid>/*.JPEG                        validation images in class folders, or
  DIR/val/*.JPEG + LOC_val_solution.csv        flat validation images and their label file
  DIR/LOC_synset_mapping.txt                   optional: "<wnid> <name, name, ...>" per line

The class index is the position of the wnid in the sorted list of training class folders.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


class SourceError(ValueError):
    """The source folder is not an ImageNet layout we can read; the message says what is wrong."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    key: str  # the source file name without extension: traces every sample back to ImageNet


@dataclass
class ImageNetSource:
    root: Path
    classes: list[str]  # wnids, sorted
    names: list[str]  # human-readable class names (the wnid when no mapping file is present)
    splits: dict[str, list[Sample]] = field(default_factory=dict)


def sample_key(path: Path) -> str:
    """A WebDataset-safe key for a source file: its name without extension, dots replaced."""
    return path.name.rsplit(".", 1)[0].replace(".", "_")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_synset_mapping(path: Path) -> dict[str, str]:
    """wnid -> name from LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca")."""
    mapping = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        wnid, _, name = line.partition(" ")
        if not wnid:
            raise SourceError(f"{path}:{number}: expected '<wnid> <name>'")
        mapping[wnid] = name.strip() or wnid
    return mapping


def read_val_solution(path: Path) -> dict[str, str]:
    """ImageId -> wnid from LOC_val_solution.csv (the wnid is the first word of PredictionString)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"ImageId", "PredictionString"} - set(reader.fieldnames or [])
        if missing:
            raise SourceError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        labels = {}
        for row in reader:
            words = (row["PredictionString"] or "").split()
            if not words:
                raise SourceError(f"{path}: ImageId {row['ImageId']} has an empty PredictionString")
            labels[row["ImageId"]] = words[0]
    return labels


def _class_folder_samples(class_dirs: list[Path], index: dict[str, int], limit: int | None) -> list[Sample]:
    """<split>/<wnid>/*.JPEG"""
    samples: list[Sample] = []
    for class_dir in class_dirs:
        if class_dir.name not in index:
            raise SourceError(f"{class_dir}: class {class_dir.name!r} is not among the training classes")
        files = _images_in(class_dir)[:limit]
        samples += [Sample(p, index[class_dir.name], sample_key(p)) for p in files]
    return samples


def _flat_folder_samples(folder: Path, labels_path: Path, index: dict[str, int], limit: int | None) -> list[Sample]:
    """<split>/*.JPEG labelled by a LOC_val_solution.csv."""
    if not labels_path.is_file():
        raise SourceError(
            f"{folder} holds images without class folders and no label file was found at "
            f"{labels_path}; pass --val-labels LOC_val_solution.csv"
        )
    labels = read_val_solution(labels_path)
    per_class: dict[int, int] = {}
    samples: list[Sample] = []
    for path in _images_in(folder):
        image_id = path.name.rsplit(".", 1)[0]
        if image_id not in labels:
            raise SourceError(f"{path.name} has no row in {labels_path}")
        wnid = labels[image_id]
        if wnid not in index:
            raise SourceError(f"{labels_path}: {image_id} is labelled {wnid!r}, not a training class")
        label = index[wnid]
        if limit is not None and per_class.get(label, 0) >= limit:
            continue
        per_class[label] = per_class.get(label, 0) + 1
        samples.append(Sample(path, label, sample_key(path)))
    return samples


def scan_imagenet(
    src: str | Path,
    splits: tuple[str, ...] = ("train", "val"),
    val_labels: str | Path | None = None,
    limit_per_class: int | None = None,
) -> ImageNetSource:
    """List the samples of each requested split. Raises SourceError with what to fix."""
    root = Path(src)
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist")
    train = root / "train"
    if not train.is_dir():
        raise SourceError(f"{root} has no train/ folder: the class list comes from train/<wnid>/ folders")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise SourceError(f"{train} has no class folders (expected train/<wnid>/*.JPEG)")
    index = {wnid: i for i, wnid in enumerate(classes)}
    mapping_file = root / "LOC_synset_mapping.txt"
    mapping = read_synset_mapping(mapping_file) if mapping_file.is_file() else {}
    source = ImageNetSource(root, classes, [mapping.get(w, w) for w in classes])

    for split in splits:
        folder = root / split
        if not folder.is_dir():
            raise SourceError(f"{root} has no {split}/ folder")
        class_dirs = [p for p in folder.iterdir() if p.is_dir()]
        if class_dirs:
            samples = _class_folder_samples(sorted(class_dirs), index, limit_per_class)
        else:
            labels_path = Path(val_labels) if val_labels else root / "LOC_val_solution.csv"
            samples = _flat_folder_samples(folder, labels_path, index, limit_per_class)
        if not samples:
            raise SourceError(f"{folder} contains no images")
        duplicates = [k for k, n in Counter(s.key for s in samples).items() if n > 1]
        if duplicates:
            raise SourceError(f"{split}: two source files share the key {duplicates[0]!r}; keys must be unique")
        source.splits[split] = samples
    return source
