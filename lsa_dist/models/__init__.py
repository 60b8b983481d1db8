"""The LSA model family: plain PyTorch modules, named variants, official-weight import.

Names load on first use (PEP 562): `from lsa_dist.models import model_config` reads the
torch-free spec only, so a launcher validates a config without importing torch or timm."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "spec": ("CIFAR_SHIFTS", "IMAGENET_SHIFTS", "LSAConfig", "ModelConfigError", "list_models", "model_config"),
    "lsa": ("LSA", "count_parameters", "fit_pos_tables", "resize_pos_table"),
    "flops": ("count_macs", "macs_by_size"),
    "official": (
        "OFFICIAL_CONFIGS",
        "OfficialCheckpointError",
        "config_from_official",
        "from_official",
        "load_official_checkpoint",
    ),
    "zoo": ("create_model",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
