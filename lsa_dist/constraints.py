"""Dataclass fields that declare their own constraints, and the walk that checks them.

A schema (lsa_dist.config) declares each field with `knob`, so a field's valid values sit on the
field itself rather than in tables beside the schema that can drift from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import field
from typing import Any


def knob(default: Any, *, interval: str = "", choices: tuple[str, ...] = (), math: bool = False) -> Any:
    """A field with its constraints: `interval` "[low, high)" ("(", ")": that end excluded; a list's
    each element of a list or tuple; always finite), `choices`, and `math`: part of a run's mathematics (on a section:
    every key below it). A list or a section (a dataclass) is built afresh for each instance."""
    metadata = {"interval": interval, "choices": choices, "math": math}
    if isinstance(default, type):
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def walk_fields(obj: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """(dotted key, field, value) for every field of a dataclass instance, a section before its fields."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield prefix + f.name, f, value
        if dataclasses.is_dataclass(value):
            yield from walk_fields(value, f"{prefix}{f.name}.")


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` is finite and inside `interval`, written as in `knob`."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def violations(obj: Any) -> Iterator[str]:
    """One line per field of `obj` outside its choices or interval, naming the key, in field order."""
    for key, f, value in walk_fields(obj):
        options, interval = f.metadata.get("choices"), f.metadata.get("interval")
        shown = list(value) if isinstance(value, tuple) else value
        items = shown if isinstance(shown, list) else [shown]
        if options and value not in options:
            yield f"{key}: must be one of {', '.join(options)}, got {value!r}"
        elif interval and not all(in_interval(float(x), interval) for x in items):
            yield f"{key}: must be a finite number in {interval}, got {shown}"
