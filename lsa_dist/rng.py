"""Randomness of a run: every random stream is a function of (seed, rank, position).

Three generators feed a training step: torch's (drop path, random erasing's noise), NumPy's
(timm's mixup/cutmix) and Python's (random erasing's boxes, RandAugment). Seeding them once
per process is not enough for a run that is resumed, restarted or requeued: anything that
draws between two steps (a new DataLoader iterator takes its base seed from torch's global
generator, an evaluation, a library's warm-up) shifts every later draw. So each training step
re-derives all three from (seed, rank, step) before it runs: the step's randomness is then the
same whichever way the run got there, and different on every rank (32 ranks of a job do not
share drop-path masks or erasing boxes). Loader workers do the same per batch (`seeded`).

The model's initial weights come from (seed) alone, the same on every rank.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

TRAIN_STREAM = 0x7472  # keeps the trainer's streams apart from the loaders' (which key on epoch)


def derive(seed: int, *keys: int) -> int:
    """A 63-bit seed from the run's seed and any integer keys (NumPy's SeedSequence hashing:
    nearby inputs give unrelated streams)."""
    return int(np.random.SeedSequence([seed % 2**64, *keys]).generate_state(1, np.uint64)[0] >> 1)


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every GPU), NumPy's and Python's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, rank: int, step: int) -> None:
    """The generators for optimizer step `step` (0-based) of rank `rank`."""
    seed_all(derive(seed, TRAIN_STREAM, rank, step))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The three generators seeded with `seed` inside the block, restored afterwards (the
    loaders' per-batch augmentation when it runs in the training process)."""
    saved = get_state()
    seed_all(seed)
    try:
        yield
    finally:
        set_state(saved)


def get_state() -> dict[str, Any]:
    """This process's generator states, in types torch.load(weights_only=True) accepts."""
    py_version, py_keys, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_keys), py_gauss],
        "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_state(state: dict[str, Any]) -> None:
    """Restore what `get_state` returned."""
    torch.set_rng_state(state["torch"])
    py_version, py_keys, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_keys), py_gauss))
    np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(("MT19937", np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, torch.Tensor):  # one device's state, as older checkpoints hold it
            torch.cuda.set_rng_state(cuda)
        elif len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
