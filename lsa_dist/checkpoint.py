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
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import dist as D
from . import rng
from .fs import OWNER_ONLY, atomic_write_bytes, atomic_write_json, fsync_dir, fsync_tree
from .redact import first_line

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
    eval_pending: bool = False  # the epoch-end evaluation was cut short by a stop: run it first
    dataset_sha256: str = ""  # of the dataset.json trained on: its identity, wherever it lies
    world_size: int = 1
    backend: str = "deepspeed"
    zero_stage: int = 0
    data_workers: int = 0  # loader workers per rank (their spans split a rank's samples); 0: not recorded
    batch_size: int = 0  # data.batch_size trained with; 0: not recorded
    # how the epoch in progress was read before a resume changed world size, workers or batch
    # size: [world_size, workers, batches, batch_size] each (data.plan.Layout); empty in an
    # epoch read one way
    layouts: list[list[int]] = field(default_factory=list)
    # where the lr schedule was placed: (step, epochs done at that step); moves when a resume
    # changes the world size (an epoch then has another number of steps)
    lr_origin: list[float] = field(default_factory=lambda: [0, 0.0])


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
        buffer = _to_bytes(rng.get_state())
        atomic_write_bytes(rng_dir / f"rank{self.rank}.pt", buffer)
        D.barrier()
        if self.rank == 0:
            atomic_write_bytes(self.staging / tag / "config.yaml", config_yaml.encode(), OWNER_ONLY)
            meta = {"tag": tag, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **asdict(state)}
            atomic_write_json(self.staging / tag / META, meta)
            fsync_tree(self.staging / tag)  # every rank's files (the barrier above: all written)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of an earlier attempt
            (self.staging / tag).rename(final)
            fsync_dir(self.root)  # the rename is durable before `latest` moves and anything is pruned
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
        saved_world_size = int(read_meta(folder).get("world_size", 1))
        vet(folder)
        try:
            client_state = engine.load(folder.parent, folder.name, saved_world_size)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - torch/DeepSpeed raise many types for bad files
            first = first_line(err)
            raise CheckpointError(f"cannot load checkpoint {folder}: {first}") from err
        rng_path = folder / "rng" / f"rank{self.rank}.pt"
        if rng_path.is_file():
            rng.set_state(torch.load(rng_path, weights_only=True))
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


def lineage_conflict(run_dir: Path, resume: str) -> tuple[list[Path], bool]:
    """The run folder's checkpoints that a launch with `resume` would neither continue from nor
    may keep beside its own, and whether setting them aside needs train.overwrite.

    auto continues the latest: nothing. A checkpoint of this run (a rollback) starts a new
    branch: the later checkpoints go aside by themselves (kept, never adopted or pruned by the
    new branch). never, or another run's checkpoint, would start a new lineage in a folder that
    holds one: all of them, and only when asked to."""
    existing = CheckpointManager(Path(run_dir) / "checkpoints", 1, 0).complete()
    if resume == "auto" or not existing:
        return [], False
    if resume != "never":
        target = Path(resume).resolve()
        if target.parent == existing[0].parent.resolve():
            return [p for p in existing if p.name > target.name], False
    return existing, True


def check_lineage(run_dir: Path, resume: str, overwrite: bool) -> None:
    """CheckpointError if a launch with `resume` would mix a new lineage into this run's checkpoints."""
    conflict, needs_overwrite = lineage_conflict(run_dir, resume)
    if conflict and needs_overwrite and not overwrite:
        newest = read_meta(conflict[-1]).get("step", "?")
        raise CheckpointError(
            f"train.resume={resume}: {Path(run_dir) / 'checkpoints'} holds this run's checkpoints (up to step "
            f"{newest}); continue them with train.resume=auto, start another run with train.name=<new>, or "
            "add train.overwrite=true to move them aside (into set_aside/ in the run folder)"
        )


def set_aside(run_dir: Path, folders: list[Path]) -> Path:
    """Move checkpoint folders into run_dir/set_aside/<time>/ (nothing is deleted) and point
    `latest` at the newest checkpoint left (or remove it). Returns the new folder."""
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    target = Path(run_dir) / "set_aside" / stamp
    while target.exists():  # two in one second
        n += 1
        target = target.with_name(f"{stamp}.{n}")
    target.mkdir(parents=True)
    for folder in folders:
        folder.rename(target / folder.name)
    manager = CheckpointManager(Path(run_dir) / "checkpoints", 1, 0)
    left = manager.complete()
    pointer = manager.root / "latest"
    if left:
        atomic_write_bytes(pointer, left[-1].name.encode())
    else:
        pointer.unlink(missing_ok=True)
    fsync_dir(target)
    fsync_dir(manager.root)
    return target


