"""The typed schema of a run.

YAML files in configs/ are instances of `RunConfig`; `key=value` overrides apply on top
(`optim.lr=1e-3 data.batch_size=64`). `load_config` validates everything that can be known
before a process starts and raises ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration that cannot run; the message starts with the offending key."""


@dataclass
class AugmentConfig:
    """Training augmentation (see lsa_dist.data.transforms for the recipes)."""

    recipe: str = "imagenet"  # imagenet | basic | cifar | none
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; "" for none
    color_jitter: float = 0.0
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize to image_size / crop_pct, center crop
    cifar_padding: int = 4
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class ProgressiveConfig:
    """Progressive resizing of training images (FFCV's ImageNet recipe trains at 160 -> 192 px
    and evaluates at 224): `start` px up to epoch `first_epoch`, growing linearly to `end` px at
    `last_epoch`, intermediate sizes rounded to a multiple of `multiple`. Evaluation stays at
    data.image_size, the size the model is built for; the lr schedule is not touched."""

    start: int = 0  # 0: off (training at data.image_size)
    end: int = 0  # 0: data.image_size
    first_epoch: int = 0
    last_epoch: int = 0
    multiple: int = 32


@dataclass
class DataConfig:
    """Where the converted dataset is and how it is streamed."""

    format: str = "wds"  # wds | ffcv
    root: str = "data/demo/shards"  # the converter's --out folder (holds dataset.json)
    urls: str = ""  # WebDataset shard location template, e.g. "pipe:curl -s https://host/wds/{shard}"
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    batch_size: int = 64  # per rank and optimizer step (split into grad_accum_steps micro-batches)
    eval_batch_size: int = 0  # per rank; 0 = batch_size
    num_workers: int = 4
    shuffle_buffer: int = 2000
    check_checksums: bool = False  # re-hash every data file before training (slow on ImageNet)
    # imagenet: the mean/std the paper's (and timm's, DeiT's) models were trained with;
    # dataset: the ones measured on the converted pixels (dataset.json), for other kinds of images
    normalize: str = "imagenet"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)

    def train_size(self, epoch: int) -> int:
        """The training image size at `epoch` (data.progressive); evaluation's is image_size."""
        p = self.progressive
        if not p.start:
            return self.image_size
        end = p.end or self.image_size
        if epoch <= p.first_epoch:
            return p.start
        if epoch >= p.last_epoch:
            return end
        size = p.start + (end - p.start) * (epoch - p.first_epoch) / (p.last_epoch - p.first_epoch)
        return max(p.multiple, round(size / p.multiple) * p.multiple)


@dataclass
class ModelSection:
    name: str = "lsa_tiny"  # a named variant of lsa_dist.models
    num_classes: int = 0  # 0: the number of classes in dataset.json
    drop_path_rate: float = 0.1
    drop_path_mode: str = "uniform"  # uniform (the paper's code) | linear
    official_checkpoint: str = ""  # start from weights released with the paper (same variant)
    # start from weights trained here: a model.pt, an export, or a checkpoint (or run) folder of any
    # stage; another num_classes gets a new head, another image size resampled positional tables
    init_from: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # any other LSAConfig field, e.g. widths


@dataclass
class OptimConfig:
    lr: float = 5e-4  # at a global batch of lr_batch; scaled linearly to the actual one
    lr_batch: int = 512  # 0: use lr as is
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5.0
    epochs: int = 300
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    grad_accum_steps: int = 1
    ema_decay: float = 0.0  # exponential moving average of weights; 0 = off


