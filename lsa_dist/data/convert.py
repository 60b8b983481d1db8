"""ImageNet folder -> WebDataset tar shards, FFCV .beton files and dataset.json.

Every image is decoded, fixed, resized and re-encoded (images.py). What is not a readable image
of sane size (images.py), cannot be read, or is not an image file at all (imagenet.py) is
skipped and listed with its reason in dataset.json; the run never aborts on a file.

Shards are the unit of work and of resumption: each is written under a temporary name and
renamed, then its record (sample count, checksum, skipped files, the options it was made
with) is written beside it. A re-run finishes the shards that have no record and leaves
finished ones alone; one with other options is refused, naming them. A worker that dies (the
out-of-memory killer) fails the run with a message instead of hanging it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..fs import atomic_write_json, sha256_file
from .dataset import DATASET_FILE, FORMAT_VERSION
from .imagenet import Sample, scan_imagenet, shown
from .images import BadImageError, process_image
from .report import summary

logger = logging.getLogger(__name__)
FORMATS = ("wds", "ffcv", "both")
RECORDS = ".records"


class ConversionError(RuntimeError):
    """The conversion cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class ConvertOptions:
    max_side: int = 500  # FFCV's ImageNet example stores about 500 px on the longer side
    jpeg_quality: int = 90
    samples_per_shard: int = 1000
    limit_per_class: int | None = None
    seed: int = 0
    min_side: int = 256  # no shorter side is brought below this (smaller originals stay as they are)
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485  # larger images are skipped (decompression bombs)

    def validate(self) -> None:
        if self.max_side < 16:
            raise ConversionError(f"--max-side must be at least 16, got {self.max_side}")
        if not 0 <= self.min_side <= self.max_side:
            raise ConversionError(f"--min-side must be in 0..--max-side ({self.max_side}), got {self.min_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConversionError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.samples_per_shard < 1:
            raise ConversionError(f"--samples-per-shard must be positive, got {self.samples_per_shard}")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise ConversionError(f"--limit-per-class must be positive, got {self.limit_per_class}")
        if self.max_pixels < 1:
            raise ConversionError(f"--max-pixels must be positive, got {self.max_pixels}")

    def shard_options(self) -> dict[str, int]:
        """What a shard's images depend on besides its samples: recorded with every shard."""
        return {k: getattr(self, k) for k in ("max_side", "min_side", "jpeg_quality", "max_pixels")}


@dataclass
class ShardTask:
    split: str
    index: int
    samples: list[Sample]
    folder: Path
    options: ConvertOptions

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@dataclass
class ShardRecord:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    keys_sha256: str  # of the planned source keys: a changed plan invalidates the shard
    options: dict[str, int] = field(default_factory=dict)  # ConvertOptions.shard_options() it was made with
    skipped: list[dict[str, str]] = field(default_factory=list)
    fixed: dict[str, int] = field(default_factory=dict)
    pixel_sum: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    pixel_sq_sum: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    pixels: int = 0
    seconds: float = 0.0


def _keys_digest(samples: Sequence[Sample]) -> str:
    digest = hashlib.sha256()
    for s in samples:
        digest.update(f"{s.key}\t{s.label}\n".encode())
    return digest.hexdigest()


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o444
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


def write_shard(task: ShardTask) -> ShardRecord:
    """Convert the samples of one shard and write the tar atomically, then its record."""
    start = time.perf_counter()
    Image.MAX_IMAGE_PIXELS = max(task.options.max_pixels, Image.MAX_IMAGE_PIXELS or 0)  # our limit decides
    final = task.folder / task.name
    record = ShardRecord(task.name, 0, 0, "", _keys_digest(task.samples), task.options.shard_options())
    fixed: Counter[str] = Counter()
    sums, sq_sums = np.zeros(3), np.zeros(3)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in task.samples:
                o = task.options
                try:
                    data = sample.path.read_bytes()
                    processed = process_image(data, o.max_side, o.jpeg_quality, o.min_side, o.max_pixels)
                except BadImageError as err:
                    record.skipped.append({"path": shown(sample.path), "reason": str(err)})
                    continue
                except OSError as err:
                    record.skipped.append({"path": shown(sample.path), "reason": f"unreadable ({err.strerror or err})"})
                    continue
                fixed.update(processed.fixes)
                sums += processed.pixel_sum
                sq_sums += processed.pixel_sq_sum
                record.pixels += processed.pixels
                _tar_member(tar, f"{sample.key}.jpg", processed.jpeg)
                _tar_member(tar, f"{sample.key}.cls", str(sample.label).encode())
                record.num_samples += 1
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    record.bytes = final.stat().st_size
    record.sha256 = sha256_file(final)
    record.fixed = dict(fixed)
    record.pixel_sum, record.pixel_sq_sum = sums.tolist(), sq_sums.tolist()
    record.seconds = time.perf_counter() - start
    atomic_write_json(_record_path(task.folder, task.name), asdict(record))
    return record


def _record_path(folder: Path, name: str) -> Path:
    return folder / RECORDS / f"{name}.json"


def _finished(task: ShardTask) -> ShardRecord | None:
    """The record of a shard already written by an earlier run with the same plan, if any."""
    path = _record_path(task.folder, task.name)
    shard = task.folder / task.name
    if not path.is_file() or not shard.is_file():
        return None
    try:
        record = ShardRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None
    if record.name != task.name:  # a record is trusted for its own shard only: its name goes into dataset.json
        return None
    if record.keys_sha256 != _keys_digest(task.samples) or record.bytes != shard.stat().st_size:
        return None
    if not record.options:  # written before options were recorded: convert it again
        return None
    current = task.options.shard_options()
    changed = [f"{k} {record.options.get(k)} -> {v}" for k, v in current.items() if record.options.get(k) != v]
    if changed:
        raise ConversionError(
            f"{shard} was converted with other options ({', '.join(changed)}); finish the conversion with the "
            "options it was started with, or convert into a new --out folder"
        )
    return record


def plan_shards(split: str, samples: list[Sample], folder: Path, options: ConvertOptions) -> list[ShardTask]:
    """Fixed shard assignment: training samples shuffled once (seeded) so every shard mixes classes."""
    ordered = list(samples)
    if split == "train":
        random.Random(options.seed).shuffle(ordered)
    n = options.samples_per_shard
    return [ShardTask(split, i // n, ordered[i : i + n], folder, options) for i in range(0, len(ordered), n)]


def _run_tasks(tasks: list[ShardTask], workers: int, desc: str) -> Iterator[ShardRecord]:
    total = sum(len(t.samples) for t in tasks)
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=None) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                record = write_shard(task)
                bar.update(len(task.samples))
                yield record
            return
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            try:
                for record, task in zip(pool.map(write_shard, tasks), tasks):
                    bar.update(len(task.samples))
                    yield record
            except BrokenProcessPool as err:
                raise ConversionError(
                    "a conversion worker died (killed by the system: out of memory? lower --max-pixels or "
                    "--workers); the finished shards are kept: run the same command again to resume"
                ) from err


def _options_dict(options: ConvertOptions, splits: Sequence[str]) -> dict[str, Any]:
    return {**asdict(options), "splits": list(splits)}


def convert(
    src: str | Path,
    out: str | Path,
    formats: str = "both",
    splits: Sequence[str] = ("train", "val"),
    options: ConvertOptions | None = None,
    workers: int = 1,
    val_labels: str | Path | None = None,
) -> dict[str, Any]:
    """Convert `src` into `out`; returns the dataset.json content. Resumes a previous run."""
    options = options or ConvertOptions()
    options.validate()
    if formats not in FORMATS:
        raise ConversionError(f"--format must be one of {', '.join(FORMATS)}, got {formats!r}")
    out = Path(out)
    want_ffcv = formats in ("ffcv", "both")
    if want_ffcv:
        from .ffcv import require_ffcv

        require_ffcv()
    source = scan_imagenet(src, tuple(splits), val_labels, options.limit_per_class)
    manifest_path = out / DATASET_FILE
    _refuse_other_options(manifest_path, _options_dict(options, splits))
    # With ffcv alone the shards are an intermediate, staged out of sight and removed at the end.
    shard_dir = out / ("wds" if formats in ("wds", "both") else ".staging-wds")
    (shard_dir / RECORDS).mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob("*.tmp-*"):
        stale.unlink()

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": str(Path(src).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": _options_dict(options, splits),
        "formats": ["wds", "ffcv"] if formats == "both" else [formats],
        "classes": source.classes,
        "class_names": source.names,
        "splits": {},
    }
    for split in splits:
        records = _convert_split(split, source.splits[split], shard_dir, options, workers)
        rejected = source.rejected.get(split, [])
        manifest["splits"][split] = _split_entry(records, len(source.splits[split]) + len(rejected), rejected)
        manifest["splits"][split]["renamed"] = source.renamed.get(split, {})
        manifest["splits"][split]["collisions"] = source.collisions.get(split, [])
        if split == "train":
            manifest.update(_pixel_statistics(records))
    if formats in ("wds", "both"):
        manifest["wds_dir"] = "wds"
    if want_ffcv:
        _write_betons(manifest, out, shard_dir, options, workers)
    atomic_write_json(manifest_path, manifest)
    if formats == "ffcv":
        for path in sorted(shard_dir.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        shard_dir.rmdir()
    return manifest


def _refuse_other_options(manifest_path: Path, new: dict[str, Any]) -> None:
    """A re-run resumes the conversion in the folder only with the options it was made with."""
    if not manifest_path.is_file():
        return
    old = json.loads(manifest_path.read_text()).get("options", {})
    changed = sorted(k for k in new if k in old and old[k] != new[k])
    if changed:
        raise ConversionError(
            f"{manifest_path.parent} already holds a conversion made with different options ({', '.join(changed)}); "
            "convert into a new --out folder"
        )


def _convert_split(
    split: str, samples: list[Sample], shard_dir: Path, options: ConvertOptions, workers: int
) -> list[ShardRecord]:
    """Write the split's shards that have no record yet; returns every shard's record, in order."""
    tasks = plan_shards(split, samples, shard_dir, options)
    records: dict[str, ShardRecord] = {}
    todo = []
    for task in tasks:
        done = _finished(task)
        if done is None:
            todo.append(task)
        else:
            records[task.name] = done
    if records:
        logger.info(f"{split}: {len(records)} of {len(tasks)} shards already finished, converting the rest")
    for record in _run_tasks(todo, workers, f"{split} -> shards"):
        records[record.name] = record
    return [records[t.name] for t in tasks]


def _split_entry(
    records: list[ShardRecord], num_source_files: int, rejected: Sequence[dict[str, str]] = ()
) -> dict[str, Any]:
    """A split's entry in dataset.json: its shards, what was fixed, and every file skipped (not
    an image file at all, or not a readable image of sane size) with the reason."""
    fixed: Counter[str] = Counter()
    for r in records:
        fixed.update(r.fixed)
    return {
        "num_samples": sum(r.num_samples for r in records),
        "num_source_files": num_source_files,
        "shards": [
            {"name": r.name, "num_samples": r.num_samples, "bytes": r.bytes, "sha256": r.sha256} for r in records
        ],
        "fixed": dict(sorted(fixed.items())),
        "skipped": [*rejected, *(s for r in records for s in r.skipped)],
    }


def _pixel_statistics(records: list[ShardRecord]) -> dict[str, Any]:
    """Per-channel mean and std of the stored training pixels (0-1 scale)."""
    sums, squares, pixels = np.zeros(3), np.zeros(3), 0
    for r in records:
        sums += r.pixel_sum
        squares += r.pixel_sq_sum
        pixels += r.pixels
    if not pixels:
        return {}
    mean = sums / pixels
    return {"mean": mean.tolist(), "std": np.sqrt(np.maximum(squares / pixels - mean**2, 1e-12)).tolist()}


def _write_betons(manifest: dict[str, Any], out: Path, shard_dir: Path, options: ConvertOptions, workers: int) -> None:
    """FFCV files of every split, written from its finished shards, recorded in the manifest."""
    from .ffcv import write_beton

    (out / "ffcv").mkdir(exist_ok=True)
    for split, entry in manifest["splits"].items():
        shards = [shard_dir / s["name"] for s in entry["shards"]]
        target = out / "ffcv" / f"{split}.beton"
        info = write_beton(shards, target, options.jpeg_quality, workers)
        entry["ffcv"] = {"name": f"ffcv/{split}.beton", **info}


__all__ = [
    "BadImageError",
    "ConversionError",
    "ConvertOptions",
    "convert",
    "process_image",
    "summary",
]
