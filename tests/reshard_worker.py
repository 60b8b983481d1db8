"""One rank of the engine resharding test (tests/test_checkpoint.py runs it under torch's
elastic launcher with 1 or 2 processes): every engine saves a checkpoint on this world size,
or loads one written on another and checks that it goes on as if nothing changed.

    start DIR     train steps 1-2 on a fixed global batch of 64, save, record the weights,
                  then record what step 3 gives (without saving it)
    continue DIR  load the latest checkpoint, check the weights are the recorded ones, train
                  the next step and check it against the record; save and record again
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lsa_dist import dist as D
from lsa_dist.checkpoint import CheckpointManager, TrainState
from lsa_dist.config import load_config
from lsa_dist.engine import Engine, build_engine
from lsa_dist.models import create_model

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 64
ENGINES = {
    "zero0": ["engine.zero_stage=0"],
    "zero1": ["engine.zero_stage=1"],
    "zero2": ["engine.zero_stage=2"],
    "zero3": ["engine.zero_stage=3"],
    "fairscale": ["engine.backend=fairscale", "engine.zero_stage=1"],
    "ddp": ["engine.backend=fairscale", "engine.zero_stage=0"],
}


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of step `step`'s global batch (the same global batch on any world size)."""
    g = torch.Generator().manual_seed(step)
    images, labels = (
        torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g),
        torch.randint(0, 10, (GLOBAL_BATCH,), generator=g),
    )
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    return images[part], labels[part]


def train(engine: Engine, step: int, env: D.DistEnv) -> None:
    images, labels = batch(step, env.rank, env.world_size)
    engine.backward(F.cross_entropy(engine.forward(images), labels))
    engine.step()


def main() -> None:
    mode, root = sys.argv[1], Path(sys.argv[2])
    env = D.discover()
    device = D.init(env)
    torch.set_num_threads(1)
    report = {}
    for name, overrides in ENGINES.items():
        cfg = load_config(
            ROOT / "configs" / "demo.yaml",
            [
                "model.options.widths=[16,16]",
                "model.options.heads=[2,2]",
                "model.options.depths=[1,1]",
                "engine.precision=fp32",
                f"data.batch_size={GLOBAL_BATCH // env.world_size}",
                "optim.warmup_epochs=0",
                *overrides,
            ],
        )
        torch.manual_seed(0)
        model = create_model(cfg.model.name, **{**cfg.model.options, "num_classes": 10})
        engine = build_engine(cfg, model, steps_per_epoch=10, world_size=env.world_size, device=device)
        manager = CheckpointManager(root / name / "checkpoints", keep_last=3, rank=env.rank)
        record = root / name / "record.pt"
        step, checks = 0, {}
        if mode == "start":
            for step in (1, 2):
                train(engine, step, env)
        else:
            state, _ = manager.load(engine, manager.latest())
            step, expected = state.step, torch.load(record)
            weights = engine.full_state_dict()
            if env.is_main:
                checks["weights_equal"] = all(torch.equal(weights[k], v) for k, v in expected["weights"].items())
                checks["lr_equal"] = engine.lr() == expected["lr"]
            train(engine, step + 1, env)
            step += 1
            after = engine.full_state_dict()
            if env.is_main:
                diff = max((after[k] - v).abs().max().item() for k, v in expected["next"].items())
                moved = max((after[k] - v).abs().max().item() for k, v in expected["weights"].items())
                checks.update(
                    next_step_max_diff=diff, step_moved=moved, next_lr_equal=engine.lr() == expected["next_lr"]
                )
        manager.save(engine, TrainState(step=step, world_size=env.world_size, backend=cfg.engine.backend), "")
        weights, lr = engine.full_state_dict(), engine.lr()
        train(engine, step + 1, env)
        after = engine.full_state_dict()
        if env.is_main:
            torch.save({"weights": weights, "lr": lr, "next": after, "next_lr": engine.lr()}, record)
        report[name] = checks
    if env.is_main:
        (root / f"report-{mode}-{env.world_size}.json").write_text(json.dumps(report))
    D.shutdown(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
