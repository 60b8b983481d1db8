"""What an LSA network is, without building one: its config (`LSAConfig`, each field's range
and kind), the shift tables and the named variants. Free of torch and timm, so that a launcher
checks a run's model options before any process starts without importing them.

`lsa_tiny`, `lsa_small` and the CIFAR variants are the paper's models; `lsa_base` and
`lsa_large` extend the ImageNet family (kernel 4 / stride 4 embedding, three stages,
head width 32 then 64) to about 85 M and 300 M parameters.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..constraints import knob, violations

# (dy, dx) offsets of the shifted copies. The first entry is the image itself: its
# tokens are the residual stream; the others only serve as keys and values.
IMAGENET_SHIFTS: tuple[tuple[int, int], ...] = (
    (0, 0),
    (0, 1),
    (0, 2),
    (0, 3),
    (1, 0),
    (2, 0),
    (3, 0),
    (1, 1),
    (2, 2),
    (3, 3),
)
CIFAR_SHIFTS: tuple[tuple[int, int], ...] = (
    (0, 0),
    (1, 0),
    (0, 1),
    (-1, 0),
    (0, -1),
    (2, 0),
    (0, 2),
    (-2, 0),
    (0, -2),
    (1, 1),
    (1, 2),
    (1, -1),
    (-1, 1),
    (-1, 2),
    (-1, -1),
    (2, 1),
    (2, 2),
    (2, -1),
)
SHIFT_MODES = ("pad", "roll")


class ModelConfigError(ValueError):
    """A model configuration that cannot be built, with the offending field named."""


@dataclass(frozen=True)
class LSAConfig:
    """Constructor arguments of an LSA network.

    `shift_mode="pad"` makes copy (dy, dx) by circularly padding dy rows on top and dx
    columns on the left (the copy grows by that much); `"roll"` rolls the image by
    (dy, dx) with wrap-around (same size).
    """

    # every numeric option declares its range here (`knob`); `validate` refuses values outside it
    image_size: int = knob(224, interval="[1, inf)")
    in_chans: int = knob(3, interval="[1, inf)")
    num_classes: int = knob(1000, interval="[1, inf)")
    patch_kernel: int = knob(9, interval="[1, inf)")
    patch_stride: int = knob(7, interval="[1, inf)")
    patch_padding: int = knob(1, interval="[0, inf)")
    shifts: tuple[tuple[int, int], ...] = IMAGENET_SHIFTS
    shift_mode: str = knob("pad", choices=SHIFT_MODES)
    widths: tuple[int, ...] = knob((192, 192, 192, 192), interval="[1, inf)")
    heads: tuple[int, ...] = knob((4, 4, 4, 4), interval="[1, inf)")
    depths: tuple[int, ...] = knob((2, 4, 4, 4), interval="[1, inf)")
    shared_kv: bool = False
    mlp_ratio: float = knob(4.0, interval="(0, inf)")
    qkv_bias: bool = True
    drop_path_rate: float = knob(0.0, interval="[0, 1)")
    drop_path_mode: str = knob("uniform", choices=("uniform", "linear"))
    attn_drop: float = knob(0.0, interval="[0, 1)")
    proj_drop: float = knob(0.0, interval="[0, 1)")

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        self.validate()

    @property
    def num_shifts(self) -> int:
        return len(self.shifts)

    @property
    def grid_sizes(self) -> tuple[int, ...]:
        """Tokens per side at each stage for image_size (max-pool 3/2/1 between stages: ceil(n/2))."""
        return tuple(h for h, _ in self.grids(self.image_size, self.image_size))

    def grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """(rows, columns) of tokens at each stage for an input of height x width pixels."""
        k, s, p = self.patch_kernel, self.patch_stride, self.patch_padding
        h, w = conv_out_size(height, k, s, p), conv_out_size(width, k, s, p)
        sizes = [(h, w)]
        for _ in self.widths[1:]:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            sizes.append((h, w))
        return sizes

    def validate(self) -> None:
        """Raise ModelConfigError naming the first field that makes the model impossible."""

        def fail(key: str, msg: str) -> None:
            raise ModelConfigError(f"model.{key}: {msg}")

        for message in violations(self):  # the ranges and choices declared on the fields
            raise ModelConfigError(f"model.{message}")
        if not self.shifts or self.shifts[0] != (0, 0):
            fail("shifts", "the first shift must be (0, 0): the unshifted image is the residual stream")
        if any(len(s) != 2 for s in self.shifts):
            fail("shifts", "every shift is a (dy, dx) pair")
        if len(set(self.shifts)) != len(self.shifts):
            fail("shifts", "shifts must be distinct")
        if self.shift_mode == "pad" and any(dy < 0 or dx < 0 for dy, dx in self.shifts):
            fail("shifts", "circular-pad shifts pad on top/left and must be >= 0; use shift_mode=roll")
        stages = len(self.widths)
        if stages == 0:
            fail("widths", "at least one stage is needed")
        for name in ("heads", "depths"):
            if len(getattr(self, name)) != stages:
                fail(name, f"has {len(getattr(self, name))} entries but widths has {stages} stages")
        for i, (w, h) in enumerate(zip(self.widths, self.heads)):
            if w % h:
                fail("heads", f"stage {i}: width {w} is not divisible by {h} heads")
        size, k, p = self.image_size, self.patch_kernel, self.patch_padding
        if size + 2 * p < k:
            fail("image_size", f"{size}px is smaller than the patch kernel {k} (padding {p})")


# what each field type takes, for the message when a value is not of it
_KINDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "tuple[int, ...]": "a list of integers",
    "tuple[tuple[int, int], ...]": "a list of [dy, dx] integer pairs",
}


def _coerce(name: str, kind: str, value: Any) -> Any:
    """`value` as a field of type `kind` takes it: integers, numbers (a YAML override's text of
    one included: "nan" reaches the range check as nan) and sequences as tuples. Raises
    ModelConfigError naming the option for a value of another kind, before any layer is built."""
    try:
        if kind == "int":
            return _integer(value)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
                raise TypeError(value)
            return float(value)
        if kind == "bool":
            if isinstance(value, str) or value not in (True, False):
                raise TypeError(value)
            return bool(value)
        if kind == "tuple[int, ...]":
            return tuple(_integer(v) for v in _sequence(value))
        if kind == "tuple[tuple[int, int], ...]":
            return tuple(tuple(_integer(v) for v in _sequence(pair)) for pair in _sequence(value))
    except (TypeError, ValueError):
        raise ModelConfigError(f"model.{name}: must be {_KINDS[kind]}, got {value!r}") from None
    return value


def _integer(value: Any) -> int:
    """An integer, an integral number or the text of an integer as int; TypeError or ValueError
    otherwise (NumPy's numbers, as an official checkpoint's config may hold, are numbers too)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError(value)
    if not isinstance(value, (numbers.Integral, str)) and not float(value).is_integer():
        raise ValueError(value)
    return int(value)


