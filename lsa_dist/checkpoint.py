"""Checkpoint storage: atomic save, keep-last-K, the save policy, weights-only vetting.

Layout of RUN/checkpoints/:
  step-00001234/   one complete checkpoint: the engine's files (ZeRO shards), rng/rank<r>.pt,
                   config.yaml, and meta.json (written last)
  latest           the name of the newest complete checkpoint
  .staging/        checkpoints being written; renamed into place once every rank is done

A checkpoint becomes visible only by the rename of its finished folder, so a kill at any
moment leaves the previous checkpoint (and `latest`) intact. Which checkpoint a run resumes,
and how, is lsa_dist.resume's; fp32 export and model files are lsa_dist.weights'.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import dist as D
from . import rng
from .data.plan import Layout
from .errors import CheckpointError
from .fs import OWNER_ONLY, atomic_write_bytes, atomic_write_json, fsync_dir, fsync_tree
from .redact import first_line

if TYPE_CHECKING:
    from .engine import Engine

META = "meta.json"


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
    # size; empty in an epoch read one way. Saved as [world_size, workers, batches, batch_size]
    layouts: list[Layout] = field(default_factory=list)
    # where the lr schedule was placed: (step, epochs done at that step); moves when a resume
    # changes the world size (an epoch then has another number of steps)
    lr_origin: list[float] = field(default_factory=lambda: [0, 0.0])

    def to_dict(self) -> dict[str, Any]:
        """Plain values for meta.json and the engine's client state."""
        saved = asdict(self)
        saved["layouts"] = [list(astuple(layout)) for layout in self.layouts]
        return saved

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        """The state in a checkpoint; keys this version does not know are ignored."""
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        known["layouts"] = [Layout(*layout) for layout in known.get("layouts", [])]
        return cls(**known)

    def batches_before(self) -> int:
        """Batches of the epoch in progress read under earlier layouts."""
        return sum(layout.batches for layout in self.layouts)


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
        client_state = {"train_state": state.to_dict(), **(extra or {})}
        engine.save(self.staging, tag, client_state)
        rng_dir = self.staging / tag / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        buffer = _to_bytes(rng.get_state())
        atomic_write_bytes(rng_dir / f"rank{self.rank}.pt", buffer)
        D.barrier()
        if self.rank == 0:
            atomic_write_bytes(self.staging / tag / "config.yaml", config_yaml.encode(), OWNER_ONLY)
            meta = {"tag": tag, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **state.to_dict()}
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
            with weights_only_loads():
                client_state = engine.load(folder.parent, folder.name, saved_world_size)
        except CheckpointError:
            raise
        except pickle.UnpicklingError as err:
            raise not_weights(folder, err) from err
        except Exception as err:  # noqa: BLE001 - torch/DeepSpeed raise many types for bad files
            first = first_line(err)
            raise CheckpointError(f"cannot load checkpoint {folder}: {first}") from err
        rng_path = folder / "rng" / f"rank{self.rank}.pt"
        if rng_path.is_file():  # a rank the writer did not have (a larger world) keeps its own seeding
            try:
                rng.set_state(torch.load(rng_path, weights_only=True))
            except Exception as err:  # noqa: BLE001 - truncated or foreign file
                raise CheckpointError(f"cannot load checkpoint {folder}: {rng_path.name} ({first_line(err)})") from err
        elif self.rank < saved_world_size:
            raise CheckpointError(f"cannot load checkpoint {folder}: rng/{rng_path.name} is missing")
        return TrainState.from_dict(client_state["train_state"]), client_state

    def clean_staging(self) -> None:
        if self.rank == 0:
            shutil.rmtree(self.staging, ignore_errors=True)


class Checkpointer:
    """The save policy over a CheckpointManager: every checkpoint.every_steps steps
    ("every_steps"), and always at an epoch end, at train.max_steps and on a stop request; never
    twice for one step."""

    def __init__(self, manager: CheckpointManager, every_steps: int) -> None:
        self.manager = manager
        self.every_steps = every_steps
        self.saved_step = -1

    def should_save(self, step: int, event: str) -> bool:
        if event == "every_steps" and not (self.every_steps and step % self.every_steps == 0):
            return False
        return step != self.saved_step

    def save(self, engine: Engine, state: TrainState, config_yaml: str, extra: dict[str, Any]) -> None:
        """Collective: every rank calls it."""
        self.manager.save(engine, state, config_yaml, extra)
        self.saved_step = state.step


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


FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch's switch: every torch.load reads weights only


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside, DeepSpeed's own included (it asks for full unpickling), reads
    weights only: tensors, plain containers and TRUSTED_GLOBALS. vet() refuses a file that names
    other code; this also stops a file that names only allowed code but applies it in other ways
    (a BUILD on a function changes how every later file loads)."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(trusted_classes()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def not_weights(folder: Path, err: BaseException) -> CheckpointError:
    """The one-line error for a file of `folder` that the weights-only reader refused."""
    return CheckpointError(
        f"cannot load checkpoint {folder}: a file holds more than weights ({first_line(err)}); "
        "not a checkpoint this project wrote: refused"
    )


def trusted_classes() -> list[Any]:
    """The classes of TRUSTED_GLOBALS, for torch.serialization.safe_globals."""
    import importlib

    found = []
    for name in sorted(TRUSTED_GLOBALS):
        module, _, attr = name.rpartition(".")
        found.append(getattr(importlib.import_module(module), attr))
    return found


def _to_bytes(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
