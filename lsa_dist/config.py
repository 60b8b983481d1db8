"""The typed schema of a run.

YAML files in configs/ are instances of `RunConfig`; `key=value` overrides apply on top
(`optim.lr=1e-3 data.batch_size=64`). `load_config` validates everything that can be known
before a process starts and raises ConfigError naming the key. Each field declares its own
constraints (`knob`: interval, choices, part of the run's mathematics).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .constraints import knob, walk_fields
from .redact import redact_text

_KEY_PREFIX = re.compile(r"^[\w.\[\]-]+: ")


class ConfigError(ValueError):
    """A configuration that cannot run; the message starts with the offending key. The message
    is redacted (lsa_dist.redact) where it is made: a value it quotes may hold a credential. The
    leading key stays readable even where its name looks secret."""

    def __init__(self, message: str) -> None:
        prefix = _KEY_PREFIX.match(message)
        head = prefix[0] if prefix else ""
        super().__init__(head + redact_text(message[len(head) :]))


@dataclass
class AugmentConfig:
    """Training augmentation (see lsa_dist.data.transforms for the recipes)."""

    recipe: str = knob("imagenet", choices=("imagenet", "basic", "cifar", "none"))
    scale: list[float] = knob([0.08, 1.0], interval="(0, 1]")
    ratio: list[float] = knob([3 / 4, 4 / 3], interval="(0, inf)")
    hflip: float = knob(0.5, interval="[0, 1]")
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; "" for none
    color_jitter: float = knob(0.0, interval="[0, inf)")
    reprob: float = knob(0.25, interval="[0, 1]")  # random erasing probability
    remode: str = "pixel"
    interpolation: str = "bicubic"
    crop_pct: float = knob(0.875, interval="(0, 1]")  # eval: resize to image_size / crop_pct, center crop
    cifar_padding: int = knob(4, interval="[0, inf)")
    mixup: float = knob(0.8, interval="[0, inf)")
    cutmix: float = knob(1.0, interval="[0, inf)")
    mixup_prob: float = knob(1.0, interval="[0, 1]")
    mixup_switch_prob: float = knob(0.5, interval="[0, 1]")
    label_smoothing: float = knob(0.1, interval="[0, 1)")


@dataclass
class ProgressiveConfig:
    """Progressive resizing of training images (FFCV's ImageNet recipe trains at 160 -> 192 px
    and evaluates at 224): `start` px up to epoch `first_epoch`, growing linearly to `end` px at
    `last_epoch`, intermediate sizes rounded to a multiple of `multiple`. Evaluation stays at
    data.image_size, the size the model is built for; the lr schedule is not touched."""

    start: int = knob(0, interval="[0, inf)")  # 0: off (training at data.image_size)
    end: int = knob(0, interval="[0, inf)")  # 0: data.image_size
    first_epoch: int = knob(0, interval="[0, inf)")
    last_epoch: int = knob(0, interval="[0, inf)")
    multiple: int = knob(32, interval="[1, inf)")


@dataclass
class DataConfig:
    """Where the converted dataset is and how it is streamed."""

    format: str = knob("wds", choices=("wds", "ffcv"), math=True)
    root: str = "data/demo/shards"  # the converter's --out folder (holds dataset.json)
    urls: str = ""  # WebDataset shard location template, e.g. "pipe:curl -s https://host/wds/{shard}"
    train_split: str = knob("train", math=True)
    val_split: str = "val"
    image_size: int = knob(224, interval="[1, inf)", math=True)
    batch_size: int = knob(64, interval="[1, inf)", math=True)  # per rank and optimizer step, see grad_accum_steps
    eval_batch_size: int = knob(0, interval="[0, inf)")  # per rank; 0 = batch_size
    num_workers: int = knob(4, interval="[0, inf)")
    shuffle_buffer: int = knob(2000, interval="[0, inf)", math=True)
    check_checksums: bool = False  # re-hash every data file before training (slow on ImageNet)
    # samples that cannot be decoded are skipped and named; more than this in one pass over an
    # epoch on one rank stops the run (exit 2)
    max_bad_samples: int = knob(100, interval="[0, inf)")
    # imagenet: the mean/std the paper's (and timm's, DeiT's) models were trained with;
    # dataset: the ones measured on the converted pixels (dataset.json), for other kinds of images
    normalize: str = knob("imagenet", choices=("imagenet", "dataset"), math=True)
    augment: AugmentConfig = knob(AugmentConfig, math=True)
    progressive: ProgressiveConfig = knob(ProgressiveConfig, math=True)

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
    num_classes: int = knob(0, interval="[0, inf)")  # 0: the number of classes in dataset.json
    drop_path_rate: float = knob(0.1, interval="[0, 1)")
    drop_path_mode: str = knob("uniform", choices=("uniform", "linear"))  # uniform: the paper's code
    official_checkpoint: str = ""  # start from weights released with the paper (same variant)
    # start from weights trained here: a model.pt, an export, or a checkpoint (or run) folder of any
    # stage; another num_classes gets a new head, another image size resampled positional tables
    init_from: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # any other LSAConfig field, e.g. widths


@dataclass
class OptimConfig:
    lr: float = knob(5e-4, interval="(0, inf)")  # at a global batch of lr_batch; scaled linearly to the actual one
    lr_batch: int = knob(512, interval="[0, inf)")  # 0: use lr as is
    min_lr: float = knob(1e-5, interval="[0, inf)")
    warmup_lr: float = knob(1e-6, interval="[0, inf)")
    warmup_epochs: float = knob(5.0, interval="[0, inf)")
    epochs: int = knob(300, interval="[1, inf)")
    weight_decay: float = knob(0.05, interval="[0, inf)")
    betas: list[float] = knob([0.9, 0.999], interval="[0, 1)")
    eps: float = knob(1e-8, interval="(0, inf)")
    grad_clip: float = knob(0.0, interval="[0, inf)")  # max global gradient norm; 0 = off
    grad_accum_steps: int = knob(1, interval="[1, inf)")
    ema_decay: float = knob(0.0, interval="[0, 1)")  # exponential moving average of weights; 0 = off


@dataclass
class EngineConfig:
    backend: str = knob("deepspeed", choices=("deepspeed", "fairscale"), math=True)
    zero_stage: int = knob(1, interval="[0, 3]", math=True)  # fairscale: 0 (DDP, whole AdamW) or 1 (OSS)
    precision: str = knob("bf16", choices=("fp32", "bf16", "fp16"), math=True)
    activation_checkpointing: str = knob("none", choices=("none", "all", "every_k"))
    checkpoint_every_k: int = knob(2, interval="[1, inf)")  # with every_k: blocks 0, k, 2k, ... are checkpointed
    offload_optimizer: bool = knob(False, math=True)  # ZeRO-Offload of optimizer state to CPU memory
    bucket_size: int = knob(50_000_000, interval="[1, inf)")  # elements per ZeRO reduce/all-gather/prefetch bucket
    # ZeRO-1/2 on CUDA: reduce gradients on DeepSpeed's own stream during backward. It synchronises
    # the device after every backward (a host sync per micro-batch), so it is off unless asked for.
    overlap_comm: bool = False
    peak_tflops: float = knob(0.0, interval="[0, inf)")  # per device (MFU); 0: a known GPU's peak, or measured on CPU
    compile: bool = False  # torch.compile the model
    # torch.compile's backend: inductor (generated kernels), aot_eager (the captured forward and
    # backward graphs run eagerly: every capture path at a fraction of the compile time), eager
    compile_backend: str = knob("inductor", choices=("inductor", "aot_eager", "eager"))


@dataclass
class CheckpointConfig:
    every_steps: int = knob(0, interval="[0, inf)")  # also at epoch end; 0 = epoch end only
    keep_last: int = knob(3, interval="[1, inf)")
    export_at_end: bool = True  # write a consolidated fp32 model.pt at the end


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # MLflow tracking URI; "" = $MLFLOW_TRACKING_URI or sqlite:///<project>/mlflow.db
    experiment: str = "lsa_dist"
    run_name: str = ""  # "" = train.name
    # steps between logged metrics (batched, sent by a background thread); each logging step waits
    # for the device once to read the loss and gradient norm, so not every step by default
    log_every: int = knob(10, interval="[1, inf)")
    # MLflow's system metrics (CPU, memory, disk, network, GPU) from each node, as system/<name>
    # (system/node<k>/<name> on multi-node runs), sampled every system_metrics_interval_s seconds
    system_metrics: bool = True
    system_metrics_interval_s: float = knob(10.0, interval="(0, inf)")
    # with tracking on, at every evaluation rank 0 draws the attention of this many fixed validation
    # images (lsa_dist.attention) into <run>/attention/step_<step>.png and MLflow's attention/; 0 = off
    attention_maps: int = knob(4, interval="[0, 32]")
    register_model: str = ""  # register the final model under this name; "" = don't
    # set when the config loads: the keys whose values come from ${oc.env:...}; MLflow's params
    # and config artifact show *** for them (the run folder's config.yaml keeps the values)
    from_env: list[str] = field(default_factory=list)


@dataclass
class SlurmConfig:
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = knob(60 * 24, interval="[1, inf)")
    gpus_per_node: int = knob(0, interval="[0, inf)")
    cpus_per_task: int = knob(8, interval="[1, inf)")
    mem_gb: int = knob(0, interval="[0, inf)")  # per node; 0: mem_per_gpu_gb x GPUs (SLURM's default without GPUs)
    mem_per_gpu_gb: int = knob(64, interval="[1, inf)")
    exclusive: bool = False
    job_name: str = ""
    additional: dict[str, str] = field(default_factory=dict)  # more sbatch directives: {mail-type: END}
    setup: list[str] = field(default_factory=list)  # shell lines before the job starts: module load ...
    # environment of every task, exported before `setup` (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...: docs/slurm.md)
    env: dict[str, str] = field(default_factory=dict)
    array_parallelism: int = knob(0, interval="[0, inf)")  # --sweep: one job array, at most this many at once; 0: all
    # seconds a job needs from its start to its first steps: --time must leave this before the USR2 warning
    startup_s: int = knob(60, interval="[0, inf)")
    # requeues after a USR2 warning (preemption, time limit) before the job gives up, naming why
    max_requeues: int = knob(20, interval="[0, inf)")


@dataclass
class LaunchConfig:
    nproc: int = knob(2, interval="[1, inf)")  # processes for launch/local.py
    # launch/local.py: restarts of all workers from the last checkpoint after a crash
    max_restarts: int = knob(0, interval="[0, inf)")
    nodes: int = knob(1, interval="[1, inf)")
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class TrainSection:
    name: str = ""  # run name; "" = the config file's stem
    output_dir: str = "runs"  # runs go to output_dir/name
    seed: int = knob(0, interval="[0, 9223372036854775807]", math=True)  # torch and NumPy take non-negative seeds
    resume: str = "auto"  # auto (latest good checkpoint of this run) | never | a checkpoint folder
    overwrite: bool = False  # with resume=never (or another run's checkpoint): set this run's checkpoints aside
    accept_changes: list[str] = field(default_factory=list)  # keys (or sections) a resume may change
    eval_every: int = knob(1, interval="[1, inf)")  # epochs
    max_steps: int = knob(0, interval="[0, inf)")  # stop after this many optimizer steps (0 = the full schedule)
    eval_only: bool = False  # evaluate the resumed/initial weights and stop
    log_every: int = knob(10, interval="[1, inf)")  # steps between progress lines on rank 0
    # the real engine and loop on in-memory random data (no dataset read): to measure the system
    # without the loader; an epoch is ImageNet-1k's size, model.num_classes (0: 1000) classes
    synthetic: bool = False


@dataclass
class RunConfig:
    model: ModelSection = knob(ModelSection, math=True)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = knob(OptimConfig, math=True)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    train: TrainSection = field(default_factory=TrainSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.train.name


def is_math_key(key: str) -> bool:
    """Whether a change of the dotted `key` alters the run's mathematics: a field marked so, or
    any key below a marked section (free-form ones such as model.options.mlp_ratio included)."""
    marks = (mark for mark, f, _ in walk_fields(RunConfig()) if f.metadata.get("math"))
    return any(key == mark or key.startswith(mark + ".") for mark in marks)


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
    try:
        layers.append(override_layer(overrides))
        merged = OmegaConf.merge(*layers)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from err
    cfg.tracking.from_env = sorted(set(cfg.tracking.from_env) | env_keys(merged))
    if not cfg.train.name:
        cfg.train.name = path.stem if path is not None else "run"
    from .validation import validate  # it reads this module's schema

    validate(cfg)
    return cfg


def override_layer(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """The `key=value` overrides as one config, each value read as YAML (numbers, lists,
    mappings) the way OmegaConf reads a dotlist, except where the schema's type of the key is
    str and the YAML reading is a mapping or fails: the value is then the text as written
    (`data.urls=pipe:curl -H 'Authorization: Bearer ...' https://...` holds `: `, which YAML
    takes for a mapping). Raises ConfigError naming the key."""
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    layer = OmegaConf.create()
    for override in overrides:
        key, _, text = override.partition("=")
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]), resolve=False)["value"]
        except Exception as err:  # noqa: BLE001 - YAML syntax errors of any kind
            if schema_type(key) is not str:
                raise ConfigError(f"{key}: not a valid YAML value ({str(err).splitlines()[0]})") from err
            value = text
        if isinstance(value, dict) and schema_type(key) is str:
            value = text
        OmegaConf.update(layer, key, value)
    return layer


def env_keys(merged: DictConfig) -> set[str]:
    """The dotted keys of a config (before interpolations are resolved) whose values hold an
    ${oc.env:...} interpolation, or interpolate such a key (${data.urls}): environment variables
    are where credentials are put, and their values are not shown (redact_params)."""
    raw = flatten_tree(OmegaConf.to_container(merged, resolve=False))
    found = {key for key, value in raw.items() if "oc.env:" in str(value)}
    while True:
        more = {k for k, v in raw.items() if k not in found and any("${" + f in str(v) for f in found)}
        if not more:
            return found
        found |= more


def schema_type(key: str) -> Any:
    """The type the schema gives a dotted key (a dict field's value type below it), or None
    where it says none: an unknown key, a free-form option."""
    kind: Any = RunConfig
    for part in key.split("."):
        if dataclasses.is_dataclass(kind):
            hints = typing.get_type_hints(kind)
            if part not in hints:
                return None
            kind = hints[part]
        elif typing.get_origin(kind) is dict:
            kind = typing.get_args(kind)[1]
        else:
            return None
    return kind


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
    """The resolved config as YAML with its secrets, and the values that came from environment
    variables (tracking.from_env), replaced by *** (what MLflow and dry runs show)."""
    from .redact import redact_tree

    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    return OmegaConf.to_yaml(OmegaConf.create(redact_tree(tree, hidden=cfg.tracking.from_env)))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """{'optim.lr': 0.0005, ...}: the config as flat key/value pairs (MLflow params)."""
    return flatten_tree(to_dict(cfg))


def flatten_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A nested dict (a saved config.yaml as read back) as the same dotted key/value pairs that
    `flatten` gives, so the two compare key by key; an empty dict stays a value."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", tree)
    return out
