"""Multiply-accumulates per image, counted by torch.utils.flop_counter (matmuls and convs).

`implementation="reference"` counts the architecture as written (every shifted copy
projected to keys and values): the figure papers quote and MFU is based on.
`implementation="model"` counts what our model actually executes, which is less.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .lsa import LSA
from .reference import reference_forward

Shape = tuple[int, ...]


def _cpu_sdpa_flops(query: Shape, key: Shape, value: Shape, *args: object, **kwargs: object) -> int:
    """FLOPs of PyTorch's CPU flash attention (not in flop_counter's registry); allows GQA."""
    b, h, m, d = query
    n, dv = key[-2], value[-1]
    return 2 * b * h * m * n * (d + dv)


def _cpu_sdpa_backward_flops(
    grad_out: Shape, query: Shape, key: Shape, value: Shape, *args: object, **kwargs: object
) -> int:
    b, h, m, d = query
    n, dv = key[-2], value[-1]
    return 2 * b * h * m * n * (2 * d + 2 * dv)


_CUSTOM = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


@torch.no_grad()
def count_macs(model: LSA, implementation: str = "reference", batch_size: int = 1, image_size: int = 0) -> int:
    """Multiply-accumulates of one forward pass per image, at the model's image size or (the
    model's own forward only) at `image_size`."""
    if implementation not in ("reference", "model"):
        raise ValueError(f"implementation must be 'reference' or 'model', got {implementation!r}")
    cfg = model.cfg
    size = image_size or cfg.image_size
    if implementation == "reference" and size != cfg.image_size:
        raise ValueError(f"the reference forward runs at the model's {cfg.image_size} px only, not {size}")
    param = next(model.parameters())
    images = torch.zeros(batch_size, cfg.in_chans, size, size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            if implementation == "reference":
                reference_forward(model, images)
            else:
                model(images)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // batch_size


def macs_by_size(model: LSA, sizes: Iterable[int]) -> dict[int, tuple[int, int]]:
    """(architecture, executed) multiply-accumulates per image at each image size (progressive
    resizing trains at several). The model's own forward is counted at each size; the
    architecture's extra (every shifted copy projected to keys and values) grows with the first
    stage's tokens, so it is scaled from the model's size, where the reference forward counts it."""
    cfg = model.cfg

    def tokens(size: int) -> int:
        rows, columns = cfg.grids(size, size)[0]
        return rows * columns

    architecture, executed = count_macs(model, "reference"), count_macs(model, "model")
    extra_per_token = (architecture - executed) / tokens(cfg.image_size)
    out = {}
    for size in sorted({cfg.image_size, *sizes}):
        done = executed if size == cfg.image_size else count_macs(model, "model", image_size=size)
        out[size] = (done + round(extra_per_token * tokens(size)), done)
    return out
