"""Weights outside the engines: one fp32 state dict from a checkpoint of any engine and ZeRO
stage, model files (`model.pt`: config and fp32 weights, loadable without DeepSpeed), and the
weights a run starts from (`model.init_from`)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (
    META,
    CheckpointError,
    CheckpointManager,
    not_weights,
    read_meta,
    trusted_classes,
    vet,
    weights_only_loads,
)
from .fs import atomic_write_bytes
from .redact import first_line


def export_fp32(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One consolidated fp32 state dict from a checkpoint of any engine and ZeRO stage,
    loadable into lsa_dist.models without DeepSpeed. Returns (state_dict, meta)."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta.get("backend") == "fairscale":
        state = torch.load(folder / "fairscale_states.pt", map_location="cpu", weights_only=True)["module"]
        return {k: v.float() for k, v in state.items()}, meta
    if meta.get("zero_stage", 0) == 0:
        # ZeRO-0: the fp32 master weights live in the (bf16/fp16) optimizer's flat groups;
        # in fp32 training the module weights are the master weights.
        return _export_stage0(folder), meta
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    vet(folder)  # DeepSpeed's reader asks for full unpickling: weights only, after the scan
    try:
        with weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    except pickle.UnpicklingError as err:
        raise not_weights(folder, err) from err
    return {k: v.float().contiguous() for k, v in state.items()}, meta


def _export_stage0(folder: Path) -> dict[str, torch.Tensor]:
    model_states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    module = {k: v.float() for k, v in model_states["module"].items()}
    optim_files = sorted(folder.glob("*_optim_states.pt"))
    if not optim_files:
        return module
    with torch.serialization.safe_globals(trusted_classes()):
        optim = torch.load(optim_files[0], map_location="cpu", weights_only=True)["optimizer_state_dict"]
    groups = optim.get("fp32_groups") or optim.get("single_partition_of_fp32_groups")
    if not groups:
        return module
    flat = torch.cat([g.flatten().float() for g in groups])
    offset, out = 0, dict(module)
    for shapes in model_states.get("param_shapes", []):
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            out[name] = flat[offset : offset + n].view(shape).clone()
            offset += n
    return out


def save_model_file(path: Path, model_config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """An exported model: {'config': LSAConfig fields, 'state_dict': fp32 weights}, written atomically."""
    buffer = io.BytesIO()
    torch.save({"config": model_config, "state_dict": state_dict}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_model_file(path: str | Path) -> torch.nn.Module:
    """An LSA model from a file written by save_model_file (training's model.pt or the exporter)."""
    from .models import LSA, LSAConfig

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = LSA(LSAConfig(**payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except Exception as err:  # noqa: BLE001 - corrupt or foreign files
        first = first_line(err)
        raise CheckpointError(f"cannot load model file {path}: {first}") from err
    return model


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder (-> its latest checkpoint)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = CheckpointManager(root, 1, 0).latest()
        if latest is not None:
            return latest
    raise CheckpointError(f"{path} holds no complete checkpoint (looked for {META} and checkpoints/latest)")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights to start a run from (model.init_from): a model file (a run's model.pt, an
    export) or a checkpoint of any engine and ZeRO stage (its folder, or a run folder's latest)."""
    path = Path(path)
    if path.is_dir():
        return export_fp32(find_checkpoint(path))[0]
    if not path.is_file():
        raise CheckpointError(f"model.init_from: {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt or foreign files
        first = first_line(err)
        raise CheckpointError(f"model.init_from: cannot read {path}: {first}") from err
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model.init_from: {path} holds no weights (want a model.pt, an export, a checkpoint)")
    return {k: v.float() for k, v in state.items()}


def init_model_from(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load the weights at `path` into `model` to fine-tune it: positional tables resampled to
    its image size, and the classifier left freshly initialised if the number of classes
    differs. Returns what was adapted; CheckpointError naming the first weight that does not fit."""
    from .models import fit_pos_tables

    own = model.state_dict()
    given = read_weights(path)
    state = fit_pos_tables(given, model)
    notes = []
    if any(state[k] is not given[k] for k in state):
        notes.append(f"positional tables resampled to {model.cfg.image_size} px")
    new_head = "head.weight" in state and state["head.weight"].shape != own["head.weight"].shape
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        notes.append(f"a new head for {own['head.weight'].shape[0]} classes")
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"model.init_from: {path}'s {key} has shape {tuple(value.shape)}, this model's "
                f"{tuple(own[key].shape)}: another architecture (check model.name and model.options)"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (new_head and k.startswith("head."))]
    if missing or unexpected:
        raise CheckpointError(
            f"model.init_from: {path} does not fit model {type(model).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return notes
