#!/usr/bin/env python
"""Per-GPU memory of a training configuration, to choose the engine (torch DDP or a ZeRO stage),
activation checkpointing and batch before a job queues: what configs/lsa_large.yaml is chosen from.

Model states (weights, gradients, optimizer state) come from DeepSpeed's own estimators for
ZeRO-2 and ZeRO-3 (`estimate_zero2/3_model_states_mem_needs`, no offload), for ZeRO-1 from the
same accounting (bf16 weights and gradients 2 + 2 bytes per parameter, fp32 master weights,
momentum and variance 12 bytes, the fp32 gradient partition 4 bytes, the last two sharded), and
for torch DDP under autocast from its own: fp32 weights, gradients and AdamW moments, 16 bytes per
parameter, none sharded.
Activations are measured: the bytes the forward pass saves for backward under bf16 autocast,
per image (distinct storages, through torch's saved-tensor hooks), with no recompute and with
every block recomputed. The table adds a 10% allowance for the allocator's fragmentation and
workspaces; a configuration "fits" below 90% of the GPU.

    python tools/memory_plan.py --model lsa_large --nodes 4 --gpus-per-node 8 --gpu-gb 80 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsa_dist.models import count_parameters, create_model  # noqa: E402
from lsa_dist.parallelize import apply_activation_checkpointing  # noqa: E402

GB = 2**30


ENGINES = ("ddp", "zero1", "zero2", "zero3")  # the order of preference (see choose)
CONFIG = {
    "ddp": "engine.backend=fairscale engine.zero_stage=0",
    "zero1": "engine.zero_stage=1",
    "zero2": "engine.zero_stage=2",
    "zero3": "engine.zero_stage=3",
}


def engine_state_bytes(engine: str, params: int, largest_layer: int, gpus: int, nodes: int) -> float:
    """Bytes of model states per GPU: torch DDP under bf16 autocast keeps fp32 weights, fp32
    gradients (the all-reduce buckets themselves) and AdamW's two moments whole, 16 bytes per
    parameter; the ZeRO stages as DeepSpeed accounts them."""
    if engine == "ddp":
        return 16 * params
    return model_state_bytes(params, largest_layer, int(engine[-1]), gpus, nodes)


def model_state_bytes(params: int, largest_layer: int, stage: int, gpus: int, nodes: int) -> float:
    """Bytes of model states per GPU at a ZeRO stage (DeepSpeed's estimators for 2 and 3)."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(params, largest_layer, gpus // nodes, nodes, cpu_offload=False)[1]
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(params, gpus // nodes, nodes, cpu_offload=False)[1]
    if stage == 1:  # bf16 weights and gradients whole; fp32 master, momentum, variance and gradients sharded
        return 4 * params + 16 * params / gpus
    return 20 * params  # nothing sharded


def activation_bytes_per_image(name: str, image_size: int, recompute: bool, batch: int = 2) -> float:
    """Bytes saved for backward per image by a bf16-autocast forward (distinct storages)."""
    model = create_model(name, image_size=image_size).train()
    if recompute:
        apply_activation_checkpointing(model, "all", 1)
    images = torch.randn(batch, 3, image_size, image_size)
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images).float().sum()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params) / batch


def choose(rows: list[dict]) -> dict[int, dict | None]:
    """For each batch, the first row that fits, without recompute before with it (recompute
    costs about a third more compute), the engines in the order DDP (whole states, torch's
    bucketed all-reduce, none of DeepSpeed's per-parameter hooks), ZeRO-1 and ZeRO-2 (the same
    bytes on the wire, states sharded), ZeRO-3 (an all-gather of every weight twice per step)."""
    out: dict[int, dict | None] = {}
    for batch in sorted({r["batch"] for r in rows}):
        fitting = [r for r in rows if r["batch"] == batch and r["fits"]]
        fitting.sort(key=lambda r: (r["recompute"] != "none", ENGINES.index(r["engine"])))
        out[batch] = fitting[0] if fitting else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="lsa_large")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-gb", type=float, default=80)
    parser.add_argument("--batches", default="32,64,128,256", help="per-GPU batches to tabulate")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    gpus = args.nodes * args.gpus_per_node
    model = create_model(args.model, image_size=args.image_size)
    params = count_parameters(model)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    start = time.perf_counter()
    activations = {
        ckpt: activation_bytes_per_image(args.model, args.image_size, ckpt == "all") for ckpt in ("none", "all")
    }
    measured_s = time.perf_counter() - start
    print(
        f"{args.model}: {params / 1e6:.1f} M parameters (largest layer {largest / 1e6:.1f} M), {args.image_size} px; "
        f"activations saved per image: {activations['none'] / 2**20:.0f} MB, {activations['all'] / 2**20:.0f} MB with "
        f"every block recomputed (measured in {measured_s:.0f} s); "
        f"{args.nodes} x {args.gpus_per_node} GPUs of {args.gpu_gb:g} GB"
    )
    header = f"{'engine':>6} {'recompute':>9} {'batch':>5} {'states GB':>9} {'activ. GB':>9} {'total GB':>8}  fits"
    print(header + "\n" + "-" * len(header))
    rows = []
    for engine in ENGINES:
        states = engine_state_bytes(engine, params, largest, gpus, args.nodes)
        for ckpt in ("none", "all"):
            for batch in (int(b) for b in args.batches.split(",")):
                total = (states + activations[ckpt] * batch) * 1.10
                fits = total <= 0.9 * args.gpu_gb * GB
                rows.append(
                    {
                        "engine": engine,
                        "recompute": ckpt,
                        "batch": batch,
                        "states_gb": states / GB,
                        "activations_gb": activations[ckpt] * batch / GB,
                        "total_gb": total / GB,
                        "fits": fits,
                    }
                )
                r = rows[-1]
                print(
                    f"{engine:>6} {ckpt:>9} {batch:>5} {r['states_gb']:>9.1f} {r['activations_gb']:>9.1f} "
                    f"{r['total_gb']:>8.1f}  {'yes' if fits else 'no'}"
                )
    choices = choose(rows)
    print("\nchoice per batch (the first that fits of DDP, ZeRO-1, 2, 3 without recompute, then with it):")
    for batch, row in choices.items():
        if row is None:
            print(f"  {batch:>4}: nothing fits; fewer images per GPU")
        else:
            recompute = " engine.activation_checkpointing=all" if row["recompute"] == "all" else ""
            print(f"  {batch:>4}: {CONFIG[row['engine']]}{recompute}  ({row['total_gb']:.1f} GB)")
    if args.json:
        payload = {
            "model": args.model,
            "params": params,
            "largest_layer_params": largest,
            "image_size": args.image_size,
            "gpus": gpus,
            "gpu_gb": args.gpu_gb,
            "activation_bytes_per_image": activations,
            "rows": rows,
            "choice": {str(b): r and {"engine": r["engine"], "recompute": r["recompute"]} for b, r in choices.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
