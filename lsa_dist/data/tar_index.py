"""Where the samples of a local tar shard lie, read from its headers alone.

A sample is a run of consecutive members with the same key, the member name up to its first
dot (WebDataset's rule: "n01440764_10026.jpg" and "n01440764_10026.cls" are one sample). The
index gives each member's header offset, data offset and size; the data is seeked over, so
indexing a shard costs one header read per member, and a caller reads only the bytes it wants,
undecoded.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class TarMember:
    """One member of a tar: its place in the file, not its data."""

    key: str  # the sample it belongs to
    ext: str  # the field it holds ("jpg", "cls")
    header: int  # offset of its first header block: a reader entering the tar here sees this member first
    offset: int  # offset of its data
    size: int

    @property
    def end(self) -> int:
        """Offset just past its data, padded to whole blocks: where the next header starts."""
        return self.offset + -(-self.size // BLOCK) * BLOCK


@dataclass(frozen=True)
class TarSample:
    """The members of one sample, by field."""

    key: str
    fields: dict[str, TarMember]
    offset: int  # header of its first member
    end: int  # past its last member

    def read(self, f: BinaryIO, ext: str) -> bytes:
        """The raw bytes of field `ext` (KeyError when the sample has none), read from `f`, the open shard."""
        return read_member(f, self.fields[ext])


def tar_members(path: str | Path) -> Iterator[TarMember]:
    """The members of the uncompressed tar at `path`, in order (headers only)."""
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            yield TarMember(key, ext, info.offset, info.offset_data, info.size)


def tar_samples(path: str | Path) -> Iterator[TarSample]:
    """The samples of the tar at `path`, in order: consecutive members grouped by key. A sample
    is handed out when the next one's first header has been read (or the tar has ended)."""
    members: list[TarMember] = []
    for member in tar_members(path):
        if members and member.key != members[0].key:
            yield _sample(members)
            members = []
        members.append(member)
    if members:
        yield _sample(members)


def _sample(members: list[TarMember]) -> TarSample:
    # a field written twice in one sample (never by the converter) keeps its first member
    fields: dict[str, TarMember] = {}
    for m in members:
        fields.setdefault(m.ext, m)
    return TarSample(members[0].key, fields, members[0].header, members[-1].end)


def read_member(f: BinaryIO, member: TarMember) -> bytes:
    """A member's data, read from `f`, the open tar file."""
    f.seek(member.offset)
    return f.read(member.size)


__all__ = ["TarMember", "TarSample", "read_member", "tar_members", "tar_samples"]
