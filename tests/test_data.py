"""Conversion and the two pipelines, on real shards and .beton files written to disk."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lsa_dist.config import AugmentConfig, DataConfig, ProgressiveConfig
from lsa_dist.data import PAD_LABEL, DatasetError, Layout, build_loader, load_dataset_info
from lsa_dist.data.convert import ConversionError, ConvertOptions, convert, summary
from lsa_dist.data.imagenet import SourceError
from lsa_dist.data.keys import SAFE_KEY
from lsa_dist.data.transforms import build_mixup, sample_transform
from lsa_dist.data.wds import read_labels
from lsa_dist.fs import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def data_cfg(root: Path, fmt: str = "wds", **kw: object) -> DataConfig:
    base = dict(
        format=fmt, root=str(root), image_size=32, batch_size=16, num_workers=2, augment=AugmentConfig(recipe="cifar")
    )
    return DataConfig(**{**base, **kw})


def epoch_keys(loader: object, epoch: int, start_batch: int = 0) -> list[list]:
    return [list(keys) for _, _, keys in loader.epoch(epoch, start_batch, return_keys=True)]


# -- the demo dataset and conversion -------------------------------------------------------


def test_demo_dataset_has_imagenet_layout(demo_source: Path) -> None:
    assert len(list((demo_source / "train").iterdir())) == 10
    assert len(list((demo_source / "train").rglob("*.JPEG"))) == 1438
    assert len(list((demo_source / "val").glob("*.JPEG"))) == 359
    rows = (demo_source / "LOC_val_solution.csv").read_text().splitlines()
    assert rows[0] == "ImageId,PredictionString" and len(rows) == 360
    assert (demo_source / "LOC_synset_mapping.txt").read_text().startswith("n90000000 digit zero\n")
    with Image.open(next((demo_source / "val").glob("*.JPEG"))) as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_conversion_round_trip(demo_source: Path, demo_shards: Path) -> None:
    manifest = json.loads((demo_shards / "dataset.json").read_text())
    assert manifest["classes"] == [f"n9{d:07d}" for d in range(10)]
    assert manifest["class_names"][3] == "digit three"
    source_labels = {}
    for path in (demo_source / "train").rglob("*.JPEG"):
        source_labels[path.stem] = manifest["classes"].index(path.parent.name)
    for row in (demo_source / "LOC_val_solution.csv").read_text().splitlines()[1:]:
        image_id, prediction = row.split(",")
        source_labels[image_id] = manifest["classes"].index(prediction.split()[0])
    seen = {}
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        assert entry["skipped"] == [] and entry["fixed"] == {}
        shards = [demo_shards / "wds" / s["name"] for s in entry["shards"]]
        for shard, record in zip(shards, entry["shards"]):
            assert sha256_file(shard) == record["sha256"] and shard.stat().st_size == record["bytes"]
            with tarfile.open(shard) as tar:  # plain tar reads it
                names = tar.getnames()
            assert len(names) == 2 * record["num_samples"]
        labels = read_labels([str(s) for s in shards])
        assert len(labels) == entry["num_samples"] == entry["num_source_files"]
        seen.update(labels)
        # the same images, in the same order, went into the FFCV file
        from lsa_dist.data.ffcv import beton_labels

        assert beton_labels(demo_shards / entry["ffcv"]["name"]) == [label for _, label in labels]
    assert seen == source_labels  # every image and label, traced back by key
    info = load_dataset_info(demo_shards)
    assert 0.2 < info.mean[0] < 0.4 and 0.25 < info.std[0] < 0.45


def test_training_shards_mix_classes(demo_shards: Path) -> None:
    labels = [label for _, label in read_labels([str(demo_shards / "wds" / "train-000000.tar")])]
    assert len(set(labels)) == 10


def _jpeg(image: Image.Image, **kw: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **kw)
    return out.getvalue()


@pytest.fixture()
def awkward_source(tmp_path: Path) -> Path:
    """An ImageNet folder with the kinds of files real ImageNet and real downloads contain."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (300, 600, 3), dtype=np.uint8))
    files = {
        "n01/n01_1.JPEG": _jpeg(good),  # large: resized to max side
        "n01/n01_2.JPEG": _jpeg(Image.new("CMYK", (40, 30), (10, 200, 30, 0))),
        "n01/n01_3.JPEG": _jpeg(Image.new("L", (50, 50), 128)),
        "n02/n02_1.JPEG": _jpeg(good.resize((64, 64)))[:300],  # truncated download
        "n02/n02_2.JPEG": b"",  # empty file
        "n02/n02_3.JPEG": b"<html>not found</html>",
        "n02/n02_4.JPEG": _jpeg(good.resize((64, 48)), progressive=True),
    }
    png = io.BytesIO()
    good.resize((70, 35)).save(png, format="PNG")
    files["n02/n02_5.JPEG"] = png.getvalue()  # ImageNet's PNG in a .JPEG file
    for name, data in files.items():
        path = src / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return src


def test_the_demo_writer_replaces_only_its_own_folders(tmp_path: Path) -> None:
    from make_demo_dataset import MARKER, NotOursError, make_demo_dataset

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    with pytest.raises(NotOursError, match="is not a demo dataset written by this tool .* nothing was deleted"):
        make_demo_dataset(foreign)
    assert (foreign / "chapter1.tex").read_text() == "precious" and len(list(foreign.iterdir())) == 1
    demo = tmp_path / "demo"
    make_demo_dataset(demo)
    (demo / "stale").write_text("x")
    assert make_demo_dataset(demo)["val"] == 359  # its own folder: replaced whole
    assert (demo / MARKER).is_file() and not (demo / "stale").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"thesis", "demo", "mlflow.db"}  # no temporary folder left


