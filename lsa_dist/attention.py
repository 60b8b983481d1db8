"""What an LSA model's attention looks at: the weights its own forward computes, kept while a
`record_attention` block runs, and the numbers the pictures show (tools/attention_maps.py).

- local shift attention (stage 1's first block): per token and head, weights over the S shifted
  copies; shown as the expected shift vector (the weights' mean of the shifts) and the entropy
  of the weights over the shifts (0: one shift chosen, 1: all alike);
- global attention (every other block): per head, each token's weights over the stage's tokens;
  shown for a few query positions, and as attention rollout over a stage's blocks (the heads'
  mean with the residual path added as identity, multiplied block by block).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every attention module of `model` (an LSA, `LSA.blocks()`) keeps the
    weights of its last forward; on exit the returned dict maps each block's name to them:
    (B, N, H, S) for the shift attention, (B, H, N, N) for global attention."""
    modules = {name: block.attn for name, block in model.blocks()}
    kept: dict[str, torch.Tensor] = {}
    for module in modules.values():
        module.keep_weights = True
    try:
        yield kept
        for name, module in modules.items():
            if module.weights is not None:
                kept[name] = module.weights
    finally:
        for module in modules.values():
            module.keep_weights = False
            module.weights = None


def expected_shift(weights: torch.Tensor, shifts: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """(B, N, 2): per token, the (dy, dx) the shift attention's weights (B, N, H, S) expect,
    averaged over heads."""
    table = torch.tensor(shifts, dtype=weights.dtype, device=weights.device)  # (S, 2)
    return (weights.mean(dim=2) @ table).float()


def shift_entropy(weights: torch.Tensor) -> torch.Tensor:
    """(B, N): per token, the entropy of the weights over the S shifts, averaged over heads and
    divided by log S (0: one shift taken, 1: all shifts alike)."""
    s = weights.shape[-1]
    p = weights.float().clamp_min(1e-12)
    return (-(p * p.log()).sum(dim=-1)).mean(dim=-1) / math.log(s)


def rollout(stage_weights: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout over consecutive global blocks of one stage, each (B, H, N, N): the
    heads' mean plus the identity (the residual path), rows renormalised, multiplied in order.
    (B, N, N): how much each output token draws on each input token through the stage."""
    out = None
    for weights in stage_weights:
        a = weights.float().mean(dim=1)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        out = a if out is None else a @ out
    if out is None:
        raise ValueError("rollout needs at least one block's weights")
    return out
