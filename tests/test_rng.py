"""Randomness per (seed, rank, step): what each rank of a job draws for a training step
(drop path, mixup/cutmix, random erasing) is its own, and the same however the run got
to that step (seconds, in this process)."""

from __future__ import annotations

import random

import numpy as np
import torch

from lsa_dist import rng
from lsa_dist.config import AugmentConfig
from lsa_dist.data.transforms import ModelInput, build_mixup
from lsa_dist.models import create_model


def step_randomness(seed: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one training step of `rank` draws: drop-path masks (through the real model),
    mixup/cutmix (timm, NumPy's generator) and random erasing (timm, Python's and torch's)."""
    torch.manual_seed(0)
    model = create_model("lsa_cifar_tiny", widths=[16, 16], heads=[2, 2], depths=[1, 1], drop_path_rate=0.5)
    model.train()
    images = torch.full((8, 3, 32, 32), 128, dtype=torch.uint8)
    labels = torch.arange(8) % 10
    aug = AugmentConfig(reprob=1.0, mixup=0.8, cutmix=1.0)
    rng.seed_step(seed, rank, step)
    # a draw between restore and step (an iterator's base seed, a warm-up) must not matter
    torch.rand(5), np.random.rand(), random.random()
    rng.seed_step(seed, rank, step)
    inputs = ModelInput((0.5,) * 3, (0.25,) * 3, aug, train=True)(images)
    mixed, targets = build_mixup(aug, 10)(inputs, labels)
    with torch.no_grad():
        logits = model(mixed)
    return inputs, targets, logits


def test_a_step_draws_the_same_for_the_same_seed_rank_and_step() -> None:
    a, b = step_randomness(0, 3, 17), step_randomness(0, 3, 17)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_ranks_steps_and_seeds_draw_differently() -> None:
    base = step_randomness(0, 0, 17)
    for other in (step_randomness(0, 1, 17), step_randomness(0, 0, 18), step_randomness(1, 0, 17)):
        erased, targets, logits = (not torch.equal(x, y) for x, y in zip(base, other))
        assert erased and targets and logits  # erasing boxes, mixup lambda/pairs, drop-path masks


def test_derived_seeds_are_unrelated_for_nearby_inputs() -> None:
    seeds = {rng.derive(seed, rank, step) for seed in range(3) for rank in range(32) for step in range(10)}
    assert len(seeds) == 3 * 32 * 10 and all(0 <= s < 2**63 for s in seeds)
    assert rng.derive(-1, 0) == rng.derive(2**64 - 1, 0)  # any int seed is accepted


def test_states_round_trip_through_a_checkpoint_file(tmp_path) -> None:
    rng.seed_all(5)
    state = rng.get_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    rng.seed_all(99)
    rng.set_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_seeded_block_leaves_the_outer_streams_untouched() -> None:
    rng.seed_all(7)
    expected = torch.rand(2), np.random.rand(), random.random()
    rng.seed_all(7)
    with rng.seeded(123):
        inside = torch.rand(2)
    with rng.seeded(123):
        assert torch.equal(torch.rand(2), inside)
    assert (
        torch.equal(torch.rand(2), expected[0]) and np.random.rand() == expected[1] and random.random() == expected[2]
    )
