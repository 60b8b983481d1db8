"""A straightforward implementation of the LSA forward pass, on the parameters of an `LSA`.

It follows the network as written in the paper and the official code: every shifted copy
is materialised and embedded by its own convolution, all copies are projected to keys and
values, and attention is an explicit matmul + softmax. It exists to check the fast model
against (tests), to measure it against (tools/benchmark_model.py) and to count the
architecture's canonical multiply-accumulates. Stochastic layers (dropout, drop path) are
not applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lsa import LSA, GlobalBlock, ShiftBlock


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    hidden = F.gelu(F.linear(_layer_norm(block.norm2, x), block.mlp.fc1.weight, block.mlp.fc1.bias))
    return x + F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)


def _shifted_copies(model: LSA, images: torch.Tensor) -> torch.Tensor:
    """(S, B, N, D): each shifted copy built and convolved on its own."""
    cfg = model.cfg
    copies = []
    for i, (dy, dx) in enumerate(cfg.shifts):
        if cfg.shift_mode == "pad":
            shifted = F.pad(images, (dx, 0, dy, 0), mode="circular") if (dy or dx) else images
        else:
            shifted = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
        conv = model.patch_embed.proj[i]
        emb = F.conv2d(shifted, conv.weight, conv.bias, stride=cfg.patch_stride, padding=cfg.patch_padding)
        copies.append(emb.flatten(2).transpose(1, 2))
    return torch.stack(copies) + model.patch_embed.pos_embed.unsqueeze(1)


def _shift_block(block: ShiftBlock, copies: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    s, b, n, d = copies.shape
    h, e, hk = attn.num_heads, attn.head_dim, attn.kv_heads
    normed = _layer_norm(block.norm1, copies)
    q = F.linear(normed[0], attn.q.weight, attn.q.bias).reshape(b, n, h, e).permute(0, 2, 1, 3).unsqueeze(3)
    k = F.linear(normed, attn.k.weight).reshape(s, b, n, hk, e).permute(1, 3, 2, 0, 4)
    v = F.linear(normed, attn.v.weight, attn.v.bias).reshape(s, b, n, hk, e).permute(1, 3, 2, 0, 4)
    scores = (q @ k.transpose(-2, -1)) * attn.scale  # (B, H, N, 1, S)
    out = (scores.softmax(dim=-1) @ v).squeeze(3)  # (B, H, N, e)
    out = F.linear(out.transpose(1, 2).reshape(b, n, d), attn.proj.weight, attn.proj.bias)
    return _mlp(block, copies[0] + out)


def _global_block(block: GlobalBlock, x: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    b, n, d = x.shape
    h, e, hk = attn.num_heads, attn.head_dim, attn.kv_heads
    qkv = F.linear(_layer_norm(block.norm1, x), attn.qkv.weight, attn.qkv.bias)
    q = qkv[..., :d].reshape(b, n, h, e).transpose(1, 2)
    k, v = qkv[..., d:].reshape(b, n, 2, hk, e).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) * e**-0.5  # (B, H, N, N)
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
    return _mlp(block, x + F.linear(out, attn.proj.weight, attn.proj.bias))


def _downsample(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    down = stage.downsample
    b, n, d = x.shape
    grid = x.transpose(1, 2).reshape(b, d, down.grid, down.grid)
    y = F.conv2d(grid, down.conv.weight, down.conv.bias, padding=1)
    y = _layer_norm(down.norm, y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    y = F.max_pool2d(y, 3, stride=2, padding=1)
    return y.flatten(2).transpose(1, 2)


def reference_forward(model: LSA, images: torch.Tensor) -> torch.Tensor:
    """Logits of `model` for `images`, computed the straightforward way."""
    x = _shifted_copies(model, images)
    for i, stage in enumerate(model.stages):
        if i > 0:
            x = x + stage.pos_embed
        for block in stage.blocks:
            x = _shift_block(block, x) if isinstance(block, ShiftBlock) else _global_block(block, x)
        if stage.downsample is not None:
            x = _downsample(stage, x)
    x = _layer_norm(model.norm, x).mean(dim=1)
    return F.linear(x, model.head.weight, model.head.bias)


class ReferenceLSA(nn.Module):
    """`reference_forward` as a module that owns (shares) the parameters of an `LSA`."""

    def __init__(self, model: LSA) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return reference_forward(self.model, images)
