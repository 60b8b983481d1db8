"""One rank of the host-synchronisation test (tests/test_train.py runs it under torch's elastic
launcher): trains a few steps of the paper's recipe on `train.synthetic` data (the real engine
and loop, no dataset: DATA does not exist) with every tensor read that waits for the device
(`.item()`, `float()`, `.tolist()`, `.cpu()`, ...) counted when lsa_dist's own code makes it, per
optimizer step, and writes the counts and the run's result (rank 0) to OUT/sync_counts.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/sync_probe.py DATA OUT
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PACKAGE = str(ROOT / "lsa_dist")
READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__index__")
counts: Counter[tuple[int, str, str]] = Counter()
watched: dict[str, object] = {}


def counting(name: str, original: object) -> object:
    def read(self: torch.Tensor, *args: object, **kwargs: object) -> object:
        frame = sys._getframe(1)
        trainer = watched.get("trainer")
        if trainer is not None and frame.f_code.co_filename.startswith(PACKAGE):
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
            counts[(trainer.state.step, name, where)] += 1
        return original(self, *args, **kwargs)

    return read


def main() -> None:
    from helpers import PAPER_RECIPE, TINY

    from lsa_dist import dist as D
    from lsa_dist.config import load_config
    from lsa_dist.trainer import Trainer

    data, out = sys.argv[1], Path(sys.argv[2])
    tiny = [o for o in TINY if not o.startswith("tracking.log_every=")]  # the default, as users run
    overrides = [*tiny, *PAPER_RECIPE, f"data.root={data}", f"train.output_dir={out}", "train.name=sync"]
    overrides += ["tracking.enabled=false", "engine.zero_stage=2", "engine.precision=bf16", "optim.ema_decay=0.9"]
    overrides += ["train.synthetic=true", "model.num_classes=10"]
    overrides += ["train.max_steps=12", "checkpoint.every_steps=0"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    for name in READS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    trainer = Trainer(cfg)
    watched["trainer"] = trainer
    result = trainer.fit()
    if trainer.env.is_main:
        rows = [[step, name, where, n] for (step, name, where), n in sorted(counts.items())]
        report = {
            "reads": rows,
            "status": result.status,
            "step": result.step,
            "steps_per_epoch": trainer.data.steps_per_epoch,
            "log_every": [cfg.train.log_every, cfg.tracking.log_every],
        }
        (out / "sync_counts.json").write_text(json.dumps(report))
    D.shutdown(0)


if __name__ == "__main__":
    main()