def check_resumable(run_dir: Path, resume: str, overwrite: bool = False) -> str:
    """Before any process starts: the checkpoint to resume has readable metadata and the
    launch would not mix lineages (`check_lineage`). Any world size may continue it.
    Returns the MLflow run it continues ('' for a new run)."""
    check_lineage(run_dir, resume, overwrite)
    folder = checkpoint_to_resume(run_dir, resume)
    if folder is None:
        return ""
    meta = read_meta(folder)
    return meta.get("run_id", "") if resume == "auto" else ""


# keys whose change alters a run's mathematics (sections end with a dot); the rest (logging,
# evaluation, checkpointing, workers, compile, activation checkpointing) may change on resume
MATH_KEYS = (
    "model.",
    "optim.",
    "data.augment.",
    "data.progressive.",
    "data.batch_size",
    "data.image_size",
    "data.normalize",
    "data.format",
    "data.train_split",
    "data.shuffle_buffer",
    "engine.backend",
    "engine.zero_stage",
    "engine.precision",
    "engine.offload_optimizer",
    "train.seed",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_changes(folder: Path, new: dict[str, Any], dataset_sha256: str) -> dict[str, tuple[Any, Any]]:
    """What a resume from `folder` would change of the run's mathematics: MATH_KEYS whose value
    differs between the checkpoint's config and `new` (a flat config), and "dataset" when the
    dataset.json checksum differs (data.root itself may move)."""
    import yaml

    path = Path(folder) / "config.yaml"
    old = _flat(yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    keys = sorted(k for k in set(old) | set(new) if k.startswith(MATH_KEYS) or k in MATH_KEYS)
    changes = {k: (old.get(k), new.get(k)) for k in keys if old and old.get(k) != new.get(k)}
    saved_sha = read_meta(folder).get("dataset_sha256", "")
    if saved_sha and dataset_sha256 and saved_sha != dataset_sha256:
        changes["dataset"] = (saved_sha[:12], dataset_sha256[:12])
    return changes


def check_compatible(folder: Path, new: dict[str, Any], dataset_sha256: str, accepted: list[str]) -> list[str]:
    """CheckpointError naming the changed keys unless train.accept_changes lists each of them
    (a key, or its section: "optim"). Returns the accepted changed keys."""
    changes = config_changes(folder, new, dataset_sha256)

    def ok(key: str) -> bool:
        return any(key == a or key.startswith(a.rstrip(".") + ".") for a in accepted)

    refused = [k for k in changes if not ok(k)]
    if refused:
        shown = ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise CheckpointError(
            f"resuming {folder} would change the run: {shown}; start another run (train.name=<new>), or accept "
            f"with train.accept_changes=[{','.join(refused)}]"
        )
    return list(changes)


# classes DeepSpeed pickles into its optimizer files beside tensors and plain containers: the
# only ones a checkpoint may name before anything of it is unpickled
TRUSTED_GLOBALS = frozenset(
    {
        "deepspeed.utils.tensor_fragment.fragment_address",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    }
)


def vet(folder: Path) -> None:
    """CheckpointError unless every file of the checkpoint unpickles to tensors, plain containers
    and TRUSTED_GLOBALS only. DeepSpeed loads its files with full unpickling (which runs whatever
    code a file names); this reads each file's pickle without running it, first."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            unsafe = set(get_unsafe_globals_in_checkpoint(str(path))) - TRUSTED_GLOBALS
        except Exception as err:  # noqa: BLE001 - not a torch file, truncated zip, ...
            raise CheckpointError(
                f"cannot load checkpoint {folder}: {path.name} is truncated or not a torch file ({first_line(err)})"
            ) from err
        if unsafe:
            raise CheckpointError(
                f"cannot load checkpoint {folder}: {path.name} names code that loading it would run "
                f"({', '.join(sorted(unsafe)[:3])}); not a checkpoint this project wrote: refused unread"
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

    vet(folder)  # DeepSpeed's reader unpickles in full
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return {k: v.float().contiguous() for k, v in state.items()}, meta


def _export_stage0(folder: Path) -> dict[str, torch.Tensor]:
    model_states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    module = {k: v.float() for k, v in model_states["module"].items()}
    optim_files = sorted(folder.glob("*_optim_states.pt"))
    if not optim_files:
        return module
    with torch.serialization.safe_globals([_trusted_class(name) for name in sorted(TRUSTED_GLOBALS)]):
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


def _trusted_class(name: str) -> Any:
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


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