@dataclass
class EngineConfig:
    backend: str = "deepspeed"  # deepspeed | fairscale
    zero_stage: int = 1  # 0-3 (deepspeed); fairscale OSS shards optimizer state only (stage 1)
    precision: str = "bf16"  # fp32 | bf16 | fp16
    activation_checkpointing: str = "none"  # none | all | every_k
    checkpoint_every_k: int = 2  # with every_k: blocks 0, k, 2k, ... are checkpointed
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU memory
    bucket_size: int = 50_000_000  # elements per ZeRO reduce/all-gather/prefetch bucket
    peak_tflops: float = 0.0  # per device, for MFU; 0: a known GPU's peak, or measured on CPU
    compile: bool = False  # torch.compile the model


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also at epoch end; 0 = epoch end only
    keep_last: int = 3
    export_at_end: bool = True  # write a consolidated fp32 model.pt at the end


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # MLflow tracking URI; "" = $MLFLOW_TRACKING_URI or sqlite:///<project>/mlflow.db
    experiment: str = "lsa_dist"
    run_name: str = ""  # "" = train.name
    log_every: int = 1  # steps between logged training metrics (batched, sent from a background thread)
    register_model: str = ""  # register the final model under this name; "" = don't


@dataclass
class SlurmConfig:
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 60 * 24
    gpus_per_node: int = 0
    cpus_per_task: int = 8
    mem_gb: int = 0  # per node; 0: mem_per_gpu_gb x GPUs per node (SLURM's default without GPUs)
    mem_per_gpu_gb: int = 64
    exclusive: bool = False
    job_name: str = ""
    additional: dict[str, str] = field(default_factory=dict)  # more sbatch directives: {mail-type: END}
    setup: list[str] = field(default_factory=list)  # shell lines before the job starts: module load ...
    array_parallelism: int = 0  # a --sweep's jobs run as one array, at most this many at once; 0: all


