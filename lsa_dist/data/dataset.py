"""dataset.json: what a converted dataset holds, and the checks run before training reads it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..fs import sha256_file

DATASET_FILE = "dataset.json"
FORMAT_VERSION = 1
# names dataset.json may give files: they go into paths and into data.urls (a `pipe:` template
# is run by a shell), so letters, digits, dot, dash and underscore only, and no `..`
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class DatasetError(ValueError):
    """A converted dataset that is missing, incomplete or inconsistent; the message names the file."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    name: str
    num_samples: int
    shards: tuple[ShardInfo, ...]
    beton: str | None  # relative path of the FFCV file, when converted
    beton_bytes: int | None


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    classes: tuple[str, ...]
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    splits: dict[str, SplitInfo]
    wds_dir: str | None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DatasetError(
                f"{self.root / DATASET_FILE} has no split {name!r} (it has {', '.join(self.splits)}); "
                f"convert it with --splits {name}"
            )
        return self.splits[name]

    def shard_paths(self, split: str) -> list[Path]:
        if self.wds_dir is None:
            raise DatasetError(
                f"{self.root} was converted without WebDataset shards; re-run the converter with --format wds or both"
            )
        return [self.root / self.wds_dir / s.name for s in self.split(split).shards]

    def beton_path(self, split: str) -> Path:
        info = self.split(split)
        if info.beton is None:
            raise DatasetError(
                f"{self.root} has no FFCV file for {split!r}; re-run the converter with --format ffcv or both"
            )
        return self.root / info.beton

    def check_size(self, split: str, world_size: int, batch_size: int) -> None:
        """Fail if the split cannot give every rank at least one full batch."""
        info = self.split(split)
        need = world_size * batch_size
        if info.num_samples < need:
            raise DatasetError(
                f"split {split!r} of {self.root} has {info.num_samples} samples, fewer than "
                f"{world_size} ranks x batch {batch_size} = {need}; lower data.batch_size or use fewer ranks"
            )

    def check_files(self, split: str, fmt: str, checksums: bool = False) -> None:
        """Fail before training if files are missing or disagree with dataset.json.

        Sizes are always compared; `checksums` also re-hashes every file (slow on ImageNet).
        """
        info = self.split(split)
        if fmt == "wds":
            for shard, path in zip(info.shards, self.shard_paths(split)):
                _check_file(path, shard.bytes, shard.sha256 if checksums else None)
        elif fmt == "ffcv":
            _check_file(self.beton_path(split), info.beton_bytes, None)
        else:
            raise DatasetError(f"data.format must be 'wds' or 'ffcv', got {fmt!r}")


def _check_file(path: Path, size: int | None, sha256: str | None) -> None:
    if not path.is_file():
        raise DatasetError(f"missing data file {path}: re-run tools/convert_imagenet.py to finish the conversion")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DatasetError(
            f"{path} has {actual} bytes but dataset.json records {size}: the file is corrupt or from another "
            "conversion; re-run tools/convert_imagenet.py"
        )
    if sha256 is not None and sha256_file(path) != sha256:
        raise DatasetError(f"{path} does not match its checksum in dataset.json: the file is corrupt")


def check_name(path: Path, what: str, name: object, nested: bool = False) -> str:
    """`name` if it is a safe file name (or, `nested`, a relative path of safe names);
    DatasetError naming it otherwise."""
    parts = str(name).split("/") if nested and isinstance(name, str) else [name]
    if not all(isinstance(p, str) and SAFE_NAME.fullmatch(p) and ".." not in p for p in parts):
        raise DatasetError(
            f"{path}: {what} {name!r} is not a safe file name (letters, digits, '.', '-', '_'; no '..', no "
            "absolute path); this dataset.json was not written by tools/convert_imagenet.py: re-convert"
        )
    return str(name)


def dataset_identity(root: str | Path) -> str:
    """sha256 of ROOT/dataset.json: the dataset's identity for resume checks and tracking."""
    return sha256_file(Path(root) / DATASET_FILE)


def load_dataset_info(root: str | Path) -> DatasetInfo:
    """Read and sanity-check ROOT/dataset.json."""
    root = Path(root)
    path = root / DATASET_FILE
    if not path.is_file():
        raise DatasetError(f"no {DATASET_FILE} in {root}: point data.root at the output of tools/convert_imagenet.py")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise DatasetError(f"{path} is not valid JSON ({err}); re-run the converter") from err
    if raw.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path} has format_version {raw.get('format_version')}, expected {FORMAT_VERSION}")
    try:
        splits = {}
        for name, entry in raw["splits"].items():
            shards = tuple(ShardInfo(**s) for s in entry["shards"])
            for shard in shards:
                check_name(path, "shard", shard.name)
            if sum(s.num_samples for s in shards) != entry["num_samples"]:
                raise DatasetError(f"{path}: split {name!r} shard counts do not add up to num_samples")
            ffcv = entry.get("ffcv") or {}
            beton = ffcv.get("name")
            if beton is not None:
                check_name(path, "FFCV file", beton, nested=True)
            splits[name] = SplitInfo(name, entry["num_samples"], shards, beton, ffcv.get("bytes"))
        return DatasetInfo(
            root=root,
            classes=tuple(raw["classes"]),
            class_names=tuple(raw.get("class_names", raw["classes"])),
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            splits=splits,
            wds_dir=None if raw.get("wds_dir") is None else check_name(path, "wds_dir", raw["wds_dir"], nested=True),
        )
    except (KeyError, TypeError) as err:
        raise DatasetError(f"{path} lacks or mangles field {err}; re-run the converter") from err
