#!/usr/bin/env python
"""Export a training checkpoint (any engine, any ZeRO stage) to one fp32 model file, and/or
evaluate it, without DeepSpeed or a process group.

    python tools/export_checkpoint.py runs/demo                  # latest checkpoint -> runs/demo/export.pt
    python tools/export_checkpoint.py runs/demo/checkpoints/step-00000550 --out model.pt
    python tools/export_checkpoint.py runs/demo --eval-only      # top-1 / top-5 / loss on the val split

The model file loads with lsa_dist.checkpoint.load_model_file(path) into a plain LSA model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsa_dist.checkpoint import CheckpointError, CheckpointManager, export_fp32, save_model_file  # noqa: E402
from lsa_dist.config import ConfigError, load_config, model_overrides  # noqa: E402
from lsa_dist.data import DatasetError, build_loader  # noqa: E402
from lsa_dist.models import LSA, model_config  # noqa: E402


def resolve(path: Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder (-> its latest checkpoint)."""
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = CheckpointManager(root, 1, 0).latest()
        if latest is not None:
            return latest
    raise CheckpointError(f"{path} holds no complete checkpoint (looked for meta.json and checkpoints/latest)")


def evaluate(model: LSA, cfg, device: torch.device) -> dict[str, float]:  # noqa: ANN001
    from lsa_dist.train import accuracy_counts

    loader = build_loader(cfg.data, cfg.data.val_split, 0, 1, train=False, seed=cfg.train.seed)
    model.to(device).eval()
    sums = [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        for images, labels in loader.epoch(0):
            logits = model(loader.to_model_input(images.to(device)))
            sums = [a + b for a, b in zip(sums, accuracy_counts(logits.float(), labels.to(device)))]
    loss, top1, top5, count = sums
    return {"val/loss": loss / count, "val/top1": 100 * top1 / count, "val/top5": 100 * top5 / count, "samples": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--out", type=Path, default=None, help="model file to write (default: RUN/export.pt)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate on the config's val split; write nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the saved config (e.g. data.root=...)")
    args = parser.parse_args(argv)
    try:
        folder = resolve(args.checkpoint)
        cfg = load_config(folder / "config.yaml", args.overrides)
        state, meta = export_fp32(folder)
        num_classes = state["head.weight"].shape[0]
        model = LSA(model_config(cfg.model.name, **model_overrides(cfg, num_classes)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{folder} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        if args.eval_only:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            metrics = evaluate(model, cfg, device)
            top = f"val top-1 {metrics['val/top1']:.2f}%  top-5 {metrics['val/top5']:.2f}%"
            line = f"{top}  loss {metrics['val/loss']:.4f}"
            print(f"{folder}: {line}  ({metrics['samples']:.0f} images)")
            return 0
        out = args.out or folder.parent.parent / "export.pt"
        save_model_file(out, dict(model.cfg.__dict__), {k: v.contiguous() for k, v in model.state_dict().items()})
        size = sum(v.numel() for v in state.values()) / 1e6
        origin = f"step {meta.get('step')}, {meta.get('backend')} ZeRO-{meta.get('zero_stage')}"
        print(f"wrote {out} ({size:.2f} M parameters, {origin})")
        return 0
    except (CheckpointError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
