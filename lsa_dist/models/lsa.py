"""The LSA network: shifted patch embedding, local shift attention, global attention.

Plain PyTorch: no I/O, no distributed code. Activation checkpointing, precision and
sharding are applied from outside (see `LSA.blocks()`).

Tensor layouts used throughout:
  images  (B, C, H, W)
  copies  (B, N, S, D)   S shifted copies of every token, shifts next to each other
  tokens  (B, N, D)      N tokens in row-major grid order
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from .spec import CIFAR_SHIFTS, IMAGENET_SHIFTS, LSAConfig, ModelConfigError, conv_out_size

LN_EPS = 1e-6


def resize_pos_table(table: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """A positional table (..., N, D) of a rows x columns token grid, resampled bicubically
    (in float32) to `new_grid`; returned unchanged when the grids agree."""
    if tuple(grid) == tuple(new_grid):
        return table
    lead, (n, d) = table.shape[:-2], table.shape[-2:]
    if n != grid[0] * grid[1]:
        raise ValueError(f"a positional table of {n} tokens is not a {grid[0]}x{grid[1]} grid")
    maps = table.reshape(-1, grid[0], grid[1], d).permute(0, 3, 1, 2).float()
    resized = F.interpolate(maps, size=tuple(new_grid), mode="bicubic", align_corners=False)
    out = resized.permute(0, 2, 3, 1).reshape(*lead, new_grid[0] * new_grid[1], d)
    return out.to(table.dtype)


def square_grid(n: int) -> tuple[int, int]:
    """The square token grid of a table of n tokens (tables are stored for square images)."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"a positional table of {n} tokens is not a square grid")
    return side, side


