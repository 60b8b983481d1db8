"""Restoring a plan on every rank: load its checkpoint (falling back where the run's own latest
cannot be loaded on any rank), then continue the saved layout and place the lr schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import dist as D
from ..checkpoint import CheckpointError, CheckpointManager, TrainState
from ..config import RunConfig
from ..schedule import lr_lambda
from .plan import ResumePlan, set_aside
from .reshard import Here, continue_layout, saved_layout

if TYPE_CHECKING:
    import torch

    from ..engine import Engine


@dataclass
class Restored:
    """What a resume restored: the checkpoint, the training state, the engine's client state
    (EMA weights), and why a fall-back was taken ('' if none)."""

    folder: Path
    state: TrainState
    client_state: dict[str, Any]
    fallback: str = ""


def load_with_fallback(
    plan: ResumePlan, manager: CheckpointManager, engine: Engine, device: torch.device, say: Callable[[str], None]
) -> Restored:
    """Load the plan's checkpoint; where it fails on any rank, the plan's fall-backs in turn (a
    warning each). Every rank ends on the same checkpoint; the ones that failed are set aside."""
    assert plan.folder is not None
    candidates = [plan.folder, *plan.fallbacks]
    error: CheckpointError | None = None
    for i, candidate in enumerate(candidates):
        if i:
            reason = str(error) if error else "it failed on another rank"
            say(f"warning: {reason}; falling back to the previous checkpoint {candidate}")
        error = None
        try:
            state, client_state = manager.load(engine, candidate)
        except CheckpointError as err:
            error = err
        if not D.any_rank(error is not None, device):
            restored = Restored(candidate, state, client_state)
            if i:  # the unloadable ones go aside: a new save at their steps must not be skipped
                restored.fallback = f"{plan.folder.name} could not be loaded; resumed from {candidate.name}"
                if D.is_main():
                    failed = {c.name: "its engine or RNG files could not be loaded" for c in candidates[:i]}
                    set_aside(manager.root.parent, candidates[:i], failed)
                D.barrier()
            return restored
    raise error or CheckpointError(f"cannot load checkpoint {candidates[-1]} on another rank; see its log")


def restore(
    plan: ResumePlan,
    manager: CheckpointManager,
    engine: Engine,
    cfg: RunConfig,
    here: Here,
    device: torch.device,
    say: Callable[[str], None],
    batches_left: Callable[[TrainState], int],
) -> Restored:
    """Load the plan's checkpoint into `engine` and continue it on this run's layout: the epoch in
    progress goes on with its unread samples, and the lr follows accepted optim.* changes and
    the number of steps an epoch now has."""
    configured_lrs = engine.base_lrs()
    restored = load_with_fallback(plan, manager, engine, device, say)
    s = restored.state
    say(f"resumed from {restored.folder} (epoch {s.epoch}, batch {s.batch}, step {s.step})")
    saved = saved_layout(s, here)
    new_steps = continue_layout(s, here)
    if (saved.world_size, saved.workers, saved.batch_size) != (here.world_size, here.workers, here.batch_size):
        say(
            f"resumed {saved.world_size} ranks x {saved.workers} loader workers x batch {saved.batch_size} on "
            f"{here.world_size} x {here.workers} x {here.batch_size}: epoch {s.epoch} goes on with its unread "
            f"samples, {batches_left(s)} batches per rank"
        )
    if new_steps or any(key.startswith("optim.") for key in plan.accepted):
        engine.rebase_lr(configured_lrs)
    if s.lr_origin != [0, 0.0]:  # an epoch's steps changed once (world or batch size): the schedule is placed
        origin = (int(s.lr_origin[0]), float(s.lr_origin[1]))
        engine.rebase_lr(engine.base_lrs(), lr_lambda(cfg, here.steps_per_epoch, here.world_size, origin))
    return restored