@dataclass
class LaunchConfig:
    nproc: int = 2  # processes for launch/local.py
    max_restarts: int = 0  # launch/local.py: restarts of all workers from the last checkpoint after a crash
    nodes: int = 1
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class TrainSection:
    name: str = ""  # run name; "" = the config file's stem
    output_dir: str = "runs"  # runs go to output_dir/name
    seed: int = 0
    resume: str = "auto"  # auto (latest good checkpoint of this run) | never | a checkpoint folder
    overwrite: bool = False  # with resume=never (or another run's checkpoint): set this run's checkpoints aside
    accept_changes: list[str] = field(default_factory=list)  # keys (or sections) a resume may change
    eval_every: int = 1  # epochs
    max_steps: int = 0  # stop after this many optimizer steps (0 = the full schedule)
    eval_only: bool = False  # evaluate the resumed/initial weights and stop
    log_every: int = 10  # steps between progress lines on rank 0
    # the real engine and loop on in-memory random data (no dataset read): to measure the system
    # without the loader; an epoch is ImageNet-1k's size, model.num_classes (0: 1000) classes
    synthetic: bool = False


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    train: TrainSection = field(default_factory=TrainSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.train.name


CHOICES = {
    "data.format": ("wds", "ffcv"),
    "data.normalize": ("imagenet", "dataset"),
    "data.augment.recipe": ("imagenet", "basic", "cifar", "none"),
    "engine.backend": ("deepspeed", "fairscale"),
    "engine.precision": ("fp32", "bf16", "fp16"),
    "engine.activation_checkpointing": ("none", "all", "every_k"),
    "model.drop_path_mode": ("uniform", "linear"),
}


# the valid interval of every numeric key ("(" and ")": that end excluded); lists: each element
RANGES = {
    "data.image_size": "[1, inf)",
    "data.batch_size": "[1, inf)",
    "data.eval_batch_size": "[0, inf)",
    "data.num_workers": "[0, inf)",
    "data.shuffle_buffer": "[0, inf)",
    "data.augment.scale": "(0, 1]",
    "data.augment.ratio": "(0, inf)",
    "data.augment.hflip": "[0, 1]",
    "data.augment.color_jitter": "[0, inf)",
    "data.augment.reprob": "[0, 1]",
    "data.augment.crop_pct": "(0, 1]",
    "data.augment.cifar_padding": "[0, inf)",
    "data.augment.mixup": "[0, inf)",
    "data.augment.cutmix": "[0, inf)",
    "data.augment.mixup_prob": "[0, 1]",
    "data.augment.mixup_switch_prob": "[0, 1]",
    "data.augment.label_smoothing": "[0, 1)",
    "data.progressive.start": "[0, inf)",
    "data.progressive.end": "[0, inf)",
    "data.progressive.first_epoch": "[0, inf)",
    "data.progressive.last_epoch": "[0, inf)",
    "data.progressive.multiple": "[1, inf)",
    "model.num_classes": "[0, inf)",
    "model.drop_path_rate": "[0, 1)",
    "optim.lr": "(0, inf)",
    "optim.lr_batch": "[0, inf)",
    "optim.min_lr": "[0, inf)",
    "optim.warmup_lr": "[0, inf)",
    "optim.warmup_epochs": "[0, inf)",
    "optim.epochs": "[1, inf)",
    "optim.weight_decay": "[0, inf)",
    "optim.betas": "[0, 1)",
    "optim.eps": "(0, inf)",
    "optim.grad_clip": "[0, inf)",
    "optim.grad_accum_steps": "[1, inf)",
    "optim.ema_decay": "[0, 1)",
    "engine.zero_stage": "[0, 3]",
    "engine.checkpoint_every_k": "[1, inf)",
    "engine.bucket_size": "[1, inf)",
    "engine.peak_tflops": "[0, inf)",
    "checkpoint.every_steps": "[0, inf)",
    "checkpoint.keep_last": "[1, inf)",
    "tracking.log_every": "[1, inf)",
    "launch.nproc": "[1, inf)",
    "launch.max_restarts": "[0, inf)",
    "launch.nodes": "[1, inf)",
    "launch.slurm.time_min": "[1, inf)",
    "launch.slurm.gpus_per_node": "[0, inf)",
    "launch.slurm.cpus_per_task": "[1, inf)",
    "launch.slurm.mem_gb": "[0, inf)",
    "launch.slurm.mem_per_gpu_gb": "[1, inf)",
    "launch.slurm.array_parallelism": "[0, inf)",
    "train.seed": "[0, 9223372036854775807]",  # torch and NumPy take non-negative seeds
    "train.eval_every": "[1, inf)",
    "train.max_steps": "[0, inf)",
    "train.log_every": "[1, inf)",
}


def _in_range(value: float, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def check_ranges(cfg: RunConfig) -> None:
    """ConfigError naming the first numeric key outside its interval (RANGES) or not finite."""
    for key, interval in RANGES.items():
        value = _get(cfg, key)
        for item in value if isinstance(value, list) else [value]:
            if not _in_range(float(item), interval):
                raise ConfigError(f"{key}: must be a finite number in {interval}, got {value}")


def _get(cfg: RunConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    text = str(err).splitlines()[0]
    if "not in" in text or "Missing key" in text or "Key '" in text:
        return f"{key}: unknown key ({text}); check the spelling against lsa_dist/config.py"
    return f"{key}: {text}" if key else text


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or the defaults), apply key=value overrides, validate. Raises ConfigError."""
    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as err:  # noqa: BLE001 - YAML syntax errors of any kind
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from err
    if not cfg.train.name:
        cfg.train.name = path.stem if path is not None else "run"
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Ranges and cross-field checks; raises ConfigError naming the key."""
    for key, options in CHOICES.items():
        if _get(cfg, key) not in options:
            raise ConfigError(f"{key}: must be one of {', '.join(options)}, got {_get(cfg, key)!r}")
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
    from .models import ModelConfigError, model_config

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


def model_overrides(cfg: RunConfig, num_classes: int) -> dict[str, Any]:
    """The LSAConfig fields this run changes from the named variant; the model is built for
    data.image_size unless model.options names another size."""
    return {
        "image_size": cfg.data.image_size,
        **dict(cfg.model.options),
        "num_classes": num_classes,
        "drop_path_rate": cfg.model.drop_path_rate,
        "drop_path_mode": cfg.model.drop_path_mode,
    }


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved next to checkpoints, logged as an artifact)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def redacted_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML with its secrets replaced by *** (what MLflow and dry runs show)."""
    from .redact import redact_tree

    return OmegaConf.to_yaml(OmegaConf.create(redact_tree(OmegaConf.to_container(OmegaConf.structured(cfg)))))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """{'optim.lr': 0.0005, ...}: the config as flat key/value pairs (MLflow params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", to_dict(cfg))
    return out