def _sequence(value: Any) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(value)
    return value


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


_IMAGENET_4x4 = dict(patch_kernel=4, patch_stride=4, patch_padding=0, shifts=IMAGENET_SHIFTS, shift_mode="pad")
_CIFAR = dict(
    image_size=32,
    num_classes=10,
    patch_kernel=3,
    patch_stride=1,
    patch_padding=1,
    shifts=CIFAR_SHIFTS,
    shift_mode="roll",
    shared_kv=True,
)

_VARIANTS: dict[str, dict[str, Any]] = {
    "lsa_tiny": dict(widths=(192,) * 4, heads=(4,) * 4, depths=(2, 4, 4, 4)),
    "lsa_small": dict(_IMAGENET_4x4, widths=(64, 192, 384), heads=(2, 6, 12), depths=(2, 2, 10)),
    "lsa_base": dict(_IMAGENET_4x4, widths=(128, 384, 768), heads=(4, 12, 12), depths=(2, 3, 10)),
    "lsa_large": dict(_IMAGENET_4x4, widths=(128, 512, 1024), heads=(4, 16, 16), depths=(2, 3, 22)),
    "lsa_cifar_tiny": dict(_CIFAR, widths=(192,) * 4, heads=(4,) * 4, depths=(2, 4, 4, 4)),
    "lsa_cifar_small": dict(_CIFAR, widths=(384,) * 4, heads=(6,) * 4, depths=(2, 4, 4, 4)),
    "lsa_cifar_base": dict(_CIFAR, widths=(768,) * 4, heads=(12,) * 4, depths=(3, 3, 3, 3)),
}


def list_models() -> list[str]:
    """Names accepted by `create_model`."""
    return list(_VARIANTS)


def model_config(name: str, **overrides: Any) -> LSAConfig:
    """The LSAConfig of a named variant, with fields overridden (e.g. num_classes=10)."""
    if name not in _VARIANTS:
        raise ModelConfigError(f"model.name: unknown model {name!r}; choose one of {', '.join(_VARIANTS)}")
    fields = set(LSAConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ModelConfigError(f"model.{unknown[0]}: not a model option; options are {', '.join(sorted(fields))}")
    return LSAConfig(**{**_VARIANTS[name], **overrides})
