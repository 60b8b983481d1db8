"""The parts a Trainer is assembled from, built from the config: the data (loaders and their
sizes), the model (engine, EMA, mixup, cost), the MLflow tracker, and the run's end products
(model files, final metrics, a registered model)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import TrainState
from .config import ConfigError, RunConfig, model_overrides, redacted_yaml, to_yaml
from .data import build_loader, dataset_identity, load_dataset_info
from .data.transforms import build_mixup
from .dist import DistEnv
from .engine import Engine, build_engine
from .fs import OWNER_ONLY, atomic_write_text
from .models import LSA, LSAConfig, count_parameters, create_model, macs_by_size
from .sinks import Console, MetricsFile, Sinks
from .tracking import RECORD_NAME, RUN_ID_ENV, Tracker, run_id_for, system_info
from .weights import init_model_from, save_model_file


@dataclass
class Data:
    """The run's loaders and what the schedule and resume need of them."""

    train_loader: Any
    val_loader: Any
    num_classes: int
    train_samples: int  # of the training split
    workers: int  # loader workers per rank (a rank's sample span is cut per worker)
    identity: str  # the dataset.json checksum ("synthetic" for train.synthetic): what a resume compares

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


def build_data(cfg: RunConfig, env: DistEnv) -> Data:
    """The training and validation loaders of this rank (train.synthetic: in-memory random
    batches with ImageNet-1k's epoch, no dataset read)."""
    if cfg.train.synthetic:
        from .data.synthetic import IMAGENET_TRAIN, SyntheticLoader

        num_classes = cfg.model.num_classes or 1000
        train, val = (
            SyntheticLoader(cfg.data, num_classes, env.rank, env.world_size, train, cfg.train.seed)
            for train in (True, False)
        )
        return Data(train, val, num_classes, IMAGENET_TRAIN, 1, "synthetic")
    info = load_dataset_info(cfg.data.root)
    num_classes = cfg.model.num_classes or info.num_classes
    if num_classes != info.num_classes:
        raise ConfigError(f"model.num_classes: {num_classes} but {cfg.data.root} has {info.num_classes} classes")
    train, val = (
        build_loader(cfg.data, split, env.rank, env.world_size, is_train, cfg.train.seed, info)
        for split, is_train in ((cfg.data.train_split, True), (cfg.data.val_split, False))
    )
    samples, workers = info.split(cfg.data.train_split).num_samples, max(1, cfg.data.num_workers)
    return Data(train, val, num_classes, samples, workers, dataset_identity(cfg.data.root))


@dataclass
class Model:
    """The engine around the plain model, its EMA (timm's, fp32), mixup, and the model's cost."""

    engine: Engine
    ema: Any
    mixup: Any
    config: dict[str, Any]  # LSAConfig's fields: what model files record
    macs: dict[int, tuple[int, int]]  # image size -> (architecture's, executed) multiply-accumulates per image
    num_params: int

    def ema_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the engine's own state."""
        return {"ema": self.ema.module.state_dict()} if self.ema is not None else {}


def build_model(cfg: RunConfig, data: Data, env: DistEnv, device: torch.device, say: Callable[[str], None]) -> Model:
    """The model (from model.init_from's weights if given), wrapped by the configured engine."""
    model = create_model(
        cfg.model.name, cfg.model.official_checkpoint or None, **model_overrides(cfg, data.num_classes)
    )
    if cfg.model.init_from:
        notes = init_model_from(model, cfg.model.init_from)
        say(f"initialised from {cfg.model.init_from}{''.join(f'; {n}' for n in notes)}")
    config = dict(model.cfg.__dict__)
    sizes = {cfg.data.train_size(epoch) for epoch in range(cfg.optim.epochs)}
    macs, num_params = macs_by_size(model, sizes), count_parameters(model)  # before ZeRO-3 partitions it
    ema = None
    if cfg.optim.ema_decay:  # its own plain fp32 copy, made before the engine patches and casts the model
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.optim.ema_decay, device=device)
    engine = build_engine(cfg, model, data.steps_per_epoch, env.world_size, device)
    mixup = build_mixup(cfg.data.augment, data.num_classes) if cfg.data.augment.recipe == "imagenet" else None
    return Model(engine, ema, mixup, config, macs, num_params)


def write_run_configs(cfg: RunConfig, is_main: bool) -> None:
    """RUN/config.yaml (owner-only: it may hold credentials) and the redacted copy MLflow gets."""
    if is_main:
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg), OWNER_ONLY)
        shown = run_dir / "mlflow" / "config.yaml"
        shown.parent.mkdir(exist_ok=True)
        atomic_write_text(shown, redacted_yaml(cfg))


def build_sinks(cfg: RunConfig, env: DistEnv, state: TrainState, fallback: str, console: Console) -> Sinks:
    """metrics.jsonl (rank 0), the MLflow tracker and the console."""
    tracker = build_tracker(cfg, env, state, fallback)
    return Sinks(MetricsFile(cfg.run_dir / RECORD_NAME, env.is_main), tracker, console)


def build_tracker(cfg: RunConfig, env: DistEnv, state: TrainState, fallback: str) -> Tracker:
    """The MLflow run on rank 0 (the launcher's, or prepared here), with params, tags and config;
    records the run id in `state` (a PENDING run is recorded once it exists)."""
    record = cfg.run_dir / RECORD_NAME  # metrics.jsonl: what MLflow catches up from after an outage
    if not env.is_main:
        tracker = Tracker(cfg, "", record)
        if env.local_rank == 0:  # another node's first process: its system metrics, into the launch's run
            tracker.monitor_system(os.environ.get(RUN_ID_ENV, ""), env.node_rank, env.num_nodes)
        return tracker
    previous = state.run_id
    tracker = Tracker(cfg, run_id_for(cfg, previous), record, previous=previous)
    state.run_id = tracker.run_id or previous
    if tracker.enabled:
        tracker.log_config(cfg)
        tags = system_info(env.world_size, env.num_nodes, state.dataset_sha256)
        tracker.set_tags({f"sys.{k}": v for k, v in tags.items()})
        tracker.log_artifact(cfg.run_dir / "mlflow" / "config.yaml")
        if fallback:
            tracker.set_tags({"resume.fallback": fallback})
        tracker.monitor_system(tracker.run_id, env.node_rank, env.num_nodes)
    return tracker


def export_run(cfg: RunConfig, model: Model, metrics: dict[str, float], tracker: Tracker, is_main: bool) -> None:
    """model.pt (fp32), model_ema.pt, final_metrics.txt and, if asked, a registered model. A
    collective under ZeRO-3 (the weights are gathered)."""
    full = model.engine.full_state_dict()
    if not (is_main and cfg.checkpoint.export_at_end and full is not None):
        return
    run_dir = cfg.run_dir
    files = {"model.pt": full}
    if model.ema is not None:
        files["model_ema.pt"] = {k: v.detach().float().cpu() for k, v in model.ema.module.state_dict().items()}
    for name, state_dict in files.items():
        save_model_file(run_dir / name, model.config, state_dict)
        tracker.log_artifact(run_dir / name)
    final = run_dir / "final_metrics.txt"
    atomic_write_text(final, "".join(f"{k} {v}\n" for k, v in sorted(metrics.items())))
    tracker.log_artifact(final)
    if cfg.tracking.register_model:
        network = LSA(LSAConfig(**model.config))
        network.load_state_dict(full)
        tracker.log_model(network, "model", cfg.tracking.register_model)


__all__ = [
    "Data",
    "Model",
    "build_data",
    "build_model",
    "build_sinks",
    "build_tracker",
    "export_run",
    "write_run_configs",
]
