"""What is applied to the plain model from outside, before an engine wraps it: activation
checkpointing of chosen blocks, then torch.compile. Both patch in place, so parameter names
(and so checkpoints) do not change, and the model itself knows nothing of them."""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import RunConfig
from .models import LSA


def apply_to_model(cfg: RunConfig, model: LSA) -> None:
    """Activation checkpointing first (it patches the plain model's blocks), then torch.compile."""
    policy, every_k = cfg.engine.activation_checkpointing, cfg.engine.checkpoint_every_k
    # fairscale's wrapper breaks dynamo's graph and recompiles at every call until dynamo gives the
    # blocks up to eager: compiled, both backends recompute through torch's checkpoint. It also
    # restores only CUDA's autocast for the recomputation: on a CPU under bf16 autocast it would
    # recompute in float32 (other activations than the forward's), so there torch's checkpoint too.
    fairscale_ok = torch.cuda.is_available() or cfg.engine.precision == "fp32"
    if cfg.engine.backend == "fairscale" and not cfg.engine.compile and fairscale_ok:
        if policy != "none":
            from fairscale.nn.checkpoint import checkpoint_wrapper

            chosen = set(checkpointed_blocks(model, policy, every_k))
            for name, block in model.blocks():
                if name in chosen:
                    checkpoint_wrapper(block)  # patches forward in place; names unchanged
    else:
        apply_activation_checkpointing(model, policy, every_k)
    if cfg.engine.compile:
        model.compile(backend=cfg.engine.compile_backend)


def checkpointed_blocks(model: LSA, policy: str, every_k: int) -> list[str]:
    """Names of the blocks whose activations are recomputed in backward."""
    names = [name for name, _ in model.blocks()]
    if policy == "none":
        return []
    if policy == "all":
        return names
    return names[::every_k]


def apply_activation_checkpointing(model: LSA, policy: str, every_k: int) -> list[str]:
    """Recompute the chosen blocks' activations in backward (non-reentrant torch checkpoint).

    The blocks' forward is patched in place, so parameter names (and checkpoints) do not
    change; the model itself knows nothing of it.
    """
    chosen = set(checkpointed_blocks(model, policy, every_k))
    for name, block in model.blocks():
        if name in chosen:
            inner = block.forward

            def forward(self: nn.Module, *args: torch.Tensor, _inner=inner) -> torch.Tensor:  # noqa: ANN001
                if not torch.is_grad_enabled():
                    return _inner(*args)
                return checkpoint(_inner, *args, use_reentrant=False)

            block.forward = types.MethodType(forward, block)
    return sorted(chosen)
