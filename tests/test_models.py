"""The LSA model family: architecture facts, official-weight parity, gradients, errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from lsa_dist.models import (
    CIFAR_SHIFTS,
    LSA,
    OFFICIAL_CONFIGS,
    LSAConfig,
    ModelConfigError,
    OfficialCheckpointError,
    count_macs,
    count_parameters,
    create_model,
    fit_pos_tables,
    from_official,
    list_models,
    macs_by_size,
    model_config,
    resize_pos_table,
)
from lsa_dist.models.reference import reference_forward

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_lsa"
FIXTURE_NAMES = ["official_imagenet_tiny_style", "official_imagenet_small_style", "official_cifar_style"]

# Parameter counts (millions) and forward multiply-accumulates (G) of the paper's models.
PAPER_PARAMS = {
    "lsa_tiny": 9.91,
    "lsa_small": 22.15,
    "lsa_cifar_tiny": 10.14,
    "lsa_cifar_small": 32.77,
    "lsa_cifar_base": 102.78,
}
PAPER_MACS = {"lsa_tiny": 3.62, "lsa_small": 7.69, "lsa_cifar_tiny": 2.69}

# Small configurations of both families for fast numerical tests.
SMALL_IMAGENET = LSAConfig(
    image_size=32,
    num_classes=7,
    patch_kernel=4,
    patch_stride=4,
    patch_padding=0,
    widths=(16, 32, 32),
    heads=(2, 2, 4),
    depths=(2, 1, 2),
)
SMALL_CIFAR = LSAConfig(
    image_size=16,
    num_classes=5,
    patch_kernel=3,
    patch_stride=1,
    patch_padding=1,
    shifts=CIFAR_SHIFTS,
    shift_mode="roll",
    widths=(16, 16, 24),
    heads=(2, 2, 3),
    depths=(2, 2, 1),
    shared_kv=True,
)
SMALL = {"imagenet": SMALL_IMAGENET, "cifar": SMALL_CIFAR}


def load_fixture(name: str) -> dict:
    path = FIXTURES / f"{name}.pt"
    assert path.exists(), f"fixture {path} is missing: set LSA_FIXTURES to the official_lsa fixture folder"
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", list_models())
def test_every_variant_builds_and_gives_logits(name: str) -> None:
    model = create_model(name).eval()
    size = model.cfg.image_size
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, model.cfg.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name,millions", sorted(PAPER_PARAMS.items()))
def test_parameter_counts_match_the_paper(name: str, millions: float) -> None:
    count = count_parameters(create_model(name)) / 1e6
    assert abs(count - millions) / millions < 0.005, f"{name}: {count:.2f} M vs {millions} M"


def test_our_large_variants_have_their_target_sizes() -> None:
    assert 80 < count_parameters(create_model("lsa_base")) / 1e6 < 90
    assert 285 < count_parameters(create_model("lsa_large")) / 1e6 < 315


@pytest.mark.parametrize("name,gmacs", sorted(PAPER_MACS.items()))
def test_macs_match_the_official_models(name: str, gmacs: float) -> None:
    macs = count_macs(create_model(name)) / 1e9
    assert abs(macs - gmacs) / gmacs < 0.005, f"{name}: {macs:.3f} G vs {gmacs} G"


def test_our_model_executes_fewer_macs_than_the_architecture_count() -> None:
    model = create_model("lsa_tiny")
    executed, canonical = count_macs(model, "model"), count_macs(model)
    # the shift attention skips projecting all 10 copies to keys and values
    assert 0.7 * canonical < executed < 0.9 * canonical


def test_macs_follow_the_image_size_a_progressive_epoch_trains_at() -> None:
    """Both counts at each size equal those of the model built for that size (the reference
    forward only runs at a model's own size): at 161 px lsa_tiny costs half its 224 px count."""
    model = create_model("lsa_tiny")
    counts = macs_by_size(model, [126, 161])
    assert sorted(counts) == [126, 161, 224]
    for size, (architecture, executed) in counts.items():
        native = create_model("lsa_tiny", image_size=size)
        assert (architecture, executed) == (count_macs(native), count_macs(native, "model")), size
    assert counts[161][0] < 0.5 * counts[224][0]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_official_weights_reproduce_official_logits(name: str) -> None:
    fixture = load_fixture(name)
    model = from_official(fixture["config"], fixture["state_dict"]).eval()
    with torch.no_grad():
        logits = model(fixture["input"])
    torch.testing.assert_close(logits, fixture["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_batch_of_one_gives_the_same_per_image_result(name: str) -> None:
    fixture = load_fixture(name)
    model = from_official(fixture["config"], fixture["state_dict"]).eval()
    with torch.no_grad():
        batched = model(fixture["input"])
        single = torch.cat([model(img[None]) for img in fixture["input"]])
    torch.testing.assert_close(single, batched, atol=1e-5, rtol=0)
    torch.testing.assert_close(single, fixture["logits"], atol=1e-5, rtol=0)


def test_official_import_keeps_shared_norms_per_block_and_drops_nothing_else() -> None:
    fixture = load_fixture("official_imagenet_small_style")
    model = from_official(fixture["config"], fixture["state_dict"])
    shared = fixture["state_dict"]["layers.2.0.norm1.weight"]
    for block in model.stages[2].blocks:
        torch.testing.assert_close(block.norm1.weight.detach(), shared)
    # modulo the shift attention's key bias (it cancels), every official number is kept
    official_numbers = sum(v.numel() for v in fixture["state_dict"].values())
    key_bias = fixture["state_dict"]["layers.0.0.layers.0.0.Wkv_even.bias"].numel() // 2
    extra_norms = sum(
        4 * model.cfg.widths[i] * (depth - 1) for i, depth in enumerate(model.cfg.depths)
    )  # per-block copies of the shared norms
    assert count_parameters(model) == official_numbers - key_bias + extra_norms


def test_official_checkpoint_in_training_script_format_loads(tmp_path: Path) -> None:
    fixture = load_fixture("official_cifar_style")
    # The official training script saves {'model': ..., 'args': Namespace(...)}.
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": fixture["state_dict"], "args": argparse.Namespace(lr=5e-4), "epoch": 3}, path)
    from lsa_dist.models.official import config_from_official, load_official_checkpoint

    state = load_official_checkpoint(path)
    model = LSA(config_from_official(fixture["config"]))
    reference = from_official(fixture["config"], state).eval()
    assert set(model.state_dict()) == set(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reference(fixture["input"]), fixture["logits"], atol=1e-5, rtol=0)


def to_official_layout(model: LSA) -> dict[str, torch.Tensor]:
    """Our weights in the official key layout (valid while each stage's norms are equal)."""
    cfg, sd, out = model.cfg, model.state_dict(), {}
    for i in range(cfg.num_shifts):
        for p in ("weight", "bias"):
            out[f"to_patch_embedding.projections.{i}.{p}"] = sd[f"patch_embed.proj.{i}.{p}"]
    for s, (width, depth) in enumerate(zip(cfg.widths, cfg.depths)):
        st = f"layers.{s}.0"
        out[f"{st}.pos_emb"] = sd["patch_embed.pos_embed" if s == 0 else f"stages.{s}.pos_embed"]
        for norm in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[f"{st}.{norm}.{p}"] = sd[f"stages.{s}.blocks.0.{norm}.{p}"]
        for b in range(depth):
            blk, attn = f"stages.{s}.blocks.{b}", f"{st}.layers.{b}.0"
            if s == 0 and b == 0:
                kv = sd[f"{blk}.attn.k.weight"].shape[0]
                out[f"{attn}.Wq_even.weight"] = sd[f"{blk}.attn.q.weight"]
                out[f"{attn}.Wq_even.bias"] = sd[f"{blk}.attn.q.bias"]
                out[f"{attn}.Wkv_even.weight"] = torch.cat([sd[f"{blk}.attn.k.weight"], sd[f"{blk}.attn.v.weight"]])
                # any key bias: it cancels in the softmax over shifts
                out[f"{attn}.Wkv_even.bias"] = torch.cat([torch.randn(kv), sd[f"{blk}.attn.v.bias"]])
            else:
                qkv_w, qkv_b = sd[f"{blk}.attn.qkv.weight"], sd[f"{blk}.attn.qkv.bias"]
                out[f"{attn}.Wq_odd.weight"], out[f"{attn}.Wkv_odd.weight"] = qkv_w[:width], qkv_w[width:]
                out[f"{attn}.Wq_odd.bias"], out[f"{attn}.Wkv_odd.bias"] = qkv_b[:width], qkv_b[width:]
            for p in ("weight", "bias"):
                out[f"{attn}.proj.{p}"] = sd[f"{blk}.attn.proj.{p}"]
                for fc in ("fc1", "fc2"):
                    out[f"{st}.layers.{b}.1.{fc}.{p}"] = sd[f"{blk}.mlp.{fc}.{p}"]
        if s < len(cfg.widths) - 1:
            for mod in ("conv", "norm"):
                for p in ("weight", "bias"):
                    out[f"layers.{s}.1.{mod}.{p}"] = sd[f"stages.{s}.downsample.{mod}.{p}"]
    for p in ("weight", "bias"):
        out[f"norm.{p}"], out[f"mlp_head.{p}"] = sd[f"norm.{p}"], sd[f"head.{p}"]
    return out


def test_create_model_loads_an_official_release_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = create_model("lsa_cifar_tiny").eval()
    path = tmp_path / "lsa_cifar_tiny_official.pth"
    # the official training script saves {'model': ..., 'args': Namespace(...), 'epoch': ...}
    torch.save({"model": to_official_layout(ours), "args": argparse.Namespace(lr=5e-4), "epoch": 299}, path)
    images = torch.randn(2, 3, 32, 32)
    loaded = create_model("lsa_cifar_tiny", official_checkpoint=path).eval()
    fine_tune = create_model("lsa_cifar_tiny", official_checkpoint=path, num_classes=3, drop_path_rate=0.1).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), ours(images), atol=1e-5, rtol=0)
        assert fine_tune(images).shape == (2, 3)
        torch.testing.assert_close(fine_tune.forward_features(images), ours.forward_features(images))
    assert fine_tune.cfg.drop_path_rate == 0.1
    with pytest.raises(OfficialCheckpointError, match="does not match|lacks"):
        create_model("lsa_cifar_small", official_checkpoint=path)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_fast_model_matches_the_reference_implementation(family: str) -> None:
    torch.manual_seed(0)
    model = LSA(SMALL[family])
    images = torch.randn(3, 3, model.cfg.image_size, model.cfg.image_size)
    labels = torch.tensor([0, 1, 2])
    grads = []
    for forward in (model, lambda x: reference_forward(model, x)):
        model.zero_grad(set_to_none=True)
        logits = forward(images)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast, fast_grads), (ref, ref_grads) = grads
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_gradients_reach_every_parameter(family: str) -> None:
    torch.manual_seed(0)
    model = LSA(SMALL[family])
    images = torch.randn(2, 3, model.cfg.image_size, model.cfg.image_size)
    model(images).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_eval_output_is_deterministic_and_drop_path_only_acts_in_training() -> None:
    torch.manual_seed(0)
    model = LSA(LSAConfig(**{**SMALL_IMAGENET.__dict__, "drop_path_rate": 0.5}))
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        first, second = model(images), model(images)
    assert torch.equal(first, second)
    model.train()
    with torch.no_grad():
        a, b = model(images), model(images)
    assert not torch.equal(a, b)


