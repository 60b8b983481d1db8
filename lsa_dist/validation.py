"""Checks of a loaded config that span keys (and each key's declared range): what can be known
wrong before any process starts, as ConfigError naming the key. `config.load_config` runs them."""

from __future__ import annotations

import re
from pathlib import Path

from .config import ConfigError, RunConfig, model_overrides
from .constraints import violations


def check_ranges(cfg: RunConfig) -> None:
    """ConfigError naming the first key outside its field's choices or interval (see `knob`)."""
    for message in violations(cfg):
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Choices, ranges and cross-field checks; raises ConfigError naming the key."""
    check_ranges(cfg)
    aug = cfg.data.augment
    for key in ("scale", "ratio"):
        pair = getattr(aug, key)
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ConfigError(f"data.augment.{key}: must be [low, high] with low <= high, got {pair}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: must be two numbers, got {cfg.optim.betas}")
    mixing = aug.recipe == "imagenet" and (aug.mixup > 0 or aug.cutmix > 0) and aug.mixup_prob > 0
    if mixing and cfg.data.batch_size % 2:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is odd; mixup/cutmix pair each image with another of its "
            "batch (timm's batch mode), so it must be even"
        )
    if cfg.data.batch_size % cfg.optim.grad_accum_steps:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is not divisible by optim.grad_accum_steps="
            f"{cfg.optim.grad_accum_steps} (each rank splits its batch into that many micro-batches)"
        )
    if cfg.engine.backend == "fairscale":
        if cfg.engine.zero_stage not in (0, 1):
            raise ConfigError(
                f"engine.zero_stage: {cfg.engine.zero_stage} needs engine.backend=deepspeed; fairscale's OSS "
                "shards optimizer state only (stage 1)"
            )
        if cfg.engine.precision == "fp16":
            raise ConfigError("engine.precision: fp16 (loss scaling) needs engine.backend=deepspeed; use bf16 or fp32")
        if cfg.engine.offload_optimizer:
            raise ConfigError("engine.offload_optimizer: needs engine.backend=deepspeed")
    if cfg.engine.offload_optimizer and cfg.engine.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer: needs engine.zero_stage >= 1")
    if cfg.optim.ema_decay and cfg.engine.zero_stage == 3:
        raise ConfigError("optim.ema_decay: EMA needs whole parameters on every rank; use engine.zero_stage <= 2")
    for name in cfg.launch.slurm.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            raise ConfigError(f"launch.slurm.env: {name!r} is not an environment variable name")
    if cfg.engine.compile and cfg.engine.zero_stage == 3:
        raise ConfigError(
            "engine.compile: torch.compile cannot trace ZeRO-3's partitioned parameters (gathered by hooks "
            "around each module); use engine.zero_stage <= 2"
        )
    if cfg.train.resume not in ("auto", "never") and not Path(cfg.train.resume).is_dir():
        raise ConfigError(f"train.resume: {cfg.train.resume!r} is neither auto, never, nor a checkpoint folder")
    progressive = cfg.data.progressive
    if progressive.start:
        if progressive.last_epoch < progressive.first_epoch:
            raise ConfigError(
                f"data.progressive.last_epoch: {progressive.last_epoch} is before first_epoch {progressive.first_epoch}"
            )
    if cfg.model.init_from and cfg.model.official_checkpoint:
        raise ConfigError("model.init_from: set either it or model.official_checkpoint, not both")
    if cfg.model.init_from and not Path(cfg.model.init_from).exists():
        raise ConfigError(f"model.init_from: {cfg.model.init_from} does not exist")
    _validate_model(cfg)


def _validate_model(cfg: RunConfig) -> None:
    from .models.spec import ModelConfigError, model_config

    try:
        model_cfg = model_config(cfg.model.name, **model_overrides(cfg, num_classes=cfg.model.num_classes or 1))
    except ModelConfigError as err:
        message = str(err)
        if message.startswith("model.") and not message.startswith("model.name"):
            field_name = message.split(":", 1)[0][len("model.") :]
            if field_name not in ("drop_path_rate", "drop_path_mode", "num_classes"):
                message = f"model.options.{message[len('model.') :]}"
        raise ConfigError(message) from err
    if model_cfg.image_size != cfg.data.image_size:
        raise ConfigError(
            f"data.image_size: {cfg.data.image_size} but model {cfg.model.name} takes {model_cfg.image_size} px "
            f"images; set data.image_size={model_cfg.image_size} or model.options.image_size"
        )
