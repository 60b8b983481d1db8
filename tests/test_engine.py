"""The engine's pure parts: the lr schedule, optimizer groups, DeepSpeed's config, and the
precision check made before any process starts (in seconds, no process group)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lsa_dist.config import ConfigError, load_config
from lsa_dist.dist import check_precision
from lsa_dist.engine import deepspeed_config, param_groups
from lsa_dist.models import create_model
from lsa_dist.parallelize import apply_to_model, checkpointed_blocks
from lsa_dist.schedule import lr_lambda, peak_lr

ROOT = Path(__file__).resolve().parents[1]


def schedule_cfg(*overrides: str):  # noqa: ANN201
    base = ["optim.lr=1e-3", "optim.lr_batch=0", "optim.warmup_lr=1e-5", "optim.min_lr=1e-6"]
    return load_config(ROOT / "configs" / "demo.yaml", [*base, "optim.epochs=10", "optim.warmup_epochs=2", *overrides])


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor() -> None:
    cfg = schedule_cfg()
    steps_per_epoch, peak = 100, 1e-3
    factor = lr_lambda(cfg, steps_per_epoch, world_size=2)
    lr = [peak * factor(step) for step in range(1001)]
    assert lr[0] == pytest.approx(1e-5)
    assert lr[100] == pytest.approx(1e-5 + (peak - 1e-5) / 2)  # half way through the 200-step warmup
    assert lr[200] == pytest.approx(peak)
    assert all(a <= b for a, b in zip(lr[:200], lr[1:201]))  # rising during warmup
    assert all(a >= b for a, b in zip(lr[200:], lr[201:]))  # falling after it
    assert lr[600] == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr[1000] == pytest.approx(1e-6)
    assert peak * factor(5000) == pytest.approx(1e-6)  # past the end: stays at the floor


def test_peak_lr_scales_with_the_global_batch() -> None:
    cfg = schedule_cfg("optim.lr=5e-4", "optim.lr_batch=512", "data.batch_size=64")
    assert peak_lr(cfg, world_size=8) == pytest.approx(5e-4)  # 8 x 64 = 512
    assert peak_lr(cfg, world_size=32) == pytest.approx(2e-3)
    assert peak_lr(schedule_cfg("optim.lr_batch=0"), world_size=32) == pytest.approx(1e-3)  # as is


def test_no_weight_decay_on_norms_biases_and_positional_tables() -> None:
    model = create_model("lsa_cifar_tiny", widths=[16, 16], heads=[2, 2], depths=[1, 1])
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("pos_embed") for n in skipped) and any(n.endswith(".bias") for n in skipped)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_activation_checkpointing_policies_pick_blocks() -> None:
    model = create_model("lsa_cifar_tiny", widths=[16, 16], heads=[2, 2], depths=[3, 2])
    names = [n for n, _ in model.blocks()]
    assert checkpointed_blocks(model, "none", 2) == []
    assert checkpointed_blocks(model, "all", 2) == names
    assert checkpointed_blocks(model, "every_k", 2) == names[::2]


@pytest.mark.parametrize("backend", ["deepspeed", "fairscale"])
def test_checkpointed_blocks_recompute_under_the_forwards_autocast(backend: str) -> None:
    """bf16 autocast on a CPU with every block checkpointed: the gradients are the ones without
    checkpointing, bit for bit (fairscale's wrapper restores only CUDA's autocast, and recomputed
    a CPU forward in float32; with this model's bf16 copies it failed on a dtype mismatch)."""
    overrides = [f"engine.backend={backend}", "engine.zero_stage=1", "engine.precision=bf16"]
    overrides += ["model.options.widths=[16,16]", "model.options.heads=[2,2]", "model.options.depths=[2,1]"]
    grads = []
    for policy in ("none", "all"):
        cfg = load_config(ROOT / "configs" / "demo.yaml", [*overrides, f"engine.activation_checkpointing={policy}"])
        torch.manual_seed(0)
        model = create_model("lsa_cifar_tiny", widths=[16, 16], heads=[2, 2], depths=[2, 1])
        apply_to_model(cfg, model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))).float().sum()
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("backend", ["deepspeed", "fairscale"])
def test_a_compiled_model_with_checkpointed_blocks_compiles_once(backend: str) -> None:
    """Activation checkpointing under torch.compile (aot_eager: the same capture as inductor) for
    both backends: the training steps reuse one graph, none recompiles, nothing falls back to eager
    (fairscale's own wrapper recompiled at every call until dynamo's limit)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [f"engine.backend={backend}", "engine.zero_stage=1", "engine.activation_checkpointing=all"]
        + ["engine.compile=true", "engine.compile_backend=aot_eager", "model.options.widths=[16,16]"]
        + ["model.options.heads=[2,2]", "model.options.depths=[2,1]"],
    )
    torch.manual_seed(0)
    model = create_model("lsa_cifar_tiny", widths=[16, 16], heads=[2, 2], depths=[2, 1])
    eager = create_model("lsa_cifar_tiny", widths=[16, 16], heads=[2, 2], depths=[2, 1])
    eager.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    apply_to_model(cfg, model)
    images = torch.randn(4, 3, 32, 32)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=2):
        for _ in range(3):
            model(images).sum().backward()
    eager(images).sum().backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # the forward, once
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, 3 * q.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_deepspeed_config_follows_the_run_config() -> None:
    cfg = schedule_cfg("data.batch_size=32", "optim.grad_accum_steps=4", "engine.zero_stage=3", "engine.precision=fp16")
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 8 * 4 * 8
    assert ds["zero_optimization"]["stage"] == 3 and "stage3_prefetch_bucket_size" in ds["zero_optimization"]
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and "optimizer" not in ds
    offload = deepspeed_config(schedule_cfg("engine.zero_stage=2", "engine.offload_optimizer=true"), world_size=2)
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["optimizer"]["type"] == "AdamW"
    # overlapped reduction (a device sync after every backward) only when asked for, and on CUDA
    assert offload["zero_optimization"]["overlap_comm"] is False
    asked = deepspeed_config(schedule_cfg("engine.zero_stage=2", "engine.overlap_comm=true"), world_size=2)
    assert asked["zero_optimization"]["overlap_comm"] is torch.cuda.is_available()
    assert "overlap_comm" not in ds["zero_optimization"]  # ZeRO-3 keeps DeepSpeed's own default


def test_fp16_on_a_cpu_without_fp16_support_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    check_precision("bf16", "cpu")
    check_precision("fp32", "cpu")

    def no_fp16() -> bool:
        return False

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", no_fp16)
    with pytest.raises(ConfigError) as err:
        check_precision("fp16", "cpu")
    assert str(err.value).startswith("engine.precision: fp16 needs a GPU or a CPU with AVX-512 FP16")
    check_precision("bf16", "cpu")  # the others stay allowed


def test_more_local_processes_than_gpus_is_refused_and_loader_workers_keep_their_cores() -> None:
    """Two ranks on one GPU break NCCL: refused before any process starts, in one line; without
    GPUs any number of processes runs. Each loader worker keeps a core; the rest compute."""
    from lsa_dist.dist import check_local_ranks, compute_threads

    with pytest.raises(ConfigError, match=r"^launch.nproc: 9 processes but this machine has 8 GPUs; .* --nproc 8"):
        check_local_ranks(9, 8)
    check_local_ranks(8, 8)
    check_local_ranks(4, 0)  # CPU ranks
    assert compute_threads(16, 8) == 8 and compute_threads(2, 4) == 1 and compute_threads(4, 0) == 4
