"""The attention weights the pictures draw are the model's own: kept from its forward, summing to
one, equal to a direct computation from the block's parameters, and the forward that keeps them
gives the same logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsa_dist.attention import expected_shift, record_attention, rollout, shift_entropy
from lsa_dist.models import create_model


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lsa_cifar_tiny", widths=[16, 16], heads=[2, 2], depths=[2, 2]).eval()


def test_kept_weights_are_the_models_and_sum_to_one() -> None:
    model = _model()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(images)
        with record_attention(model) as kept:
            logits = model(images)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-6)
    names = [name for name, _ in model.blocks()]
    assert sorted(kept) == sorted(names)
    shift = kept[names[0]]  # (B, N, H, S)
    s = len(model.cfg.shifts)
    assert shift.shape == (2, 32 * 32, 2, s)
    torch.testing.assert_close(shift.sum(-1), torch.ones(shift.shape[:-1]))
    # directly: softmax over shifts of (q . k_s) / sqrt(e), keys from every copy
    block = model.stages[0].blocks[0]
    with torch.no_grad():
        residual, copies = model.patch_embed(images)
        normed = block.norm1(copies)
        b, n, _, d = copies.shape
        q = block.attn.q(block.norm1(residual)).view(b, n, 2, d // 2)
        k = F.linear(normed, block.attn.k.weight).view(b, n, s, -1, d // 2)
        scores = torch.einsum("bnhe,bnshe->bnhs", q, k.expand(b, n, s, 2, d // 2)) * (d // 2) ** -0.5
    torch.testing.assert_close(shift, scores.softmax(-1), rtol=1e-4, atol=1e-6)
    glob = kept[names[1]]  # (B, H, N, N)
    assert glob.shape == (2, 2, 1024, 1024)
    torch.testing.assert_close(glob.sum(-1), torch.ones(glob.shape[:-1]))
    # nothing is kept outside the block
    assert all(block.attn.weights is None and not block.attn.keep_weights for _, block in model.blocks())


def test_expected_shift_entropy_and_rollout() -> None:
    shifts = ((0, 0), (0, 1), (1, 0))
    one_hot = torch.zeros(1, 2, 1, 3)
    one_hot[0, 0, 0, 1] = 1.0  # token 0 takes (0, 1)
    one_hot[0, 1] = 1 / 3  # token 1: all alike
    assert torch.allclose(expected_shift(one_hot, shifts)[0, 0], torch.tensor([0.0, 1.0]))
    assert torch.allclose(expected_shift(one_hot, shifts)[0, 1], torch.tensor([1 / 3, 1 / 3]))
    entropy = shift_entropy(one_hot)[0]
    assert entropy[0] < 1e-6 and abs(entropy[1] - 1) < 1e-6
    uniform = torch.full((1, 2, 4, 4), 0.25)
    out = rollout([uniform, uniform])
    assert out.shape == (1, 4, 4) and torch.allclose(out.sum(-1), torch.ones(1, 4))
