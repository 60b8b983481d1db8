"""Reading an ImageNet folder: class folders, label files and the list of samples per split.

Layouts understood:
  DIR/train/<wnid>/*.JPEG                      training images, one folder per class
  DIR/val/<wnid>/*.JPEG                        validation images in class folders, or
  DIR/val/*.JPEG + LOC_val_solution.csv        flat validation images and their label file
  DIR/LOC_synset_mapping.txt                   optional: "<wnid> <name, name, ...>" per line

The class index is the position of the wnid in the sorted list of training class folders.

Real folders hold more than images: names that are not UTF-8 or are too long for a tar
header get a safe key (the original name is recorded), and what cannot be an image (a folder
or a device named like one, a link that dangles, loops or leads out of the source folder) is
listed with its reason in `ImageNetSource.rejected`, never read; so is a class folder that is a
link out of the source folder (a split folder that is one is refused). Files whose keys would be
equal (a.b.JPEG and a_b.JPEG, x.JPEG and x.png) all get unique keys, by rules that depend on the
names only (keys.py), each renaming listed in `ImageNetSource.collisions`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path

from .keys import sample_key, shown, unique_keys

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
    rejected: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # per split: path, reason
    renamed: dict[str, dict[str, str]] = field(default_factory=dict)  # per split: key -> original name
    collisions: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # per split: path, key, reason


def _images_in(folder: Path, root: Path, rejected: list[dict[str, str]]) -> list[Path]:
    """The image files of `folder`; what is named like an image but cannot be one goes to
    `rejected` with the reason. Links are followed while they stay inside `root`."""
    images = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        reason = _not_an_image_file(path, root)
        if reason:
            rejected.append({"path": shown(path), "reason": reason})
        else:
            images.append(path)
    return images


def _bad_link(path: Path, root: Path) -> str:
    """Why the link `path` is not followed: it dangles, loops or leads out of `root` (a file
    outside the source is not ImageNet's and may be anyone's). '' for a link that stays inside
    and for what is not a link."""
    if not path.is_symlink():
        return ""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return "a dangling or looping link"
    if not target.is_relative_to(root.resolve()):
        return f"a link to outside the source folder ({shown(target)})"
    return ""


def _not_an_image_file(path: Path, root: Path) -> str:
    """Why `path` cannot be read as an image file ('' if it can)."""
    reason = _bad_link(path, root)
    if reason:
        return reason
    if path.is_dir():
        return "a folder named like an image"
    if not path.is_file():
        return "not a regular file (device, pipe or socket)"
    return ""


def _refuse_bad_link(folder: Path, root: Path) -> None:
    """A split folder that is a link out of `root` cannot be skipped like a file: say so."""
    reason = _bad_link(folder, root)
    if reason:
        raise SourceError(
            f"{shown(folder)} is {reason}; only what is inside --src is read: pass as --src a folder "
            "that holds the split folders themselves"
        )


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


def _class_folder_samples(
    class_dirs: list[Path], index: dict[str, int], limit: int | None, root: Path, rejected: list[dict[str, str]]
) -> list[Sample]:
    """<split>/<wnid>/*.JPEG; a class folder that is a link out of `root` is reported, not read."""
    samples: list[Sample] = []
    for class_dir in class_dirs:
        reason = _bad_link(class_dir, root)
        if reason:
            rejected.append({"path": shown(class_dir), "reason": reason})
            continue
        if class_dir.name not in index:
            raise SourceError(f"{class_dir}: class {class_dir.name!r} is not among the training classes")
        files = _images_in(class_dir, root, rejected)[:limit]
        samples += [Sample(p, index[class_dir.name], sample_key(p)) for p in files]
    return samples


def _flat_folder_samples(
    folder: Path,
    labels_path: Path,
    index: dict[str, int],
    limit: int | None,
    root: Path,
    rejected: list[dict[str, str]],
) -> list[Sample]:
    """<split>/*.JPEG labelled by a LOC_val_solution.csv."""
    if not labels_path.is_file():
        raise SourceError(
            f"{folder} holds images without class folders and no label file was found at "
            f"{labels_path}; pass --val-labels LOC_val_solution.csv"
        )
    labels = read_val_solution(labels_path)
    per_class: dict[int, int] = {}
    samples: list[Sample] = []
    for path in _images_in(folder, root, rejected):
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
    _refuse_bad_link(train, root)
    # a class folder that is skipped (a link out of the source) keeps its index: labels never shift
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
        _refuse_bad_link(folder, root)
        rejected = source.rejected.setdefault(split, [])
        class_dirs = [p for p in folder.iterdir() if p.is_dir() and p.suffix.lower() not in IMAGE_SUFFIXES]
        if class_dirs:
            samples = _class_folder_samples(sorted(class_dirs), index, limit_per_class, root, rejected)
        else:
            labels_path = Path(val_labels) if val_labels else root / "LOC_val_solution.csv"
            samples = _flat_folder_samples(folder, labels_path, index, limit_per_class, root, rejected)
        if not samples:
            raise SourceError(f"{folder} contains no images")
        keys, source.collisions[split] = unique_keys([(s.path, s.key) for s in samples], root)
        samples = [replace(s, key=key) for s, key in zip(samples, keys)]
        source.splits[split] = samples
        source.renamed[split] = {s.key: shown(s.path.name) for s in samples if not s.path.name.startswith(s.key)}
    return source