def test_fashion_mnist_is_written_losslessly_in_the_imagenet_layout_and_converts(tmp_path: Path) -> None:
    import gzip

    from make_fashion_dataset import CLASSES, make_fashion_dataset, read_idx
    from make_fashion_dataset import SourceError as FashionSourceError

    src = ROOT / "tests" / "fixtures" / "fashion-mnist"  # 3 training and 2 test images per class
    out = tmp_path / "fashion"
    assert make_fashion_dataset(out, src) == {"train": 30, "val": 20}
    assert make_fashion_dataset(out, src, limit_per_class=1) == {"train": 10, "val": 10}  # its own: replaced
    assert make_fashion_dataset(out, src) == {"train": 30, "val": 20}
    images = read_idx(src / "t10k-images-idx3-ubyte.gz", 3)
    rows = (out / "LOC_val_solution.csv").read_text().splitlines()[1:]
    first_id = rows[0].split(",")[0]
    with Image.open(out / "val" / f"{first_id}.png") as png:
        pixels = np.asarray(png)
    assert pixels.shape == (32, 32) and not pixels[:2].any() and not pixels[:, -2:].any()  # 2 px of background
    assert np.array_equal(pixels[2:30, 2:30], images[0])  # no pixel resampled or re-encoded
    mapping = (out / "LOC_synset_mapping.txt").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in mapping] == CLASSES
    manifest = convert(out, tmp_path / "shards", "wds", options=ConvertOptions(min_side=0), workers=1)
    assert manifest["splits"]["train"]["num_samples"] == 30 and manifest["splits"]["val"]["num_samples"] == 20
    assert manifest["class_names"] == CLASSES
    # a damaged source is named, and nothing is written
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.glob("*.gz"):
        (broken / f.name).write_bytes(f.read_bytes())
    whole = gzip.decompress((src / "train-images-idx3-ubyte.gz").read_bytes())
    (broken / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(whole[:-100]))
    with pytest.raises(FashionSourceError, match="train-images-idx3-ubyte.gz holds .* it is truncated; fetch it again"):
        make_fashion_dataset(tmp_path / "never", broken)
    with pytest.raises(FashionSourceError, match="is missing: install Debian's dataset-fashion-mnist"):
        make_fashion_dataset(tmp_path / "never", tmp_path / "nowhere")
    assert not (tmp_path / "never").exists()


def test_stored_size_keeps_what_evaluation_and_full_scale_crops_need() -> None:
    from lsa_dist.data.images import stored_size

    assert stored_size(500, 375, 500, 256) is None  # a typical ImageNet photo is kept as it is
    assert stored_size(1000, 750, 500, 256) == (500, 375)
    assert stored_size(2000, 500, 500, 256) == (1024, 256)  # a panorama keeps a 256 px shorter side
    assert stored_size(500, 2000, 500, 256) == (256, 1024)
    assert stored_size(200, 150, 500, 256) is None  # never enlarged
    assert stored_size(2000, 500, 500, 0) == (500, 125)  # --min-side 0: the longer side rules
    assert stored_size(500, 375, 256, 0) == (256, 192)  # the old default: 192 px, upsampled by eval


def test_awkward_files_are_fixed_or_reported(awkward_source: Path, tmp_path: Path) -> None:
    manifest = convert(awkward_source, tmp_path / "out", "wds", ("train",), ConvertOptions(max_side=128, min_side=0))
    entry = manifest["splits"]["train"]
    assert entry["num_source_files"] == 8 and entry["num_samples"] == 5
    assert entry["fixed"] == {
        "cmyk converted to RGB": 1,
        "grayscale converted to RGB": 1,
        "png re-encoded as JPEG": 1,
    }
    reasons = {Path(s["path"]).name: s["reason"] for s in entry["skipped"]}
    assert reasons["n02_1.JPEG"] == "truncated file"
    assert reasons["n02_2.JPEG"] == "empty file"
    assert reasons["n02_3.JPEG"].startswith("not a readable image")
    shard = tmp_path / "out" / "wds" / "train-000000.tar"
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                data = tar.extractfile(member).read()
                with Image.open(io.BytesIO(data)) as image:
                    assert image.format == "JPEG" and image.mode == "RGB"
                    assert max(image.size) <= 128
                    assert not image.info.get("progressive")
                    if member.name.startswith("n01_1."):
                        assert image.size == (128, 64)
    text = summary(manifest)
    assert "5 of 8 images converted" in text and "3 skipped" in text and "truncated file" in text


def test_hostile_folders_convert_with_every_odd_file_reported(awkward_source: Path, tmp_path: Path) -> None:
    """Names real file systems hold and files that are not images: the run never aborts, what is
    not a readable image of sane size is listed with its reason, keys stay unique and traceable."""
    n01 = awkward_source / "train" / "n01"
    photo = (n01 / "n01_3.JPEG").read_bytes()
    (n01 / os.fsdecode(b"caf\xe9_\xff.JPEG")).write_bytes(photo)  # not UTF-8 (Latin-1, say)
    (n01 / ("n01_" + "x" * 240 + ".JPEG")).write_bytes(photo)  # longer than a tar header's 100 bytes
    (n01 / "a b.JPEG").write_bytes(photo)  # would collide with a_b once made safe
    (n01 / "a_b.JPEG").write_bytes(photo)
    (n01 / "folder.JPEG").mkdir()
    (n01 / "inside.JPEG").symlink_to(n01 / "n01_3.JPEG")  # followed: inside the source folder
    (tmp_path / "outside.JPEG").write_bytes(photo)
    (n01 / "outside.JPEG").symlink_to(tmp_path / "outside.JPEG")
    (n01 / "dangling.JPEG").symlink_to(tmp_path / "nowhere.JPEG")
    (n01 / "loop.JPEG").symlink_to(n01 / "loop.JPEG")
    os.mkfifo(n01 / "fifo.JPEG")  # reading it would block for ever
    (n01 / "big.JPEG").write_bytes(_jpeg(Image.new("RGB", (500, 500))))  # over --max-pixels 200000
    options = ConvertOptions(max_side=128, min_side=0, max_pixels=200_000)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_imagenet.py"), "--src", str(awkward_source), "--out", str(out)]
        + ["--format", "wds", "--splits", "train", "--max-side", "128", "--min-side", "0", "--max-pixels", "200000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((out / "dataset.json").read_text())["splits"]["train"]
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in entry["skipped"]}
    assert reasons["folder.JPEG"] == "a folder named like an image"
    assert reasons["outside.JPEG"].startswith("a link to outside the source folder")
    assert reasons["dangling.JPEG"] == reasons["loop.JPEG"] == "a dangling or looping link"
    assert reasons["fifo.JPEG"] == "not a regular file (device, pipe or socket)"
    assert reasons["big.JPEG"] == "500x500 pixels, over --max-pixels 200000"
    assert entry["num_samples"] == 5 + 5  # the awkward five, and five odd names (one through a link)
    keys = [key for key, _ in read_labels([str(p) for p in sorted((out / "wds").glob("*.tar"))])]
    assert len(keys) == len(set(keys)) == 10 and all(len(k) <= 80 and "." not in k for k in keys)
    assert sorted(entry["renamed"].values()) == sorted(
        ["a b.JPEG", "caf\\xe9_\\xff.JPEG", "n01_" + "x" * 240 + ".JPEG"]
    )
    assert set(entry["renamed"]) <= set(keys)
    assert "10 of 19 images converted" in proc.stdout and "caf\\xe9_\\xff" not in proc.stderr
    # a resume of an interrupted conversion with other options is refused, naming them
    (out / "dataset.json").unlink()
    with pytest.raises(ConversionError, match=r"converted with other options \(jpeg_quality 90 -> 80\)"):
        convert(awkward_source, out, "wds", ("train",), dataclasses.replace(options, jpeg_quality=80))


