"""Building a named variant (spec.py names them), from scratch or from the paper's released weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .lsa import LSA
from .official import OFFICIAL_CONFIGS, from_official, load_official_checkpoint
from .spec import LSAConfig, ModelConfigError, model_config


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


__all__ = ["create_model"]
