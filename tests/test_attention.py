"""The attention weights the pictures draw are the model's own: kept from its forward, summing to
one, equal to a direct computation from the block's parameters, and the forward that keeps them
gives the same logits."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from lsa_dist.attention import expected_shift, record_attention, rollout, shift_entropy
from lsa_dist.models import create_model

ROOT = Path(__file__).resolve().parents[1]


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


def test_evaluation_pictures_draw_fixed_images_without_touching_trainings_random_state(
    demo_shards: Path, tmp_path: Path
) -> None:
    from lsa_dist.attention import EvaluationPictures
    from lsa_dist.config import load_config
    from lsa_dist.data import build_loader

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={demo_shards}", "data.num_workers=0"])
    loader = build_loader(cfg.data, "val", 0, 1, train=False, seed=0)
    model = _model()

    class Trained:  # the engine's one call used here: the whole model's fp32 weights on rank 0
        def full_state_dict(self) -> dict[str, torch.Tensor]:
            return {k: v.clone() for k, v in model.state_dict().items()}

    logged: list[tuple[Path, str]] = []
    pictures = EvaluationPictures(2, asdict(model.cfg), loader, tmp_path, lambda p, f: logged.append((p, f)))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = pictures.draw(Trained(), 7, is_main=True)
    assert torch.equal(torch.get_rng_state(), before)  # training's random stream is untouched
    images = pictures.images
    second = pictures.draw(Trained(), 9, is_main=True)
    assert pictures.images is images and images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert [p.name for p, _ in logged] == ["step_00000007.png", "step_00000009.png"] == [first.name, second.name]
    assert {folder for _, folder in logged} == {"attention"}
    with Image.open(first) as png:
        assert png.format == "PNG"
    assert pictures.draw(Trained(), 11, is_main=False) is None and len(logged) == 2  # rank 0 draws


def test_the_tool_draws_a_model_file_on_its_runs_validation_images(demo_shards: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from lsa_dist.weights import save_model_file

    model = _model()
    save_model_file(tmp_path / "model.pt", asdict(model.cfg), model.state_dict())
    tool = [sys.executable, str(ROOT / "tools" / "attention_maps.py"), str(tmp_path / "model.pt")]
    config = ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.root={demo_shards}", "data.num_workers=0"]
    done = subprocess.run(
        [*tool, "--images", "3", "--out", str(tmp_path / "pictures"), *config], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"shift entropy [01]\.\d{3} .* stage 1 global attention distance [\d.]+ tokens", done.stdout)
    with Image.open(tmp_path / "pictures" / "attention.png") as png:
        assert png.format == "PNG" and png.height > 3 * 150  # one row per image
    refused = subprocess.run(tool, capture_output=True, text=True)  # a model file needs its config
    assert refused.returncode == 2 and "give --config" in refused.stderr