def test_colliding_keys_get_unique_keys_whatever_the_listing_order(
    awkward_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files that would share a sample key (a.b.JPEG beside a_b.JPEG, x.JPEG beside x.png, one name
    in two class folders) are all converted under unique keys, the same for the same tree whatever
    order the folders are listed in; the renaming is reported and the .beton holds the same samples."""
    pytest.importorskip("ffcv")
    from lsa_dist.data.ffcv import beton_labels

    n01, n02 = awkward_source / "train" / "n01", awkward_source / "train" / "n02"
    photo = (n01 / "n01_3.JPEG").read_bytes()
    png = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(png, format="PNG")
    for path in (n01 / "a.b.JPEG", n01 / "a_b.JPEG", n01 / "x.JPEG", n02 / "x.JPEG", n02 / "a.b.jpg"):
        path.write_bytes(photo)
    (n01 / "x.png").write_bytes(png.getvalue())
    options = ConvertOptions(max_side=128, min_side=0, samples_per_shard=4)
    manifest = convert(awkward_source, tmp_path / "a", "both", ("train",), options, workers=1)
    entry = manifest["splits"]["train"]
    assert entry["num_samples"] == 5 + 6 and not any("key" in s["reason"] for s in entry["skipped"])
    shards = [str(tmp_path / "a" / "wds" / s["name"]) for s in entry["shards"]]
    labelled = read_labels(shards)
    keys = [key for key, _ in labelled]
    assert len(keys) == len(set(keys)) == 11 and all(SAFE_KEY.fullmatch(k) for k in keys)
    assert {"a_b", "x"} <= set(keys)  # the file whose name is the key keeps it; ties go by name
    collisions = {c["path"]: c for c in entry["collisions"]}
    assert sorted(Path(p).relative_to(awkward_source).as_posix() for p in collisions) == [
        "train/n01/a.b.JPEG",
        "train/n01/x.png",
        "train/n02/a.b.jpg",
        "train/n02/x.JPEG",
    ]
    assert all(c["key"] in keys and entry["renamed"][c["key"]] == Path(p).name for p, c in collisions.items())
    assert collisions[str(n01 / "x.png")]["reason"] == f"key 'x' is also that of {n01 / 'x.JPEG'}"
    text = summary(manifest)
    assert "renamed      4  key shared with another file" in text and f"{n01 / 'x.png'} -> " in text
    # the .beton holds the shards' samples with their labels, in the same order
    assert entry["ffcv"]["num_samples"] == 11
    assert beton_labels(tmp_path / "a" / "ffcv" / "train.beton") == [label for _, label in labelled]
    # the same tree listed in another order: the same keys and byte-identical shards
    listed = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listed(self), reverse=True)))
    again = convert(awkward_source, tmp_path / "b", "wds", ("train",), options, workers=1)["splits"]["train"]
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in entry["shards"]]
    assert again["collisions"] == entry["collisions"] and again["renamed"] == entry["renamed"]


def test_links_out_of_the_source_are_reported_and_skipped(awkward_source: Path, tmp_path: Path) -> None:
    """A class folder or a file that is a link resolving outside --src is named with its target and
    skipped (never read); links that stay inside the source are followed; the run does not abort."""
    train = awkward_source / "train"
    photo = (train / "n01" / "n01_3.JPEG").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "n03").mkdir(parents=True)
    (elsewhere / "n03" / "secret.JPEG").write_bytes(photo)
    (train / "n03").symlink_to(elsewhere / "n03", target_is_directory=True)  # a class folder outside
    (awkward_source / "spare" / "n04").mkdir(parents=True)
    (awkward_source / "spare" / "n04" / "n04_1.JPEG").write_bytes(photo)
    (train / "n04").symlink_to(awkward_source / "spare" / "n04", target_is_directory=True)  # inside: followed
    (train / "n05").symlink_to(train / "n03", target_is_directory=True)  # inside, but leads on to outside
    (train / "n01" / "via.JPEG").symlink_to(train / "n03" / "secret.JPEG")  # the same, for a file
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_imagenet.py"), "--src", str(awkward_source), "--out", str(out)]
        + ["--format", "wds", "--splits", "train", "--max-side", "128", "--min-side", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "dataset.json").read_text())
    entry = manifest["splits"]["train"]
    reasons = {s["path"]: s["reason"] for s in entry["skipped"]}
    target = (elsewhere / "n03").resolve()
    assert reasons[str(train / "n03")] == f"a link to outside the source folder ({target})"
    assert reasons[str(train / "n05")] == f"a link to outside the source folder ({target})"
    assert reasons[str(train / "n01" / "via.JPEG")] == f"a link to outside the source folder ({target / 'secret.JPEG'})"
    assert not any("secret" in p for p in reasons)  # the files behind a skipped folder are never listed
    keys = [key for key, _ in read_labels([str(p) for p in sorted((out / "wds").glob("*.tar"))])]
    assert "n04_1" in keys and "secret" not in keys and entry["num_samples"] == 5 + 1
    assert manifest["classes"] == ["n01", "n02", "n03", "n04", "n05"]  # labels do not shift when a link is skipped
    assert f"{train / 'n03'}: a link to outside the source folder ({target})" in proc.stdout
    # a split folder that leads outside cannot be skipped: the error names it and where it points
    (awkward_source / "val").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(SourceError, match=re.escape(f"{awkward_source / 'val'} is a link to outside the source")):
        convert(awkward_source, tmp_path / "o2", "wds", ("train", "val"), ConvertOptions(max_side=128, min_side=0))


def test_a_worker_killed_mid_conversion_fails_the_run_instead_of_hanging(demo_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "convert_imagenet.py"), "--src", str(demo_source), "--out", str(out)]
    cmd += ["--format", "wds", "--splits", "train", "--samples-per-shard", "10", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.time() + 120, False
    while time.time() < deadline and not killed and proc.poll() is None:
        time.sleep(0.2)
        for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            try:
                if b"convert_imagenet" in Path(f"/proc/{child}/cmdline").read_bytes():  # a forked worker
                    os.kill(int(child), signal.SIGKILL)  # as the out-of-memory killer would
                    killed = True
                    break
            except (OSError, ProcessLookupError):  # gone in between: try the next one
                continue
    assert killed, "no worker to kill"
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: a conversion worker died" in err and "run the same command again" in err


def test_interrupted_conversion_resumes_without_redoing_shards(demo_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "convert_imagenet.py"), "--src", str(demo_source), "--out", str(out)]
    cmd += ["--format", "wds", "--splits", "train", "--samples-per-shard", "20", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / "wds" / ".records"
    deadline = time.time() + 120
    while time.time() < deadline and not (records.exists() and len(list(records.glob("*.json"))) >= 5):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name[: -len(".json")] for p in records.glob("*.json")}
    assert 5 <= len(finished) < 72, "the conversion should have been killed part-way"
    before = {name: (out / "wds" / name).stat().st_mtime_ns for name in finished}
    assert not (out / "dataset.json").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} of 72 shards already finished" in rerun.stdout
    for name, mtime in before.items():
        assert (out / "wds" / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert not list((out / "wds").glob("*.tmp-*"))
    # the result is the same as an uninterrupted conversion
    clean = convert(demo_source, tmp_path / "clean", "wds", ("train",), ConvertOptions(samples_per_shard=20))
    resumed = json.loads((out / "dataset.json").read_text())
    assert [s["sha256"] for s in resumed["splits"]["train"]["shards"]] == [
        s["sha256"] for s in clean["splits"]["train"]["shards"]
    ]
    # a record is trusted for its own shard only: one that names another file is converted again
    tampered = records / f"{min(finished)}.json"
    tampered.write_text(json.dumps({**json.loads(tampered.read_text()), "name": "a;touch ran;#.tar"}))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "71 of 72 shards already finished" in again.stdout, again.stderr
    assert json.loads((out / "dataset.json").read_text())["splits"] == resumed["splits"]


def test_converter_errors_name_the_problem(demo_source: Path, awkward_source: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "o1", "wds")
    flat = tmp_path / "flat"
    shutil.copytree(demo_source, flat)
    (flat / "LOC_val_solution.csv").unlink()
    with pytest.raises(SourceError, match="no label file was found.*--val-labels"):
        convert(flat, tmp_path / "o2", "wds")
    convert(awkward_source, tmp_path / "o3", "wds", ("train",))
    with pytest.raises(ConversionError, match=r"different options \(max_side, min_side\); convert into a new --out"):
        convert(awkward_source, tmp_path / "o3", "wds", ("train",), ConvertOptions(max_side=64, min_side=0))
    with pytest.raises(ConversionError, match=r"--min-side must be in 0..--max-side \(128\), got 256"):
        convert(awkward_source, tmp_path / "o4", "wds", ("train",), ConvertOptions(max_side=128))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_imagenet.py"),
            "--src",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "o4"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        proc.returncode == 2 and proc.stderr.strip().startswith("error: source folder") and proc.stderr.count("\n") == 1
    )


def test_ffcv_only_conversion_leaves_no_shards(awkward_source: Path, tmp_path: Path) -> None:
    manifest = convert(awkward_source, tmp_path / "out", "ffcv", ("train",), workers=1)
    assert (tmp_path / "out" / "ffcv" / "train.beton").is_file()
    assert not (tmp_path / "out" / "wds").exists() and not (tmp_path / "out" / ".staging-wds").exists()
    assert manifest["formats"] == ["ffcv"] and manifest["splits"]["train"]["ffcv"]["num_samples"] == 5


# -- the pipelines ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_two_ranks_two_workers_see_disjoint_samples_covering_the_epoch(demo_shards: Path, fmt: str) -> None:
    loaders = [build_loader(data_cfg(demo_shards, fmt), "train", rank, 2, train=True) for rank in range(2)]
    per_rank = [epoch_keys(loader, 0) for loader in loaders]
    assert [len(batches) for batches in per_rank] == [len(loaders[0])] * 2 == [1438 // 32] * 2
    assert all(len(batch) == 16 for batches in per_rank for batch in batches)
    rank_sets = [{k for batch in batches for k in batch} for batches in per_rank]
    assert not rank_sets[0] & rank_sets[1]
    assert sum(len(s) for s in rank_sets) == (1438 // 32) * 32  # all but the remainder, each once


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_evaluation_covers_every_sample_once_with_padding(demo_shards: Path, fmt: str) -> None:
    loaders = [build_loader(data_cfg(demo_shards, fmt), "val", rank, 2, train=False) for rank in range(2)]
    batches = [list(loader.epoch(0, return_keys=True)) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == 12  # ceil(ceil(359 / 2) / 16)
    keys = [k for rank in batches for _, _, ks in rank for k in ks if k not in ("", -1)]
    assert len(keys) == len(set(keys)) == 359
    labels = torch.cat([y for rank in batches for _, y, _ in rank])
    assert (labels == PAD_LABEL).sum() == 2 * 12 * 16 - 359


def test_same_seed_same_order_and_epochs_differ(demo_shards: Path) -> None:
    make = lambda seed: build_loader(data_cfg(demo_shards), "train", 0, 1, train=True, seed=seed)  # noqa: E731
    first, again, other = epoch_keys(make(3), 1), epoch_keys(make(3), 1), epoch_keys(make(4), 1)
    assert first == again and first != other
    assert first != epoch_keys(make(3), 2)


def test_pixels_are_deterministic_given_seed_and_epoch(demo_shards: Path) -> None:
    cfg = data_cfg(demo_shards, augment=AugmentConfig(recipe="imagenet", rand_augment="rand-m9-mstd0.5-inc1"))
    a = next(iter(build_loader(cfg, "train", 0, 1, train=True).epoch(2)))
    b = next(iter(build_loader(cfg, "train", 0, 1, train=True).epoch(2)))
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("fmt,start", [("wds", 5), ("wds", 1), ("ffcv", 7)])
def test_resume_continues_with_exactly_the_samples_left(demo_shards: Path, fmt: str, start: int) -> None:
    loader = build_loader(data_cfg(demo_shards, fmt), "train", 1, 2, train=True, seed=11)
    full = epoch_keys(loader, 3)
    assert epoch_keys(loader, 3, start) == full[start:]
    assert epoch_keys(loader, 3, len(full)) == []


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_an_epoch_resumed_on_other_world_sizes_reads_every_sample_once(demo_shards: Path, fmt: str) -> None:
    """2 ranks x 2 workers read 9 batches of 16, 1 rank x 1 worker 13 batches of 8 (restarted
    once inside), 3 ranks x 2 workers the rest in batches of 16: no sample twice, none lost
    beyond one global batch of the last layout. The shuffle buffer makes what a worker
    consumed other than a prefix of its span."""

    def keys(world: int, workers: int, batch: int, layouts: list[Layout], batches: int | None = None, start=0) -> list:
        cfg = data_cfg(demo_shards, fmt, num_workers=workers, shuffle_buffer=100, batch_size=batch)
        loaders = [build_loader(cfg, "train", r, world, True, seed=7) for r in range(world)]
        lengths = {loader.batches_left(2, layouts) for loader in loaders}
        assert len(lengths) == 1  # every rank has as many batches
        out = []
        for loader in loaders:
            read = [ks for _, _, ks in loader.epoch(2, start, return_keys=True, layouts=layouts)]
            out.append(read[:batches] if batches is not None else read)
        return out

    first = keys(2, 2, 16, [], 9)
    layouts = [Layout(2, 2, 9, 16)]
    second = keys(1, 1, 8, layouts, 13)
    assert keys(1, 1, 8, layouts, 8, start=5) == [second[0][5:13]]  # a restart inside a layout continues it
    layouts.append(Layout(1, 1, 13, 8))
    third = keys(3, 2, 16, layouts)
    read = [k for part in (first, second, third) for rank in part for batch in rank for k in batch]
    assert len(read) == len(set(read))  # none twice
    left = 1438 - 2 * 9 * 16 - 13 * 8
    assert len(third[0]) == left // 48 and 1438 - len(read) == left % 48 < 3 * 16


def test_webdataset_workers_live_across_epochs_and_restarts(demo_shards: Path) -> None:
    """One DataLoader per loader with persistent workers: a later epoch, and an epoch restarted
    mid-way, run on the same worker processes and still read exactly their samples."""
    loader = build_loader(data_cfg(demo_shards, num_workers=2, shuffle_buffer=100), "train", 0, 1, True, seed=3)
    first = epoch_keys(loader, 0)
    workers = loader._dataloader._iterator._workers
    pids = [w.pid for w in workers]
    assert epoch_keys(loader, 0, 5) == first[5:]
    second = epoch_keys(loader, 1)
    assert second != first and len(second) == len(first)
    assert [w.pid for w in loader._dataloader._iterator._workers] == pids and all(w.is_alive() for w in workers)


def test_a_local_shard_is_entered_at_the_first_sample_wanted(demo_shards: Path) -> None:
    """Mid-shard spans start reading at their first sample (tar headers skimmed, no data read
    before it) and give the same samples as reading the shard from its start."""
    from lsa_dist.data.wds import _from_sample

    shard = str(next((demo_shards / "wds").glob("train-*.tar")))
    everything = read_labels([shard])
    for index in (1, 37, len(everything) - 1, len(everything)):
        reached, samples = _from_sample(shard, index)
        assert reached == index and [(s["__key__"], int(s["cls"])) for s in samples] == everything[index:]


def test_resumed_batches_have_the_same_pixels(demo_shards: Path) -> None:
    loader = build_loader(data_cfg(demo_shards), "train", 0, 1, train=True, seed=5)
    full = [x for x, _ in loader.epoch(1)]
    resumed = [x for x, _ in loader.epoch(1, 6)]
    assert all(torch.equal(a, b) for a, b in zip(full[6:], resumed))


def test_ffcv_and_webdataset_give_the_same_label_distribution(demo_shards: Path) -> None:
    counts = {}
    for fmt in ("wds", "ffcv"):
        loader = build_loader(data_cfg(demo_shards, fmt), "val", 0, 1, train=False)
        labels = torch.cat([y for _, y in loader.epoch(0)])
        counts[fmt] = Counter(labels[labels >= 0].tolist())
    assert counts["wds"] == counts["ffcv"] and sum(counts["wds"].values()) == 359
    train = {}
    for fmt in ("wds", "ffcv"):
        loader = build_loader(data_cfg(demo_shards, fmt), "train", 0, 1, train=True)
        train[fmt] = np.bincount(torch.cat([y for _, y in loader.epoch(0)]).numpy(), minlength=10)
    assert np.abs(train["wds"] - train["ffcv"]).sum() <= 2 * (1438 - 1424)  # only the dropped remainders differ


def test_batches_are_uint8_and_model_input_is_normalised(demo_shards: Path) -> None:
    info = load_dataset_info(demo_shards)
    for fmt, normalize in (("wds", "imagenet"), ("ffcv", "imagenet"), ("wds", "dataset"), ("ffcv", "dataset")):
        loader = build_loader(data_cfg(demo_shards, fmt, normalize=normalize), "val", 0, 1, train=False)
        images, labels = next(iter(loader.epoch(0)))
        assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64
        x = loader.to_model_input(images)
        assert x.dtype == torch.float32
        mean, std = (0.485, 0.229) if normalize == "imagenet" else (info.mean[0], info.std[0])  # timm's, DeiT's
        expected = (images[:, 0].float() / 255 - mean) / std
        torch.testing.assert_close(x[:, 0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_progressive_resizing_changes_the_training_size_per_epoch(demo_shards: Path, fmt: str) -> None:
    """data.progressive: epoch 0 at 24 px, epoch 2 on at 32 (via 28 at epoch 1); evaluation at
    data.image_size throughout; the samples of an epoch do not depend on its size."""
    schedule = ProgressiveConfig(start=24, end=32, first_epoch=0, last_epoch=2, multiple=4)
    cfg = data_cfg(demo_shards, fmt, progressive=schedule, num_workers=1)
    train = build_loader(cfg, "train", 0, 2, train=True)
    for epoch, size in ((0, 24), (1, 28), (2, 32), (0, 24)):
        images, _ = next(iter(train.epoch(epoch)))
        assert images.shape == (16, 3, size, size), (epoch, images.shape)
    assert epoch_keys(train, 1) == epoch_keys(
        build_loader(data_cfg(demo_shards, fmt, num_workers=1), "train", 0, 2, train=True), 1
    )
    images, _ = next(iter(build_loader(cfg, "val", 0, 1, train=False).epoch(0)))
    assert images.shape[2:] == (32, 32)


def test_eval_preprocessing_is_timms_on_a_real_photo() -> None:
    """A real photograph (scikit-learn's china.jpg, 640x427): our eval tensor (JPEG bytes ->
    uint8 in the loader, normalised per batch) is timm's create_transform output within 1/255,
    for lsa_tiny's 224 px and another size; the official fixture's model gives the same logits
    on both."""
    import sklearn.datasets
    from timm.data import create_transform

    from lsa_dist.data.transforms import ModelInput, normalization
    from lsa_dist.models import from_official

    photo = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    cfg = DataConfig()  # the paper's defaults: bicubic, crop_pct 0.875, ImageNet mean/std
    mean, std = normalization(cfg, (0.5,) * 3, (0.5,) * 3)
    for size in (224, 160):
        uint8 = sample_transform(cfg.augment, size, train=False)(photo.read_bytes())
        ours = ModelInput(mean, std, cfg.augment, train=False)(uint8[None])[0]
        timm_eval = create_transform(input_size=size, crop_pct=0.875, interpolation="bicubic", is_training=False)
        theirs = timm_eval(Image.open(photo).convert("RGB"))
        assert ours.shape == theirs.shape == (3, size, size)
        scale = torch.tensor(std).view(3, 1, 1)
        assert ((ours - theirs) * scale).abs().max() <= 1 / 255 + 1e-6
    fixture = torch.load(Path(__file__).parent / "fixtures" / "official_lsa" / "official_imagenet_tiny_style.pt")
    model = from_official(fixture["config"], fixture["state_dict"], image_size=224).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ours[None]), model(theirs[None]), atol=1e-4, rtol=0)


def test_random_erasing_runs_per_batch_for_the_imagenet_recipe(demo_shards: Path) -> None:
    cfg = data_cfg(demo_shards, augment=AugmentConfig(recipe="imagenet", reprob=1.0))
    loader = build_loader(cfg, "train", 0, 1, train=True)
    images, _ = next(iter(loader.epoch(0)))
    torch.manual_seed(0)
    erased = loader.to_model_input(images)
    plain = build_loader(data_cfg(demo_shards), "train", 0, 1, train=True).to_model_input(images)
    assert (erased != plain).float().mean() > 0.01  # every image got a noise rectangle


def test_pipe_urls_read_the_same_samples(demo_shards: Path) -> None:
    local = build_loader(data_cfg(demo_shards), "val", 0, 1, train=False)
    piped = build_loader(data_cfg(demo_shards, urls=f"pipe:cat {demo_shards}/wds/{{shard}}"), "val", 0, 1, train=False)
    assert epoch_keys(local, 0) == epoch_keys(piped, 0)


# A training process's stand-in: stop signals set a flag (as lsa_dist.stop does), every batch of
# the epoch is read, "first" printed after the first one; then the count, and whether asked to stop.
GROUP_READER = """
import signal, sys
from lsa_dist.config import DataConfig
from lsa_dist.data import build_loader
asked = []
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, lambda n, _: asked.append(n))
cfg = DataConfig(root=sys.argv[1], urls=sys.argv[2], num_workers=int(sys.argv[3]), batch_size=16, image_size=32)
n = 0
for _ in build_loader(cfg, "val", 0, 1, train=False).epoch(0):
    n += 1
    if n == 1:
        print("first", flush=True)
