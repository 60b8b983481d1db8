"""Named LSA variants and the entry points to build them.

`lsa_tiny`, `lsa_small` and the CIFAR variants are the paper's models; `lsa_base` and
`lsa_large` extend the ImageNet family (kernel 4 / stride 4 embedding, three stages,
head width 32 then 64) to about 85 M and 300 M parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .lsa import CIFAR_SHIFTS, IMAGENET_SHIFTS, LSA, LSAConfig, ModelConfigError
from .official import OFFICIAL_CONFIGS, config_from_official, from_official, load_official_checkpoint

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


def create_model(name: str, official_checkpoint: str | Path | None = None, **overrides: Any) -> LSA:
    """Build a named variant; with `official_checkpoint`, load weights released by the paper.

    The official file must be of the same variant (`lsa_tiny`, `lsa_small`, `lsa_cifar_*`);
    a different `num_classes` keeps every weight but a freshly initialised head.
    """
    if official_checkpoint is None:
        return LSA(model_config(name, **overrides))
    if name not in OFFICIAL_CONFIGS:
        raise ModelConfigError(
            f"model.name: {name!r} has no official release; official weights exist for {', '.join(OFFICIAL_CONFIGS)}"
        )
    state = load_official_checkpoint(official_checkpoint)
    official = dict(OFFICIAL_CONFIGS[name])
    official["num_classes"] = int(state["mlp_head.weight"].shape[0]) if "mlp_head.weight" in state else 0
    num_classes = overrides.pop("num_classes", official["num_classes"])
    model = from_official(official, state, **overrides)
    if num_classes != model.cfg.num_classes:
        return _with_new_head(model, num_classes)
    return model


def _with_new_head(model: LSA, num_classes: int) -> LSA:
    """The same model with a new, freshly initialised classifier for `num_classes` classes."""
    cfg = LSAConfig(**{**model.cfg.__dict__, "num_classes": num_classes})
    fresh = LSA(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    missing, _ = fresh.load_state_dict(state, strict=False)
    assert set(missing) == {"head.weight", "head.bias"}, missing
    return fresh


__all__ = [
    "OFFICIAL_CONFIGS",
    "config_from_official",
    "create_model",
    "list_models",
    "model_config",
]
