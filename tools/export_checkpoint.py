#!/usr/bin/env python
"""Export a training checkpoint (any engine, any ZeRO stage) to one fp32 model file, and/or
evaluate it, without DeepSpeed or a process group.

    python tools/export_checkpoint.py runs/demo                  # latest checkpoint -> runs/demo/export.pt
    python tools/export_checkpoint.py runs/demo/checkpoints/step-00000550 --out model.pt
    python tools/export_checkpoint.py runs/demo --eval-only      # top-1 / top-5 / loss on the val split

The model file loads with lsa_dist.weights.load_model_file(path) into a plain LSA model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsa_dist import cli  # noqa: E402
from lsa_dist.checkpoint import CheckpointError  # noqa: E402
from lsa_dist.config import RunConfig, load_config, model_overrides  # noqa: E402
from lsa_dist.data import build_loader  # noqa: E402
from lsa_dist.metrics import evaluate  # noqa: E402
from lsa_dist.models import LSA, model_config  # noqa: E402
from lsa_dist.weights import export_fp32, find_checkpoint, save_model_file  # noqa: E402


def evaluate_model(model: LSA, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """top-1 / top-5 / loss on the config's val split, in this one process."""
    loader = build_loader(cfg.data, cfg.data.val_split, 0, 1, train=False, seed=cfg.train.seed)
    model.to(device).eval()
    return evaluate(model, loader.epoch(0), loader.to_model_input, device)


def main(argv: list[str] | None = None) -> int:
    first, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--out", type=Path, default=None, help="model file to write (default: RUN/export.pt)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate on the config's val split; write nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the saved config (e.g. data.root=...)")
    args = parser.parse_args(argv)
    try:
        folder = find_checkpoint(args.checkpoint)
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
            metrics = evaluate_model(model, cfg, device)
            top = f"val top-1 {metrics['val/top1']:.2f}%  top-5 {metrics['val/top5']:.2f}%"
            line = f"{top}  loss {metrics['val/loss']:.4f}"
            print(f"{folder}: {line}  ({metrics['val/images']:.0f} images)")
            return 0
        out = args.out or folder.parent.parent / "export.pt"
        save_model_file(out, dict(model.cfg.__dict__), {k: v.contiguous() for k, v in model.state_dict().items()})
        size = sum(v.numel() for v in state.values()) / 1e6
        origin = f"step {meta.get('step')}, {meta.get('backend')} ZeRO-{meta.get('zero_stage')}"
        print(f"wrote {out} ({size:.2f} M parameters, {origin})")
        return 0
    except cli.USER_ERRORS as err:
        return cli.fail(err)


if __name__ == "__main__":
    sys.exit(main())