print(n, asked, flush=True)
"""


@pytest.fixture(scope="module")
def shard_server(demo_shards: Path):
    """The demo shards over http on a free local port (in this process, outside the reader's group)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(demo_shards))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(  # each signal, worker count and reader at least twice, each pair once
    "sig,workers,reader",
    [
        (signal.SIGTERM, 1, "pipe"),
        (signal.SIGTERM, 0, "http"),
        (signal.SIGUSR1, 0, "pipe"),
        (signal.SIGUSR1, 1, "http"),
    ],
)
def test_a_stop_signal_to_the_whole_process_group_kills_no_loader_worker_or_shard_reader(
    demo_shards: Path, shard_server: str, tmp_path: Path, reader: str, workers: int, sig: int
) -> None:
    """Schedulers signal every process of a job (killpg; a SLURM step): loader workers and the
    shell and curl reading a shard survive it, so the training process alone decides to stop."""
    slow = f"pipe:sleep 0.3; cat {demo_shards}/wds/{{shard}}"  # each shard read takes a while
    urls = slow if reader == "pipe" else f"{shard_server}/wds/{{shard}}"
    script = tmp_path / "reader.py"
    script.write_text(GROUP_READER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(demo_shards), urls, str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.stdout is not None and proc.stdout.readline() == "first\n", proc.communicate()
    os.killpg(proc.pid, sig)  # a shard is being read: the second one at least is still to come
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert out.strip() == f"23 [{int(sig)}]"  # 359 images in batches of 16, every one read


# A process that reads a batch from a training and a validation loader, each with a persistent
# loader worker, then ends through the interpreter's exit (as a SLURM task does, by submitit).
TWO_LOADERS = """
import sys
from lsa_dist.config import DataConfig
from lsa_dist.data import build_loader
cfg = DataConfig(root=sys.argv[1], num_workers=1, batch_size=16, image_size=32)
loaders = [build_loader(cfg, split, 0, 1, train=split == "train") for split in ("train", "val")]
epochs = [loader.epoch(0) for loader in loaders]  # under way at the exit, as a run's may be
for epoch in epochs:
    next(epoch)
print("read", flush=True)
"""


def test_a_process_with_two_loaders_worth_of_workers_exits(demo_shards: Path, tmp_path: Path) -> None:
    """At the interpreter's exit every loader worker is killed before any is waited for: the
    first one's death (torch's SIGCHLD handler raises on it) does not leave the second to
    multiprocessing's exit handler, which would wait forever on a worker that ignores SIGTERM."""
    script = tmp_path / "two_loaders.py"
    script.write_text(TWO_LOADERS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, str(script), str(demo_shards)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        subprocess.run(["pkill", "-9", "-f", str(script)])
        raise AssertionError("the process did not exit: a loader worker was left to be waited for") from None
    assert proc.returncode == 0 and out == "read\n"
    assert "Exception ignored in atexit" not in err and "is killed by signal" not in err, err


def spoil_jpeg(shard: Path, index: int) -> str:
    """Overwrite the JPEG of the shard's `index`-th sample with garbage of the same size (the
    tar stays valid); returns the sample's key."""
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][index]
    with shard.open("r+b") as f:
        f.seek(member.offset_data)
        f.write(np.random.default_rng(0).integers(0, 256, member.size, dtype=np.uint8).tobytes())
    return member.name.rsplit(".", 1)[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_jpeg_is_skipped_named_and_counted_and_too_many_stop_the_run(
    shards_copy: Path, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage in place of one training and one validation JPEG (checksums off): training
    batches keep their size (a neighbour's copy takes the place), evaluation scores one image
    fewer, each bad sample is named once in a warning; with data.max_bad_samples=0 the run stops
    in one line naming the shard and key."""
    train_key = spoil_jpeg(shards_copy / "wds" / "train-000001.tar", 5)
    val_key = spoil_jpeg(shards_copy / "wds" / "val-000000.tar", 7)
    cfg = data_cfg(shards_copy, num_workers=workers, augment=AugmentConfig(recipe="imagenet", mixup=0.8))
    train = build_loader(cfg, "train", 0, 1, train=True)
    with caplog.at_level("WARNING"):
        batches = list(train.epoch(0, return_keys=True))
    assert all(len(keys) == 16 for _, _, keys in batches) and len(batches) == train.num_batches
    assert train.skipped.count == 1 and sum(keys.count(train_key) for _, _, keys in batches) == 0
    named = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert len(named) == 1 and f"skipped sample {train_key} of " in named[0] and "train-000001.tar" in named[0]
    again = [x for x, _ in train.epoch(0)]  # the same pixels on every read: resume stays exact
    assert all(torch.equal(a, b) for a, (b, _, _) in zip(again, batches))
    val = build_loader(cfg, "val", 0, 1, train=False)
    scored = [key for _, _, keys in val.epoch(0, return_keys=True) for key in keys if key]
    assert len(scored) == 358 and val_key not in scored and val.skipped.count == 1
    strict = build_loader(dataclasses.replace(cfg, max_bad_samples=0), "train", 0, 1, train=True)
    with pytest.raises(DatasetError) as err:
        list(strict.epoch(0))
    message = str(err.value)
    assert "\n" not in message and train_key in message and "train-000001.tar" in message
    assert "data.max_bad_samples=0" in message


# -- errors before training -----------------------------------------------------------------


@pytest.fixture()
def shards_copy(demo_shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(demo_shards, copy, ignore=shutil.ignore_patterns("ffcv"))
    return copy


@pytest.mark.parametrize(
    "field,value",
    [("shard", "x;touch {marker};#.tar"), ("shard", "../../outside.tar"), ("wds_dir", "/etc"), ("ffcv", "../x.beton")],
)
def test_names_in_dataset_json_that_are_not_safe_file_names_are_refused(
    shards_copy: Path, field: str, value: str
) -> None:
    """dataset.json's names go into paths and into `pipe:` commands run by a shell: shell syntax,
    '..' and absolute paths are refused when the file is read, before anything runs."""
    marker = shards_copy / "ran"
    manifest_path = shards_copy / "dataset.json"
    manifest = json.loads(manifest_path.read_text())
    value = value.format(marker=marker)
    if field == "shard":
        manifest["splits"]["val"]["shards"][0]["name"] = value
    elif field == "wds_dir":
        manifest["wds_dir"] = value
    else:
        manifest["splits"]["val"]["ffcv"] = {"name": value, "bytes": 1}
    manifest_path.write_text(json.dumps(manifest))
    cfg = data_cfg(shards_copy, urls=f"pipe:cat {shards_copy}/wds/{{shard}}")
    with pytest.raises(DatasetError) as err:
        build_loader(cfg, "val", 0, 1, train=False)
    assert f"{value!r} is not a safe file name" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_shard_names_are_quoted_for_the_shell_in_pipe_urls(shards_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a name that got past the check reaches a `pipe:` command as one quoted word: the
    shell runs `cat` on the file of that name, nothing else."""
    from lsa_dist.data.wds import WebDatasetLoader

    monkeypatch.chdir(shards_copy)  # where the shell would create the file
    marker = shards_copy / "ran"
    hostile = "a;touch ran;#.tar"
    info = load_dataset_info(shards_copy)
    first = info.splits["val"].shards[0]
    (shards_copy / "wds" / first.name).rename(shards_copy / "wds" / hostile)
    val = info.splits["val"]
    shards = (dataclasses.replace(first, name=hostile), *val.shards[1:])
    info.splits["val"] = dataclasses.replace(val, shards=shards)
    cfg = data_cfg(shards_copy, urls=f"pipe:cat {shards_copy}/wds/{{shard}}", num_workers=0)
    loader = WebDatasetLoader(info, "val", cfg, 0, 1, False, 0)
    keys = [k for batch in epoch_keys(loader, 0) for k in batch if k]
    assert len(keys) == 359 and not marker.exists()


def test_missing_shard_is_named(shards_copy: Path) -> None:
    (shards_copy / "wds" / "train-000003.tar").unlink()
    with pytest.raises(DatasetError, match=r"missing data file .*train-000003.tar: re-run tools/convert_imagenet.py"):
        build_loader(data_cfg(shards_copy), "train", 0, 1, train=True)


def test_shard_that_disagrees_with_dataset_json_is_named(shards_copy: Path) -> None:
    shard = shards_copy / "wds" / "val-000001.tar"
    with shard.open("ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DatasetError, match=r"val-000001.tar has \d+ bytes but dataset.json records \d+"):
        build_loader(data_cfg(shards_copy), "val", 0, 1, train=False)


def test_corrupt_shard_of_the_right_size(shards_copy: Path) -> None:
    shard = shards_copy / "wds" / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[:1024] = os.urandom(1024)
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="does not match its checksum"):
        build_loader(data_cfg(shards_copy, check_checksums=True), "val", 0, 1, train=False)
    loader = build_loader(data_cfg(shards_copy, num_workers=0), "val", 0, 1, train=False)
    with pytest.raises(DatasetError, match=r"val-000000.tar"):
        list(loader.epoch(0))


def test_split_smaller_than_ranks_times_batch(demo_shards: Path) -> None:
    with pytest.raises(DatasetError, match=r"has 359 samples, fewer than 4 ranks x batch 100 = 400"):
        build_loader(data_cfg(demo_shards, batch_size=100), "val", 0, 4, train=False)


def test_missing_dataset_json_and_wrong_format(tmp_path: Path, demo_shards: Path) -> None:
    with pytest.raises(DatasetError, match="no dataset.json in"):
        build_loader(data_cfg(tmp_path), "train", 0, 1, train=True)
    with pytest.raises(DatasetError, match="data.format must be 'wds' or 'ffcv', got 'tfrecord'"):
        build_loader(data_cfg(demo_shards, "tfrecord"), "train", 0, 1, train=True)
    with pytest.raises(DatasetError, match="has no split 'test'"):
        build_loader(data_cfg(demo_shards), "test", 0, 1, train=False)


# -- transforms ------------------------------------------------------------------------------


def test_recipes_produce_the_documented_shapes() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 341, 3), dtype=np.uint8))
    data = _jpeg(image)
    for recipe in ("imagenet", "basic", "none"):
        out = sample_transform(AugmentConfig(recipe=recipe), 224, train=True)(data)
        assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    assert sample_transform(AugmentConfig(), 224, train=False)(data).shape == (3, 224, 224)
    small = _jpeg(image.resize((32, 32)))
    assert sample_transform(AugmentConfig(recipe="cifar"), 32, train=True)(small).shape == (3, 32, 32)
    mixup = build_mixup(AugmentConfig(), num_classes=10)
    x, y = mixup(torch.randn(4, 3, 8, 8), torch.arange(4))
    assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4))
    assert build_mixup(AugmentConfig(mixup=0, cutmix=0), 10) is None
    with pytest.raises(ValueError, match="data.augment.recipe must be one of"):
        sample_transform(AugmentConfig(recipe="autoaug"), 224, train=True)


