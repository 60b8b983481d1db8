"""Training engines built from the config: DeepSpeed ZeRO (default) or torch DDP (with fairscale's
OSS at ZeRO stage 1).

Both wrap the plain LSA model from outside (precision, sharding, activation checkpointing,
torch.compile) and satisfy one contract, `Engine`, which the trainer and checkpointing use.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from .config import RunConfig
from .dist import barrier, check_precision
from .models import LSA
from .parallelize import apply_to_model
from .schedule import lr_lambda, peak_lr

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepInfo:
    """What an optimizer step reports (at the end of a step, not after every micro-batch). The
    gradient norm may be a tensor on the device: reading it (`norm()`) waits for the step, so
    only logging steps do."""

    lr: float
    grad_norm: Any

    def norm(self) -> float:
        return float(self.grad_norm) if self.grad_norm is not None else float("nan")


@runtime_checkable
class Engine(Protocol):
    """The contract between a training engine and the trainer / checkpointing."""

    module: nn.Module  # the plain model (whole or, under ZeRO-3, partitioned parameters)

    def train(self, mode: bool = True) -> None: ...

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits of a float32 batch, whatever the precision."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> StepInfo | None:
        """After each micro-batch; returns StepInfo when it completed an optimizer step."""
        ...

    def lr(self) -> float: ...

    def base_lrs(self) -> list[float]:
        """The schedule's peak lr of each parameter group."""
        ...

    def rebase_lr(self, base_lrs: list[float], factor: Callable[[int], float] | None = None) -> None:
        """Follow the schedule from these peaks (a resume that accepts a new optim.lr), and by
        `factor` if given (a resume on another world size: steps per epoch changed)."""
        ...

    def save(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its part into folder/tag."""
        ...

    def load(self, folder: Path, tag: str, saved_world_size: int) -> dict[str, Any]:
        """Restore from folder/tag, written by `saved_world_size` ranks (this run may have
        another number); returns the client state saved with it."""
        ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's fp32 weights on rank 0 (collective under ZeRO-3), None elsewhere."""
        ...


def param_groups(model: LSA, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay for norms, biases and positional tables."""
    skip = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if n not in skip]
    no_decay = [p for n, p in model.named_parameters() if n in skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _EngineBase:
    """What both engines share: the config, the compute dtype, train/eval mode and the lr."""

    module: nn.Module
    engine: nn.Module  # the wrapper whose forward the trainer calls
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.dtype = PRECISIONS[cfg.engine.precision]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def base_lrs(self) -> list[float]:
        return list(self.scheduler.base_lrs)

    def rebase_lr(self, base_lrs: list[float], factor: Callable[[int], float] | None = None) -> None:
        # a loaded LambdaLR keeps the saved peaks; its factor function is this config's
        sched = self.scheduler
        sched.base_lrs = list(base_lrs)
        if factor is not None:
            sched.lr_lambdas = [factor] * len(sched.base_lrs)
        lrs = [base * factor(sched.last_epoch) for factor, base in zip(sched.lr_lambdas, sched.base_lrs)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs  # what get_last_lr() reports

    def _whole_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}


class DeepSpeedEngine(_EngineBase):
    """deepspeed.initialize from our config: ZeRO 0-3, bf16/fp16/fp32, accumulation, clipping."""

    backend = "deepspeed"

    def __init__(self, cfg: RunConfig, model: LSA, steps_per_epoch: int, world_size: int) -> None:
        import deepspeed

        super().__init__(cfg)
        groups = param_groups(model, cfg.optim.weight_decay)
        kwargs: dict[str, Any] = {}
        if cfg.engine.offload_optimizer:
            kwargs["model_parameters"] = groups  # ZeRO-Offload steps with DeepSpeed's CPU Adam
        else:
            kwargs["optimizer"] = torch.optim.AdamW(
                groups, lr=peak_lr(cfg, world_size), betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
            )
        factor = lr_lambda(cfg, steps_per_epoch, world_size)

        def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, config=deepspeed_config(cfg, world_size), lr_scheduler=scheduler, **kwargs
        )
        self.module = self.engine.module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.dtype != torch.float32:
            images = images.to(self.dtype)
        return self.engine(images).float()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> StepInfo | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return None
        return StepInfo(lr=self.lr(), grad_norm=self.engine.get_global_grad_norm())

    def save(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)

    def load(self, folder: Path, tag: str, saved_world_size: int) -> dict[str, Any]:
        """ZeRO 1-3 partition the optimizer (and ZeRO-3 the weights) by rank: a checkpoint of
        another world size is converted to DeepSpeed's universal format (one file per
        parameter and state, rank 0 writes it into folder/.universal) and loaded from there."""
        universal = self.cfg.engine.zero_stage >= 1 and saved_world_size != dist.get_world_size()
        if universal:
            from .resume import to_universal

            folder = to_universal(Path(folder), tag, self.engine.device)
        config = self.engine._config  # read by load_checkpoint only
        config.load_universal_checkpoint = universal
        groups = self.engine.optimizer.param_groups
        hyper = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
        try:
            _, client_state = self.engine.load_checkpoint(
                str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        finally:
            config.load_universal_checkpoint = False
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(folder) / tag}")
        if universal:
            # seen under ZeRO-3: the universal load gives every group the first group's weight
            # decay, and one `step` tensor to every group's state (each step then counts once per
            # group, skewing Adam's bias correction); the groups' settings are the config's
            # (resume refuses other optim.* values) and each state gets its own step
            for group, settings in zip(self.engine.optimizer.param_groups, hyper):
                group.update(settings)
            inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
            for state in inner.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
            barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(folder, ignore_errors=True)
        return client_state

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The fp32 master weights the optimizer holds (under bf16/fp16 the module's are casts of
        them), gathered from every ZeRO partition; buffers from the module. A collective."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        master = {}
        for name, param in self.module.named_parameters():
            value = safe_get_full_fp32_param(param)  # None where the module's own tensor is the master
            if value is not None:
                master[name] = value.detach().float().cpu()
        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.engine.zero_stage == 3):
            whole = self._whole_state_dict() if dist.get_rank() == 0 else None
        if whole is not None:
            missing = set(master) - set(whole)
            assert not missing, f"master weights without a state-dict entry: {sorted(missing)[:3]}"
            whole.update(master)
        return whole


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for this run."""
    micro = cfg.data.batch_size // cfg.optim.grad_accum_steps
    bucket = cfg.engine.bucket_size
    zero: dict[str, Any] = {
        "stage": cfg.engine.zero_stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    # overlapped reduction (its own CUDA stream) makes DeepSpeed synchronise the device after each
    # backward; without it the reductions run in the backward's stream, with no host sync
    if cfg.engine.zero_stage in (1, 2):
        zero["overlap_comm"] = cfg.engine.overlap_comm and torch.cuda.is_available()
    if cfg.engine.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
    if cfg.engine.zero_stage >= 1 and cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.optim.grad_accum_steps,
        "train_batch_size": micro * cfg.optim.grad_accum_steps * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "fp16": {"enabled": cfg.engine.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 2**62,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if cfg.engine.offload_optimizer:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": peak_lr(cfg, world_size),
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
            },
        }
    return config


class FairscaleEngine(_EngineBase):
    """torch DDP (bucketed all-reduce overlapped with backward, no per-parameter Python hooks)
    with, at ZeRO stage 1, fairscale's OSS optimizer-state sharding, and at stage 0 torch's AdamW
    whole on every rank (one fused kernel per step on CUDA): the engine for models whose states
    fit one GPU (tools/memory_plan.py). fairscale's checkpoint wrapper recomputes activations."""

    backend = "fairscale"

    def __init__(self, cfg: RunConfig, model: LSA, steps_per_epoch: int, world_size: int, device: torch.device) -> None:
        from fairscale.optim import OSS
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(cfg)
        self.device = device
        self.module = model.to(device)
        self.engine = DistributedDataParallel(
            self.module,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # the gradients are the all-reduce buckets: no copy in or out
        )
        groups = param_groups(model, cfg.optim.weight_decay)
        adamw = dict(lr=peak_lr(cfg, world_size), betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.sharded = cfg.engine.zero_stage == 1
        if self.sharded:
            self.optimizer = OSS(groups, optim=torch.optim.AdamW, broadcast_fp16=False, **adamw)
        else:
            self.optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda", **adamw)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, steps_per_epoch, world_size))
        self.accum = cfg.optim.grad_accum_steps
        self.micro = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # DDP synchronises gradients only in the last micro-batch of an optimizer step
        sync = (self.micro + 1) % self.accum == 0
        context = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with context:
            if sync or not self.engine.training:
                return self.engine(images).float()
            with self.engine.no_sync():
                return self.engine(images).float()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> StepInfo | None:
        self.micro += 1
        if self.micro % self.accum:
            return None
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        if self.sharded:
            norm = self.optimizer.clip_grad_norm(clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepInfo(lr=self.lr(), grad_norm=norm)

    def save(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Rank 0 writes everything (OSS first consolidates the sharded optimizer state there)."""
        if self.sharded:
            self.optimizer.consolidate_state_dict(recipient_rank=0)
        if dist.get_rank() == 0:
            target = Path(folder) / tag
            target.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "module": self.module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.scheduler.state_dict(),
                    "micro_steps": self.micro,
                    "client_state": client_state,
                },
                target / "fairscale_states.pt",
            )

    def load(self, folder: Path, tag: str, saved_world_size: int) -> dict[str, Any]:
        """The whole optimizer state (OSS re-shards it over this run's ranks)."""
        state = torch.load(Path(folder) / tag / "fairscale_states.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.micro = state["micro_steps"]
        return state["client_state"]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self._whole_state_dict() if dist.get_rank() == 0 else None


def build_engine(cfg: RunConfig, model: LSA, steps_per_epoch: int, world_size: int, device: torch.device) -> Engine:
    """The plain model prepared from outside (lsa_dist.parallelize: activation checkpointing,
    torch.compile), then wrapped by the chosen backend."""
    check_precision(cfg.engine.precision, device.type)
    apply_to_model(cfg, model)
    if cfg.engine.backend == "fairscale":
        return FairscaleEngine(cfg, model, steps_per_epoch, world_size, device)
    return DeepSpeedEngine(cfg, model.to(device), steps_per_epoch, world_size)


def warm_up() -> None:
    """Build DeepSpeed's JIT-compiled ops once (set-up calls this) so that runs and tests
    find them in the torch extensions cache instead of compiling for a minute."""
    import os

    import deepspeed

    from .dist import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    model = nn.Linear(4, 4)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
    deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    dist.destroy_process_group()
    # ZeRO-Offload's optimizer (engine.offload_optimizer) is DeepSpeed's compiled CPU Adam
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("CPUAdamBuilder").load()
