#!/usr/bin/env python
"""Pictures of what a trained LSA model's attention looks at, on validation images.

For each image: the local shift attention (per token, the expected shift over the S shifted
copies as arrows, and the entropy of its weights as a heat map), stage 1's global attention for
a few query tokens, and attention rollout per stage; one PNG grid with a legend. The weights are
the model's own, kept from its forward (lsa_dist.attention.record_attention).

    python tools/attention_maps.py runs/demo --images 4 --out runs/demo/attention
    python tools/attention_maps.py runs/demo/checkpoints/step-00000550 --images 8
    python tools/attention_maps.py model.pt --config configs/demo.yaml --images 4 [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsa_dist import cli  # noqa: E402
from lsa_dist.attention import attention_grid, attention_summary, first_images  # noqa: E402
from lsa_dist.checkpoint import CheckpointError  # noqa: E402
from lsa_dist.config import load_config, model_overrides  # noqa: E402
from lsa_dist.data import build_loader  # noqa: E402
from lsa_dist.models import LSA, create_model  # noqa: E402
from lsa_dist.weights import export_fp32, find_checkpoint, load_model_file  # noqa: E402


def load(source: Path, config: Path | None, overrides: list[str]) -> tuple[LSA, object]:
    """The model and run config of a run folder, a checkpoint folder or a model file (+ --config)."""
    if source.is_file():
        if config is None:
            raise CheckpointError(f"{source} is a model file: give --config (its run's config.yaml) for the data")
        return load_model_file(source), load_config(config, overrides)
    folder = find_checkpoint(source)
    cfg = load_config(folder / "config.yaml", overrides)
    state, _ = export_fp32(folder)
    model = create_model(cfg.model.name, **model_overrides(cfg, state["head.weight"].shape[0]))
    model.load_state_dict(state)
    return model, cfg


def main(argv: list[str] | None = None) -> int:
    first, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="run folder (latest checkpoint), checkpoint folder or model file")
    parser.add_argument("--images", type=int, default=4, help="validation images, one row each (default 4)")
    parser.add_argument("--out", type=Path, default=None, help="folder for attention.png (default: beside SOURCE)")
    parser.add_argument("--config", type=Path, default=None, help="the run's config, for a model file")
    parser.add_argument("--queries", type=int, default=3, help="query tokens of stage 1's global attention (1-3)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. data.root=...)")
    args = parser.parse_intermixed_args(argv)
    if not 1 <= args.images <= 32:
        parser.error("--images must be in 1..32")
    if not 1 <= args.queries <= 3:
        parser.error("--queries must be in 1..3")
    try:
        model, cfg = load(args.source, args.config, args.overrides)
        loader = build_loader(cfg.data, cfg.data.val_split, 0, 1, train=False, seed=cfg.train.seed)
        images = first_images(loader, args.images)
        out = args.out or (args.source.parent if args.source.is_file() else args.source) / "attention"
        path = attention_grid(model, images, loader.to_model_input, out / "attention.png", args.queries)
        print(f"wrote {path} ({len(images)} images)")
        numbers = attention_summary(model, images, loader.to_model_input)
        line = f"shift entropy {numbers['shift_entropy']:.3f} (0: one shift, 1: all alike), "
        line += f"expected shift {numbers['expected_shift_tokens']:.2f} tokens"
        if "global_distance_tokens" in numbers:
            line += f", stage 1 global attention distance {numbers['global_distance_tokens']:.2f} tokens "
            line += f"(uniform {numbers['uniform_distance_tokens']:.2f})"
        print(line)
        return 0
    except cli.USER_ERRORS as err:
        return cli.fail(err)


if __name__ == "__main__":
    sys.exit(main())