def test_eval_transform_resizes_by_crop_pct() -> None:
    # a 256x256 image: resized to 224 / 0.875 = 256 (a no-op), center crop 224 = pixels 16..240
    image = np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    data = _jpeg(Image.fromarray(image), quality=100, subsampling=0)
    out = sample_transform(AugmentConfig(crop_pct=0.875), 224, train=False)(data)
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert np.abs(out.permute(1, 2, 0).numpy().astype(int) - decoded[16:240, 16:240].astype(int)).max() <= 1


def test_imagenet_recipe_survives_the_strongest_randaugment() -> None:
    # At magnitude 10 timm's increasing posterize keeps 0 bits; Pillow 13 raises on that.
    transform = sample_transform(AugmentConfig(rand_augment="rand-m10-mstd0-inc1"), 32, train=True)
    data = _jpeg(Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)))
    for _ in range(200):
        assert transform(data).shape == (3, 32, 32)


def test_ffcv_randaugment_runs_beside_the_trainer_from_its_own_seeded_generator(demo_shards: Path) -> None:
    """The imagenet recipe's RandAugment on FFCV batches runs batched in a background thread with
    its choices drawn from a generator of (seed, epoch, rank, batch): the same seed gives the same
    choices, batched gives what image by image gives, torch's global random stream (the training
    step's) is not drawn from, and an epoch abandoned half-way ends its thread."""
    import threading

    from lsa_dist.data.ffcv import SeededRandAugment

    augment = SeededRandAugment(num_ops=2, magnitude=9)
    image = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 32, 32)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    same = [augment.augment(image, np.random.default_rng([7, 1])) for _ in range(2)]
    other = augment.augment(image, np.random.default_rng([7, 2]))
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], other)
    # batched (each operation once per group of images that drew it) = image by image, bit for bit
    batch = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    for seed in range(4):
        one_by_one = [augment.augment(img, rng) for rng in [np.random.default_rng([seed])] for img in batch]
        assert torch.equal(augment.augment_batch(batch, np.random.default_rng([seed])), torch.stack(one_by_one))
    assert torch.equal(torch.get_rng_state(), before)  # the global generator was not touched
    cfg = data_cfg(demo_shards, "ffcv", augment=AugmentConfig(recipe="imagenet", rand_augment="rand-m9-mstd0.5-inc1"))
    loader = build_loader(cfg, "train", 0, 1, True, seed=3)
    batches = loader.epoch(0)
    images, labels = next(batches)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (16,)
    assert any(t.name == "ffcv-randaugment" for t in threading.enumerate())
    batches.close()  # a stop request mid-epoch
    assert not any(t.name == "ffcv-randaugment" for t in threading.enumerate())
    assert sum(len(y) for _, y in loader.epoch(1)) == len(loader) * 16  # the next epoch reads whole
