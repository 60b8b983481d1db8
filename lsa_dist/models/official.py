"""Import of checkpoints saved by the paper's official code (its module layout and arguments).

The official layout keeps one `norm1`/`norm2` per stage shared by all its blocks, separate
`Wq`/`Wkv` projections, and one convolution per shift; ours has per-block norms, a fused
`qkv` projection and one grouped convolution. The import maps one onto the other exactly.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .lsa import CIFAR_SHIFTS, IMAGENET_SHIFTS, LSA, LSAConfig, conv_out_size, fit_pos_tables


class OfficialCheckpointError(ValueError):
    """An official checkpoint or config that does not describe a model we can build."""


# The official code hard-codes the shift family by its number of shifts.
_FAMILIES = {10: ("pad", IMAGENET_SHIFTS, False), 18: ("roll", CIFAR_SHIFTS, True)}

# Constructor arguments of the released official models (their training scripts).
OFFICIAL_CONFIGS: dict[str, dict[str, Any]] = {
    "lsa_tiny": dict(
        num_variants=10,
        image_size=224,
        patch_size=7,
        kernel_size=9,
        stride_size=7,
        padding_size=1,
        embedding_dim=[[192, 192]] * 4,
        heads=[4, 4, 4, 4],
        num_layers_per_block=[2, 4, 4, 4],
        num_hierarchies=4,
        scaling_factor=4,
        num_classes=1000,
        init_patch_embed_size=1,
    ),
    "lsa_small": dict(
        num_variants=10,
        image_size=224,
        patch_size=4,
        kernel_size=4,
        stride_size=4,
        padding_size=0,
        embedding_dim=[[64, 192], [192, 384], [384, 384]],
        heads=[2, 6, 12],
        num_layers_per_block=[2, 2, 10],
        num_hierarchies=3,
        scaling_factor=4,
        num_classes=1000,
        init_patch_embed_size=1,
    ),
    **{
        f"lsa_cifar_{size}": dict(
            num_variants=18,
            image_size=32,
            patch_size=1,
            kernel_size=3,
            stride_size=1,
            padding_size=1,
            embedding_dim=[[width, width]] * 4,
            heads=heads,
            num_layers_per_block=depths,
            num_hierarchies=4,
            scaling_factor=4,
            num_classes=10,
            init_patch_embed_size=1,
        )
        for size, width, heads, depths in (
            ("tiny", 192, 4, [2, 4, 4, 4]),
            ("small", 384, 6, [2, 4, 4, 4]),
            ("base", 768, 12, [3, 3, 3, 3]),
        )
    },
}


def config_from_official(config: Mapping[str, Any], **overrides: Any) -> LSAConfig:
    """Our LSAConfig for the official constructor arguments `config`."""

    def get(key: str) -> Any:
        if key not in config:
            raise OfficialCheckpointError(f"official config lacks {key!r}; it has {sorted(config)}")
        return config[key]

    num_shifts = int(get("num_variants"))
    if num_shifts not in _FAMILIES:
        raise OfficialCheckpointError(
            f"official config has num_variants={num_shifts}; the official code knows 10 (ImageNet) and 18 (CIFAR)"
        )
    mode, shifts, shared_kv = _FAMILIES[num_shifts]
    dims = [tuple(int(v) for v in pair) for pair in get("embedding_dim")]
    stages = len(dims)
    for i in range(stages - 1):
        if dims[i][1] != dims[i + 1][0]:
            raise OfficialCheckpointError(
                f"official embedding_dim {dims}: stage {i} ends at width {dims[i][1]} "
                f"but stage {i + 1} starts at {dims[i + 1][0]}"
            )
    heads = get("heads")
    heads = [int(heads)] * stages if isinstance(heads, int) else [int(h) for h in heads]
    if int(config.get("scaling_factor", 4)) != 4:
        raise OfficialCheckpointError("official scaling_factor must be 4 (a 3/2 max-pool between stages)")
    if int(config.get("init_patch_embed_size", 1)) != 1:
        raise OfficialCheckpointError("official init_patch_embed_size must be 1")
    image_size = int(get("image_size"))
    kernel, stride, padding = int(get("kernel_size")), int(get("stride_size")), int(get("padding_size"))
    expected_grid = image_size // int(get("patch_size"))
    grid = conv_out_size(image_size, kernel, stride, padding)
    if grid != expected_grid:
        raise OfficialCheckpointError(
            f"official config is inconsistent: image_size // patch_size = {expected_grid} tokens per side, "
            f"but the patch convolution gives {grid}"
        )
    args: dict[str, Any] = dict(
        image_size=image_size,
        num_classes=int(get("num_classes")),
        patch_kernel=kernel,
        patch_stride=stride,
        patch_padding=padding,
        shifts=shifts,
        shift_mode=mode,
        widths=tuple(d[0] for d in dims),
        heads=tuple(heads),
        depths=tuple(int(d) for d in get("num_layers_per_block")),
        shared_kv=shared_kv,
    )
    args.update(overrides)
    return LSAConfig(**args)


def convert_official_state_dict(cfg: LSAConfig, official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and reshape an official state dict into ours (for the model built from `cfg`)."""
    src = dict(official)
    if src and all(k.startswith("module.") for k in src):
        src = {k[len("module.") :]: v for k, v in src.items()}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise OfficialCheckpointError(
                f"official state dict lacks {key!r}: not an official LSA checkpoint of this config"
            )
        used.add(key)
        return src[key]

    out: dict[str, torch.Tensor] = {}
    shifts = cfg.num_shifts
    for i in range(shifts):
        for p in ("weight", "bias"):
            out[f"patch_embed.proj.{i}.{p}"] = take(f"to_patch_embedding.projections.{i}.{p}")
    for s, (width, heads, depth) in enumerate(zip(cfg.widths, cfg.heads, cfg.depths)):
        stage, ours = f"layers.{s}.0", f"stages.{s}"
        out["patch_embed.pos_embed" if s == 0 else f"{ours}.pos_embed"] = take(f"{stage}.pos_emb")
        kv_dim = (1 if cfg.shared_kv else heads) * (width // heads)
        for b in range(depth):
            blk, attn = f"{ours}.blocks.{b}", f"{stage}.layers.{b}.0"
            for norm in ("norm1", "norm2"):  # shared per stage in the official layout
                for p in ("weight", "bias"):
                    out[f"{blk}.{norm}.{p}"] = take(f"{stage}.{norm}.{p}").clone()
            if s == 0 and b == 0:
                wq, wkv = take(f"{attn}.Wq_even.weight"), take(f"{attn}.Wkv_even.weight")
                bq, bkv = take(f"{attn}.Wq_even.bias"), take(f"{attn}.Wkv_even.bias")
                out[f"{blk}.attn.q.weight"], out[f"{blk}.attn.q.bias"] = wq, bq
                out[f"{blk}.attn.k.weight"] = wkv[:kv_dim]
                # The key bias cancels in the softmax over shifts: dropped.
                out[f"{blk}.attn.v.weight"], out[f"{blk}.attn.v.bias"] = wkv[kv_dim:], bkv[kv_dim:]
            else:
                wq, wkv = take(f"{attn}.Wq_odd.weight"), take(f"{attn}.Wkv_odd.weight")
                bq, bkv = take(f"{attn}.Wq_odd.bias"), take(f"{attn}.Wkv_odd.bias")
                out[f"{blk}.attn.qkv.weight"] = torch.cat([wq, wkv])
                out[f"{blk}.attn.qkv.bias"] = torch.cat([bq, bkv])
            for p in ("weight", "bias"):
                out[f"{blk}.attn.proj.{p}"] = take(f"{attn}.proj.{p}")
                for fc in ("fc1", "fc2"):
                    out[f"{blk}.mlp.{fc}.{p}"] = take(f"{stage}.layers.{b}.1.{fc}.{p}")
        if s < len(cfg.widths) - 1:
            for mod in ("conv", "norm"):
                for p in ("weight", "bias"):
                    out[f"{ours}.downsample.{mod}.{p}"] = take(f"layers.{s}.1.{mod}.{p}")
    for p in ("weight", "bias"):
        out[f"norm.{p}"] = take(f"norm.{p}")
        out[f"head.{p}"] = take(f"mlp_head.{p}")
    unused = sorted(set(src) - used)
    if unused:
        raise OfficialCheckpointError(
            f"official state dict has {len(unused)} keys this config does not use (first: {unused[0]!r}): "
            "the config does not match the checkpoint"
        )
    return out


def from_official(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> LSA:
    """Build the LSA model for official constructor arguments and load official weights into it.

    `overrides` change training-only fields of the config (e.g. drop_path_rate).
    """
    cfg = config_from_official(config, **overrides)
    model = LSA(cfg)
    # positional tables of the release's image size resampled to image_size (if overridden)
    converted = fit_pos_tables(convert_official_state_dict(cfg, state_dict), model)
    expected = model.state_dict()
    for key, value in converted.items():
        if key in expected and expected[key].shape != value.shape:
            raise OfficialCheckpointError(
                f"official weight for {key} has shape {tuple(value.shape)}, the config implies "
                f"{tuple(expected[key].shape)}: the config does not match the checkpoint"
            )
    model.load_state_dict(converted, strict=True)
    return model


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint file (a bare state dict or {'model': ...}).

    Loaded with weights_only=True; the argparse.Namespace the official training script
    stores beside the weights is the one extra type allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OfficialCheckpointError(f"cannot read official checkpoint {path}: {first}") from err
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OfficialCheckpointError(f"{path} holds no state dict (expected tensors, or a dict with a 'model' entry)")
    return dict(obj)
