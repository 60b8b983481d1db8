"""Sample keys: a WebDataset-safe, unique name for every source file of a split.

A key is the file name without its extension (it traces the sample back to ImageNet). Names
that would give the same key (a.b.JPEG beside a_b.JPEG, x.JPEG beside x.png, one name in two
class folders) keep one file on the key and give the others the key plus a digest of their path.
Who keeps it depends on the names alone, so the same tree always gets the same keys, and the
same shards, whatever order the file system lists it in.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from itertools import count
from pathlib import Path

SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,80}")  # WebDataset: no dots; tar: short ASCII names


def shown(path: Path | str) -> str:
    """A path as text that can always be printed and stored in JSON: bytes that are not UTF-8
    appear as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def sample_key(path: Path) -> str:
    """A WebDataset-safe key for a source file: its name without extension, dots replaced. A name
    that is not plain ASCII letters, digits, '_' and '-' (or longer than 80) keeps its safe
    characters and gets a digest of its bytes, traceable by the split's `renamed`."""
    stem = path.name.rsplit(".", 1)[0].replace(".", "_")
    if SAFE_KEY.fullmatch(stem):
        return stem
    digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:60]
    return f"{safe}-{digest}"


def unique_keys(files: Sequence[tuple[Path, str]], root: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The keys of `files` ((path, key) pairs of one split) made unique, in the same order, and
    a report of each file given another key (path, new key, whose key it shares).

    Of the files sharing a key, the one whose name without extension is the key keeps it (a_b.JPEG
    rather than a.b.JPEG); ties go to the smallest path (as bytes, relative to `root`)."""
    sharing: dict[str, list[Path]] = {}
    for path, key in files:
        sharing.setdefault(key, []).append(path)
    taken = set(sharing)
    new: dict[Path, str] = {}
    report = []
    for key in sorted(k for k, paths in sharing.items() if len(paths) > 1):
        keeper, *others = sorted(sharing[key], key=lambda p: _claim(p, key, root))
        for path in others:
            new[path] = _free_key(key, path, root, taken)
            taken.add(new[path])
            report.append(
                {"path": shown(path), "key": new[path], "reason": f"key {key!r} is also that of {shown(keeper)}"}
            )
    return [new.get(path, key) for path, key in files], report


def _claim(path: Path, key: str, root: Path) -> tuple[bool, bytes]:
    """Sort order of the files sharing `key`: the first keeps it."""
    return path.name.rsplit(".", 1)[0] != key, os.fsencode(path.relative_to(root))


def _free_key(key: str, path: Path, root: Path, taken: set[str]) -> str:
    """`key` plus a digest of the file's path under `root`: a key no other file has (at most 80
    characters)."""
    digest = hashlib.sha256(os.fsencode(path.relative_to(root))).hexdigest()[:12]
    candidates = (f"{key[:60]}-{digest}" + (f"-{n}" if n else "") for n in count())
    return next(c for c in candidates if c not in taken)


__all__ = ["SAFE_KEY", "sample_key", "shown", "unique_keys"]