def test_linear_drop_path_grows_with_depth() -> None:
    cfg = LSAConfig(**{**SMALL_IMAGENET.__dict__, "drop_path_rate": 0.2, "drop_path_mode": "linear"})
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for _, block in LSA(cfg).blocks()]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == sorted(rates)


def test_shift_modes_build_the_documented_copies() -> None:
    model = LSA(SMALL_IMAGENET)
    image = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32).expand(1, 3, 32, 32)
    copy = model.patch_embed.shifted(image, 1, 2)
    assert copy.shape == (1, 3, 33, 34)  # circular pad: 1 row on top, 2 columns on the left
    assert torch.equal(copy[..., 1:, 2:], image)
    assert torch.equal(copy[..., 0, 2:], image[..., -1, :])
    roll = LSA(SMALL_CIFAR).patch_embed.shifted(image[..., :16, :16], -1, 2)
    assert torch.equal(roll, torch.roll(image[..., :16, :16], shifts=(-1, 2), dims=(2, 3)))


def test_a_model_runs_at_any_input_size_with_resampled_positional_tables() -> None:
    """Called at another size, the positional tables are resampled (bicubic on the token grid):
    the same logits as a model built for that size from the resampled weights; at its own size
    nothing is resampled."""
    patchified = LSAConfig(image_size=56, widths=(16, 16, 16), heads=(2, 2, 2), depths=(1, 1, 1))  # 9/7/1, pad shifts
    for cfg in (SMALL_IMAGENET, SMALL_CIFAR, patchified):
        torch.manual_seed(0)
        model = LSA(cfg).eval()
        for size in (cfg.image_size - 4, cfg.image_size + 5, 2 * cfg.image_size):  # 61 px: copies cut
            images = torch.randn(2, 3, size, size)
            built = LSA(LSAConfig(**{**cfg.__dict__, "image_size": size})).eval()
            built.load_state_dict(fit_pos_tables(model.state_dict(), built))
            with torch.no_grad():
                called, native = model(images), built(images)
            assert called.shape == (2, cfg.num_classes) and torch.isfinite(called).all()
            torch.testing.assert_close(called, native, atol=1e-6, rtol=0)
        images = torch.randn(2, 3, cfg.image_size, 2 * cfg.image_size)  # not square either
        with torch.no_grad():
            assert model(images).shape == (2, cfg.num_classes)
    table = torch.randn(3, 16, 8)
    assert resize_pos_table(table, (4, 4), (4, 4)) is table
    torch.testing.assert_close(
        resize_pos_table(resize_pos_table(table, (4, 4), (8, 8)), (8, 8), (4, 4)), table, atol=0.3, rtol=0
    )  # smooth resampling, not a shuffle
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\) with H, W >= 7"):
        LSA(patchified)(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\)"):
        create_model("lsa_cifar_tiny")(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("size", [160, 256, 384])
def test_imagenet_models_build_at_other_sizes_and_take_224_weights(size: int) -> None:
    base = create_model("lsa_tiny", depths=(1, 1, 1, 1)).eval()
    model = create_model("lsa_tiny", depths=(1, 1, 1, 1), image_size=size).eval()
    model.load_state_dict(fit_pos_tables(base.state_dict(), model))
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(images), base(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_official_weights_load_at_other_sizes(name: str) -> None:
    """An official release keeps its logits at its own size (above) and loads at others (the
    fixtures are small: 56 px stands for 224, so 40/64/96 for 160/256/384)."""
    fixture = load_fixture(name)
    own = from_official(fixture["config"], fixture["state_dict"]).eval()
    for ratio in (160, 256, 384):
        size = round(own.cfg.image_size * ratio / 224)
        model = from_official(fixture["config"], fixture["state_dict"], image_size=size).eval()
        images = torch.nn.functional.interpolate(fixture["input"], size=(size, size), mode="bicubic")
        with torch.no_grad():
            torch.testing.assert_close(model(images), own(images), atol=1e-5, rtol=0)


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ModelConfigError, match="unknown model 'lsa_huge'; choose one of lsa_tiny"):
        create_model("lsa_huge")
    with pytest.raises(ModelConfigError, match="model.width: not a model option"):
        model_config("lsa_tiny", width=3)
    with pytest.raises(ModelConfigError, match="has no official release"):
        create_model("lsa_large", official_checkpoint="x.pth")


def test_official_state_dict_for_another_config_is_a_clear_error() -> None:
    fixture = load_fixture("official_imagenet_small_style")
    config = dict(fixture["config"], num_layers_per_block=[2, 2, 2])
    with pytest.raises(OfficialCheckpointError, match="lacks 'layers.1.0.layers.1.0.Wq_odd.weight'"):
        from_official(config, fixture["state_dict"])
    config = dict(fixture["config"], num_layers_per_block=[2, 1, 1])
    with pytest.raises(OfficialCheckpointError, match="keys this config does not use"):
        from_official(config, fixture["state_dict"])
    config = dict(fixture["config"], embedding_dim=[[16, 32], [32, 48], [64, 64]])
    with pytest.raises(OfficialCheckpointError, match="stage 1 ends at width 48 but stage 2 starts at 64"):
        from_official(config, fixture["state_dict"])


def test_missing_or_corrupt_official_file_is_a_clear_error(tmp_path: Path) -> None:
    from lsa_dist.models.official import load_official_checkpoint

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(OfficialCheckpointError, match="cannot read official checkpoint"):
        load_official_checkpoint(bad)


def test_official_configs_describe_the_named_variants() -> None:
    from lsa_dist.models.official import config_from_official

    for name, official in OFFICIAL_CONFIGS.items():
        ours = model_config(name)
        assert config_from_official(official) == ours, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: SDPA's fused kernels are CUDA kernels")
@pytest.mark.parametrize("name", ["lsa_tiny", "lsa_cifar_tiny"])
def test_bf16_attention_takes_a_fused_sdpa_kernel_on_a_gpu(name: str) -> None:
    """Training's forward and backward in bf16 with SDPA restricted to the flash and memory-
    efficient kernels: it raises if the global-attention layers would fall back to the math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = create_model(name).cuda().to(torch.bfloat16).train()
    size = model.cfg.image_size
    images = torch.randn(4, 3, size, size, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        model(images).float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