class ShiftedPatchEmbed(nn.Module):
    """S shifted copies of the image, each embedded by its own convolution, plus a
    positional table per copy.

    Returns the residual stream (copy 0, (B, N, D)) and all copies stacked (B, N, S, D).
    Copy 0 is returned as its own tensor, so its gradient never needs a zero-filled
    (B, N, S, D) buffer. One grouped convolution over all copies measured as fast as S plain
    ones on CPU (oneDNN) and slower in channels-last layout, so the copies are convolved in
    turn, in channels-last layout on CUDA only.
    """

    def __init__(self, cfg: LSAConfig) -> None:
        super().__init__()
        self.shifts = cfg.shifts
        self.shift_mode = cfg.shift_mode
        self.in_chans = cfg.in_chans
        self.image_size = cfg.image_size
        self.proj = nn.ModuleList(
            nn.Conv2d(cfg.in_chans, cfg.widths[0], cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding)
            for _ in cfg.shifts
        )
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_shifts, cfg.grid_sizes[0] ** 2, cfg.widths[0]))

    def shifted(self, images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        """The copy of `images` shifted by (dy, dx) in this model's shift mode."""
        if dy == 0 and dx == 0:
            return images
        if self.shift_mode == "pad":
            return F.pad(images, (dx, 0, dy, 0), mode="circular")
        return torch.roll(images, shifts=(dy, dx), dims=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Any image size: a shifted copy whose padding adds a token row or column is cut to the
        image's grid, and the positional tables are resampled when the grid is not the built one."""
        _, c, h, w = images.shape
        k, p = self.proj[0].kernel_size[0], self.proj[0].padding[0]
        if c != self.in_chans or min(h, w) + 2 * p < k:
            raise ValueError(
                f"LSA expects images of shape (B, {self.in_chans}, H, W) with H, W >= {k - 2 * p}, "
                f"got {tuple(images.shape)}"
            )
        tables = self.pos_embed
        grid = square_grid(tables.shape[1])
        if images.is_cuda:  # cuDNN's fast layout; each output is then (B, H', W', D) in memory
            images = images.contiguous(memory_format=torch.channels_last)
        tokens = []
        for (dy, dx), conv in zip(self.shifts, self.proj):
            out = conv(self.shifted(images, dy, dx))
            if not tokens:
                new_grid = tuple(out.shape[2:])
                tables = resize_pos_table(tables, grid, new_grid)
            elif tuple(out.shape[2:]) != new_grid:
                out = out[:, :, : new_grid[0], : new_grid[1]]
            tokens.append(out.flatten(2).transpose(1, 2))
        # The copies with their tables in the convolution's dtype: under autocast, no float32
        # (B, N, S, D) tensor. Copy 0 is also the residual stream, in the tables' dtype (float32
        # under autocast, as in later stages). On CUDA its features are made innermost, so that
        # stage 1's LayerNorms read it in place and Downsample's convolution gets a channels-last
        # grid. Not on CPU: oneDNN's float32 convolution on a channels-last input gave Downsample
        # weight gradients 1.7% off float64's (lsa_tiny, batch 8), against 1e-5 from NCHW.
        copies = torch.stack(tokens, dim=2) + tables.transpose(0, 1).to(tokens[0].dtype)
        residual = tokens[0] + tables[0]
        return (residual.contiguous() if images.is_cuda else residual), copies


class _ShiftMix(torch.autograd.Function):
    """softmax(q_in @ rows^T) @ rows for many tiny (H x D) x (D x S) problems.

    Autograd's backward for the same two bmm's writes the gradient of `rows` twice, once
    in a transposed layout; here both terms come from one bmm (about 1.5x faster).
    """

    @staticmethod
    def forward(ctx, q_in: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        attn = torch.bmm(q_in, rows.transpose(1, 2)).softmax(dim=-1)
        ctx.save_for_backward(q_in, rows, attn)
        return torch.bmm(attn, rows)

    @staticmethod
    def backward(ctx, grad_mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        q_in, rows, attn = ctx.saved_tensors
        grad_attn = torch.bmm(grad_mixed, rows.transpose(1, 2))
        grad_scores = attn * (grad_attn - (grad_attn * attn).sum(dim=-1, keepdim=True))
        grad_q = torch.bmm(grad_scores, rows)
        lhs = torch.cat([grad_scores, attn], dim=1).transpose(1, 2)
        grad_rows = torch.bmm(lhs, torch.cat([q_in, grad_mixed], dim=1))
        return grad_q, grad_rows


class ShiftAttention(nn.Module):
    """Local shift attention: each token attends over its own S shifted copies only.

    The query comes from copy 0; keys and values from all copies at the same position,
    so the cost is O(N*S) with no N x N term. Instead of projecting all S copies to keys
    and values (S*N*D*D multiply-adds each), the query is mapped back through the key
    weight (q W_k) and the attention-weighted mix of copies through the value weight:
    the same function at a fraction of the cost. A key bias would add the same constant
    to every shift's score and cancel in the softmax, so there is none.
    """

    def __init__(
        self, dim: int, num_heads: int, shared_kv: bool, qkv_bias: bool, attn_drop: float, proj_drop: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kv_heads = 1 if shared_kv else num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_weights = False  # set by lsa_dist.attention.record_attention
        self.weights: torch.Tensor | None = None  # then: the last forward's (B, N, H, S) weights

    def forward(self, query: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        """query: normalised copy 0 (B, N, D); copies: normalised (B, N, S, D). Returns (B, N, D).
        With `keep_weights`, the attention weights over the S shifts are kept in `weights`
        (the explicit path below, which training with attention dropout takes too)."""
        b, n, s, d = copies.shape
        h, e, hk = self.num_heads, self.head_dim, self.kv_heads
        rows = copies.reshape(b * n, s, d)
        q = self.q(query).reshape(b * n, h, e) * self.scale
        w_k = self.k.weight.view(hk, e, d)
        w_v = self.v.weight.view(hk, e, d)
        if hk == 1:
            q_in = q @ w_k[0]  # (BN, H, D)
        else:
            q_in = torch.einsum("mhe,hed->mhd", q, w_k).contiguous()
        if (self.training and self.attn_drop.p > 0) or self.keep_weights:
            attn = torch.bmm(q_in, rows.transpose(1, 2)).softmax(dim=-1)
            if self.keep_weights:
                self.weights = attn.detach().view(b, n, h, s)
            mixed = torch.bmm(self.attn_drop(attn), rows)
        else:
            device_type = rows.device.type
            if torch.is_autocast_enabled(device_type):  # the Function runs in autocast's dtype itself
                dtype = torch.get_autocast_dtype(device_type)
                q_in, rows = q_in.to(dtype), rows.to(dtype)
            with torch.autocast(device_type, enabled=False):
                mixed = _ShiftMix.apply(q_in, rows)  # (BN, H, D)
        if hk == 1:
            out = mixed @ w_v[0].t()
        else:
            out = torch.einsum("mhd,hed->mhe", mixed, w_v)
        if self.v.bias is not None:
            out = out + self.v.bias.view(hk, e)
        return self.proj_drop(self.proj(out.reshape(b, n, d)))


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all tokens of a stage (fused kernel via SDPA).

    With `shared_kv`, one key/value head serves every query head (multi-query attention).
    """

    def __init__(
        self, dim: int, num_heads: int, shared_kv: bool, qkv_bias: bool, attn_drop: float, proj_drop: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kv_heads = 1 if shared_kv else num_heads
        self.qkv = nn.Linear(dim, dim + 2 * self.kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_weights = False  # set by lsa_dist.attention.record_attention
        self.weights: torch.Tensor | None = None  # then: the last forward's (B, H, N, N) weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """With `keep_weights` (evaluation only), attention is computed as softmax(q k^T / sqrt(e)) v
        in plain operations, SDPA's definition, and its weights are kept in `weights`."""
        b, n, d = x.shape
        h, e, hk = self.num_heads, self.head_dim, self.kv_heads
        # split/unbind rather than slicing: their backward concatenates instead of
        # zero-filling a full-size gradient per slice.
        q, k, v = self.qkv(x).split([d, hk * e, hk * e], dim=-1)
        q = q.view(b, n, h, e).transpose(1, 2)
        k = k.view(b, n, hk, e).transpose(1, 2)
        v = v.view(b, n, hk, e).transpose(1, 2)
        if self.keep_weights and not self.training:
            k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)  # shared key/value heads
            weights = (q @ k.transpose(-2, -1) * e**-0.5).softmax(dim=-1)
            self.weights = weights.detach()
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop if self.training else 0.0, enable_gqa=hk != h
            )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class _Block(nn.Module):
    def __init__(self, cfg: LSAConfig, dim: int, heads: int, drop_path: float, attn_cls: type[nn.Module]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = attn_cls(dim, heads, cfg.shared_kv, cfg.qkv_bias, cfg.attn_drop, cfg.proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), act_layer=nn.GELU, drop=cfg.proj_drop)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ShiftBlock(_Block):
    """First block of stage 1: local shift attention, then the MLP. (B,N,D), (B,N,S,D) -> (B,N,D)."""

    def __init__(self, cfg: LSAConfig, dim: int, heads: int, drop_path: float) -> None:
        super().__init__(cfg, dim, heads, drop_path, ShiftAttention)

    def forward(self, x: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        """x: copy 0, the residual stream (B, N, D); copies: all copies (B, N, S, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x), self.norm1(copies)))
        return self._mlp(x)


class GlobalBlock(_Block):
    """Pre-norm transformer block with global attention. (B,N,D) -> (B,N,D)."""

    def __init__(self, cfg: LSAConfig, dim: int, heads: int, drop_path: float) -> None:
        super().__init__(cfg, dim, heads, drop_path, GlobalAttention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return self._mlp(x)


class Downsample(nn.Module):
    """Between stages: 3x3 conv to the next width, LayerNorm over channels, 3/2 max-pool."""

    def __init__(self, dim_in: int, dim_out: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm = nn.LayerNorm(dim_out, eps=LN_EPS)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        b, _, d = x.shape
        rows, cols = grid_hw or (self.grid, self.grid)
        # (B, N, D) viewed as a grid, no copy: channels-last where the stream is contiguous
        # (stage 1 on CUDA, later stages), NCHW where stage 1's has its features outermost (CPU).
        grid = x.view(b, rows, cols, d).permute(0, 3, 1, 2)
        y = self.conv(grid).permute(0, 2, 3, 1)
        y = self.pool(self.norm(y).permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1).reshape(b, -1, y.shape[1])


class Stage(nn.Module):
    """Blocks and (except for the last stage) the downsampling that follows them.

    Stages after the first start by adding their own positional table; the first
    stage's tables (one per shift) live in the patch embedding.
    """

    def __init__(self, cfg: LSAConfig, index: int, drop_paths: Sequence[float]) -> None:
        super().__init__()
        dim, heads = cfg.widths[index], cfg.heads[index]
        if index > 0:
            self.pos_embed = nn.Parameter(torch.zeros(cfg.grid_sizes[index] ** 2, dim))
        blocks: list[nn.Module] = []
        for j, dp in enumerate(drop_paths):
            block_cls = ShiftBlock if index == 0 and j == 0 else GlobalBlock
            blocks.append(block_cls(cfg, dim, heads, dp))
        self.blocks = nn.ModuleList(blocks)
        last = index == len(cfg.widths) - 1
        self.downsample = None if last else Downsample(dim, cfg.widths[index + 1], cfg.grid_sizes[index])

    def forward(self, *inputs: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Stage 1 takes (copy 0, all copies) from the patch embedding; later stages (B, N, D).
        `grid`: this stage's (rows, columns) of tokens when the input is not the built size."""
        if hasattr(self, "pos_embed"):
            table = self.pos_embed
            if grid is not None:
                table = resize_pos_table(table, square_grid(table.shape[0]), grid)
            inputs = (inputs[0] + table,)
        x = self.blocks[0](*inputs)
        for block in self.blocks[1:]:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x, grid)
        return x


class LSA(nn.Module):
    """Locally Shifted Attention with Early Global Integration (arXiv 2112.05080)."""

    def __init__(self, cfg: LSAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = ShiftedPatchEmbed(cfg)
        total = sum(cfg.depths)
        if cfg.drop_path_mode == "linear":
            rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        else:
            rates = [cfg.drop_path_rate] * total
        stages, start = [], 0
        for i, depth in enumerate(cfg.depths):
            stages.append(Stage(cfg, i, rates[start : start + depth]))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(cfg.widths[-1], eps=LN_EPS)
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal (std 0.02) for linear, conv and positional weights; zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("pos_embed"):
                nn.init.trunc_normal_(param, std=0.02)

    def blocks(self) -> Iterator[tuple[str, nn.Module]]:
        """(qualified name, block) for every transformer block: the unit of activation checkpointing."""
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage.blocks):
                yield f"stages.{i}.blocks.{j}", block

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith("pos_embed")}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features (B, D) before the classifier."""
        h, w = images.shape[2:]
        grids = None if h == w == self.cfg.image_size else self.cfg.grids(h, w)
        x = self.stages[0](*self.patch_embed(images), grid=grids and grids[0])
        for i, stage in enumerate(self.stages[1:], start=1):
            x = stage(x, grid=grids and grids[i])
        return self.norm(x).mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


def fit_pos_tables(state: dict[str, torch.Tensor], model: LSA) -> dict[str, torch.Tensor]:
    """`state` (weights of a model built for another image size) with every positional table
    resampled to `model`'s token grids; other entries are returned as they are."""
    target = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        want = target.get(key)
        if not key.endswith("pos_embed") or want is None or value.shape == want.shape:
            continue
        if value.ndim != want.ndim or value.shape[:-2] != want.shape[:-2] or value.shape[-1] != want.shape[-1]:
            continue  # not a resolution change: the load reports the mismatch
        out[key] = resize_pos_table(value, square_grid(value.shape[-2]), square_grid(want.shape[-2]))
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "CIFAR_SHIFTS",
    "IMAGENET_SHIFTS",
    "LSA",
    "LSAConfig",
    "ModelConfigError",
    "count_parameters",
    "conv_out_size",
    "fit_pos_tables",
    "resize_pos_table",
]
