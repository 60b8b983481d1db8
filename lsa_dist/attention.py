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
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


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


def _stages(model: nn.Module, kept: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    """The kept global weights, grouped by stage, in block order."""
    from .models.lsa import GlobalAttention

    out: list[list[torch.Tensor]] = [[] for _ in model.stages]
    for name, block in model.blocks():
        if isinstance(block.attn, GlobalAttention):
            out[int(name.split(".")[1])].append(kept[name])
    return out


def attention_weights(model: nn.Module, images: torch.Tensor, model_input: Callable) -> dict[str, torch.Tensor]:
    """The attention weights of every block of `model` in evaluation on `images` (uint8, turned
    into the model's input by `model_input`); the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_attention(model) as kept:
            model(model_input(images))
    finally:
        model.train(was_training)
    return kept


def attention_grid(model: nn.Module, images: torch.Tensor, model_input: Callable, path: Path, queries: int = 3) -> Path:
    """A PNG at `path`: one row per image of `images` (uint8, (B, 3, H, W)) and the columns
    - the image;
    - local shift attention: the expected shift of every token as an arrow (scaled up), on the image;
    - local shift attention: its entropy over the shifts (0: one shift, 1: all alike);
    - stage 1's last global block: the heads' mean weights of `queries` query tokens (marked);
    - per stage: attention rollout over its global blocks for the centre token (the colour scale
      ends at the largest weight on another token: the token's own weight, mostly the residual
      path, saturates).
    `model_input` turns the uint8 batch into the model's input (the loader's normalisation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = attention_weights(model, images, model_input)
    shift_w, grid = kept[next(name for name, _ in model.blocks())], model.cfg.grid_sizes[0]
    stages = _stages(model, kept)
    shift = expected_shift(shift_w, model.cfg.shifts).view(-1, grid, grid, 2)
    entropy = shift_entropy(shift_w).view(-1, grid, grid)
    n = grid * grid
    picks = [n // 2 + grid // 2, grid // 4 * grid + grid // 4, (3 * grid // 4) * grid + 3 * grid // 4][:queries]
    rolled = [(k, rollout(w)) for k, w in enumerate(stages) if w]
    last = stages[0][-1] if stages[0] else None
    columns = 3 + len(picks) + len(rolled)
    fig, axes = plt.subplots(len(images), columns, figsize=(2.2 * columns, 2.3 * len(images) + 0.6), squeeze=False)
    size = images.shape[-1]
    for row, image in enumerate(images):
        shown = image.permute(1, 2, 0).cpu().numpy()
        cells = iter(axes[row])
        _panel(next(cells), shown, "image", row)
        scale = _arrows(_panel(next(cells), shown, "expected shift (arrows)", row, alpha=0.6), shift[row], size)
        ax = _panel(next(cells), None, "shift entropy", row)
        im = ax.imshow(entropy[row].cpu().numpy(), vmin=0, vmax=1, cmap="viridis")
        if row == 0:
            fig.colorbar(im, ax=ax, fraction=0.046)
        for q in picks:
            ax = _panel(next(cells), shown, f"stage 1 global, query {q}", row)
            if last is not None:
                _heat(ax, last[row].float().mean(0)[q], size)
            cell = size / grid
            ax.plot([(q % grid + 0.5) * cell], [(q // grid + 0.5) * cell], marker="x", color="cyan", markersize=8)
        for k, r in rolled:
            g = model.cfg.grid_sizes[k]
            centre = (g // 2) * g + g // 2
            others = r[row, centre].clone()
            others[centre] = 0  # the residual path keeps most of a token on itself: scaled to the rest
            _heat(_panel(next(cells), shown, f"stage {k + 1} rollout, centre", row), r[row, centre], size, others.max())
    fig.suptitle(
        f"LSA attention: arrows = expected shift of the local shift attention (x{scale:.0f}); "
        "entropy 0 = one shift, 1 = all alike; heat = attention weight (x = query)",
        fontsize=8,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _panel(ax: Any, shown: Any, title: str, row: int, alpha: float = 1.0) -> Any:
    """One cell of the grid: the image (if any), no ticks, the column's title on the first row."""
    if shown is not None:
        ax.imshow(shown, alpha=alpha)
    ax.set_title(title if row == 0 else "", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _arrows(ax: Any, shift: torch.Tensor, size: int) -> float:
    """The expected shift (grid, grid, 2) as arrows over an image of `size` px; returns the factor
    the arrows are drawn larger by (the longest spans 0.9 of a token)."""
    grid = shift.shape[0]
    step = max(1, grid // 16)
    ys, xs = torch.meshgrid(torch.arange(0, grid, step), torch.arange(0, grid, step), indexing="ij")
    cell = size / grid
    vec = shift[::step, ::step]
    scale = 0.9 * step / max(vec.abs().max().item(), 1e-6)
    x, y = (xs + 0.5) * cell, (ys + 0.5) * cell
    u, v = vec[..., 1] * scale * cell, -vec[..., 0] * scale * cell
    ax.quiver(x, y, u, v, color="red", angles="xy", scale_units="xy", scale=1, width=0.006)
    return scale


def _heat(ax: Any, weights: torch.Tensor, size: int, top: torch.Tensor | float | None = None) -> None:
    """Weights over a square token grid as a heat map over the image, coloured up to `top`."""
    g = math.isqrt(weights.numel())
    vmax = None if top is None else max(float(top), 1e-6)
    heat = weights.view(g, g).float().cpu().numpy()
    ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=0 if vmax else None, vmax=vmax, extent=(0, size, size, 0))


class EvaluationPictures:
    """tracking.attention_maps: after every complete evaluation, rank 0 draws the attention of
    the same N validation images (the first labelled ones of its validation shard) with the
    weights just evaluated, into <run>/attention/step_<step>.png, and logs it to MLflow under
    attention/. The drawing runs on the CPU in fp32 on a fresh copy of the model, under a forked
    random state: training's weights, layouts and random streams are untouched."""

    def __init__(
        self,
        count: int,
        model_config: dict[str, Any],
        val_loader: Any,
        run_dir: Path,
        log_artifact: Callable[[Path, str], None],
    ) -> None:
        self.count, self.model_config, self.loader = count, model_config, val_loader
        self.folder, self.log_artifact = run_dir / "attention", log_artifact
        self.images: torch.Tensor | None = None

    def draw(self, engine: Any, step: int, is_main: bool) -> Path | None:
        """Every rank calls this (the weights are gathered under ZeRO-3); rank 0 draws."""
        if self.count == 0:
            return None
        weights = engine.full_state_dict()
        if not is_main or weights is None:
            return None
        from .models import LSA, LSAConfig

        try:
            with torch.random.fork_rng(devices=[]):
                network = LSA(LSAConfig(**self.model_config))
                network.load_state_dict(weights)
                if self.images is None:
                    self.images = first_images(self.loader, self.count)
                path = attention_grid(
                    network, self.images, self.loader.to_model_input, self.folder / f"step_{step:08d}.png"
                )
        except Exception as err:  # a picture is never worth the run
            logger.warning(
                "attention picture at step %d not drawn (%s: %s); training goes on", step, type(err).__name__, err
            )
            return None
        self.log_artifact(path, "attention")
        return path


def first_images(loader: Any, count: int) -> torch.Tensor:
    """The first `count` labelled images (uint8) of the loader's epoch 0: the same ones every time."""
    chosen: list[torch.Tensor] = []
    for images, labels in loader.epoch(0):
        chosen += [image for image, label in zip(images, labels) if label >= 0]
        if len(chosen) >= count:
            break
    if not chosen:
        raise ValueError("the validation split has no labelled images")
    return torch.stack(chosen[:count])


def attention_summary(model: nn.Module, images: torch.Tensor, model_input: Callable) -> dict[str, float]:
    """Numbers behind the picture, over `images`: the mean shift entropy (0-1) and length of the
    expected shift (tokens) of the local shift attention, and the mean distance (tokens) between a
    query and what stage 1's global attention weighs, beside that of uniform attention."""
    kept = attention_weights(model, images, model_input)
    shift_w, grid = kept[next(name for name, _ in model.blocks())], model.cfg.grid_sizes[0]
    out = {
        "shift_entropy": shift_entropy(shift_w).mean().item(),
        "expected_shift_tokens": expected_shift(shift_w, model.cfg.shifts).norm(dim=-1).mean().item(),
    }
    stage1 = _stages(model, kept)[0]
    if stage1:
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        cells = torch.stack([ys, xs], dim=-1).view(-1, 2).float()
        distance = torch.cdist(cells, cells)  # (N, N) in tokens
        weights = stage1[-1].float().mean(dim=1)  # (B, N, N), heads averaged
        out["global_distance_tokens"] = (weights * distance).sum(-1).mean().item()
        out["uniform_distance_tokens"] = distance.mean().item()
    return out
