"""Checkpoints: atomic save, keep-last-K, resume, and export to one fp32 state dict.

Layout of RUN/checkpoints/:
  step-00001234/   one complete checkpoint: the engine's files (ZeRO shards), rng/rank<r>.pt,
                   config.yaml, and meta.json (written last)
  latest           the name of the newest complete checkpoint
  .staging/        checkpoints being written; renamed into place once every rank is done

A checkpoint becomes visible only by the rename of its finished folder, so a kill at any
moment leaves the previous checkpoint (and `latest`) intact.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from . import dist as D
from .fs import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from .engine import Engine

META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names it."""


@dataclass
class TrainState:
    """Where training stands: what a resumed run needs besides the engine's own state."""

    epoch: int = 0  # the epoch in progress
    batch: int = 0  # batches of that epoch already trained
    step: int = 0  # optimizer steps so far
    run_id: str = ""  # the MLflow run to continue
    best_top1: float = 0.0
    world_size: int = 1
    backend: str = "deepspeed"
    zero_stage: int = 0


def _rng_state() -> dict[str, Any]:
    """This process's RNG states in types torch.load(weights_only=True) accepts."""
    py_version, py_keys, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_keys), py_gauss],
        "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py_version, py_keys, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_keys), py_gauss))
    np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(("MT19937", np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, rank: int) -> None:
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self.keep_last = keep_last
        self.rank = rank

    # -- finding ------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / META).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / META).is_file():
                return candidate
        complete = self.complete()
        return complete[-1] if complete else None

    # -- saving ------------------------------------------------------------------------------
    def save(self, engine: Engine, state: TrainState, config_yaml: str, extra: dict[str, Any] | None = None) -> Path:
        """Collective: every rank calls it. Returns the checkpoint folder."""
        tag = f"step-{state.step:08d}"
        final = self.root / tag
        if (final / META).is_file():  # already saved at this step (epoch end right after an every_steps save)
            return final
        if self.rank == 0:
            shutil.rmtree(self.staging / tag, ignore_errors=True)
            (self.staging / tag).mkdir(parents=True, exist_ok=True)
        D.barrier()
        client_state = {"train_state": asdict(state), **(extra or {})}
        engine.save(self.staging, tag, client_state)
        rng_dir = self.staging / tag / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        buffer = _to_bytes(_rng_state())
        atomic_write_bytes(rng_dir / f"rank{self.rank}.pt", buffer)
        D.barrier()
        if self.rank == 0:
            atomic_write_bytes(self.staging / tag / "config.yaml", config_yaml.encode())
            meta = {"tag": tag, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **asdict(state)}
            atomic_write_json(self.staging / tag / META, meta)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of an earlier attempt
            (self.staging / tag).rename(final)
            try:
                self.staging.rmdir()
            except OSError:  # another checkpoint is being staged
                pass
            atomic_write_bytes(self.root / "latest", tag.encode())
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        D.barrier()
        return final

    # -- loading ------------------------------------------------------------------------------
    def load(self, engine: Engine, folder: Path) -> tuple[TrainState, dict[str, Any]]:
        """Restore the engine, this rank's RNG states and the training state from `folder`."""
        folder = Path(folder)
        check_world_size(folder, read_meta(folder), dist.get_world_size() if dist.is_initialized() else 1)
        try:
            client_state = engine.load(folder.parent, folder.name)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - torch/DeepSpeed raise many types for bad files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"cannot load checkpoint {folder}: {first}") from err
        rng_path = folder / "rng" / f"rank{self.rank}.pt"
        if rng_path.is_file():
            _set_rng_state(torch.load(rng_path, weights_only=True))
        known = TrainState.__dataclass_fields__
        state = TrainState(**{k: v for k, v in client_state["train_state"].items() if k in known})
        return state, client_state

    def clean_staging(self) -> None:
        if self.rank == 0:
            shutil.rmtree(self.staging, ignore_errors=True)


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint's meta.json (step, engine, world size, run id); CheckpointError if it is
    missing (an incomplete checkpoint) or unreadable."""
    meta_path = Path(folder) / META
    if not meta_path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {META}); pick another or start over")
    try:
        return json.loads(meta_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{meta_path} is corrupt ({err}); pick another checkpoint") from err


def checkpoint_to_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a launch with `train.resume` would continue from: the run's latest (auto),
    the folder named, or None (never, or a new run)."""
    if resume == "never":
        return None
    if resume == "auto":
        return CheckpointManager(Path(run_dir) / "checkpoints", 1, 0).latest()
    return Path(resume)


def check_resumable(run_dir: Path, resume: str, world_size: int) -> str:
    """Before any process starts: the checkpoint to resume has readable metadata and was
    written by `world_size` ranks. Returns the MLflow run it continues ('' for a new run)."""
    folder = checkpoint_to_resume(run_dir, resume)
    if folder is None:
        return ""
    meta = read_meta(folder)
    check_world_size(folder, meta, world_size)
    return meta.get("run_id", "") if resume == "auto" else ""


def check_world_size(folder: Path, meta: dict[str, Any], world_size: int) -> None:
    if meta.get("world_size") != world_size:
        raise CheckpointError(
            f"{folder} was written by {meta.get('world_size')} ranks, this run has {world_size}; "
            "resume with the same number of processes (or export it and start a new run from the weights)"
        )


def _to_bytes(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


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

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return {k: v.float().contiguous() for k, v in state.items()}, meta


def _export_stage0(folder: Path) -> dict[str, torch.Tensor]:
    model_states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    module = {k: v.float() for k, v in model_states["module"].items()}
    optim_files = sorted(folder.glob("*_optim_states.pt"))
    if not optim_files:
        return module
    optim = torch.load(optim_files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
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
    import io

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
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load model file {path}: {first}") from err
    return model
