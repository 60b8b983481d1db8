"""The training loop: train, evaluate, checkpoint, resume, log.

`main(cfg)` is the one entry point of every launcher (launch/local.py, launch/slurm.py,
torchrun); each process finds its rank from the environment. As a command:

    python -m lsa_dist.train --config configs/demo.yaml [key=value ...]

runs one process (or, under torchrun, one of many).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import dist as D
from .checkpoint import CheckpointError, CheckpointManager, TrainState, save_model_file
from .config import ConfigError, RunConfig, load_config, model_overrides, to_yaml
from .data import PAD_LABEL, DatasetError, build_loader, load_dataset_info
from .data.dataset import sha256_file
from .data.transforms import build_mixup
from .engine import build_engine
from .models import count_macs, create_model
from .tracking import RUN_ID_ENV, Tracker, prepare, system_info

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # USR2: SLURM via submitit
PREEMPTED_EXIT = 3  # a worker that checkpointed on request and stopped


@dataclass
class Result:
    """What a finished (or stopped) run reports back to its launcher."""

    status: str  # finished | stopped
    epoch: int
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str = ""
    run_id: str = ""
    run_dir: str = ""
    stop_signal: str = ""  # what stopped it: SIGUSR2 (SLURM preemption / time limit), SIGTERM, ...


class StopRequest:
    """Set by SIGTERM/SIGINT/SIGUSR1/SIGUSR2: checkpoint at the next step boundary and stop."""

    def __init__(self) -> None:
        self.requested = False
        self.signal = ""

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def request(self, why: str) -> None:
        self.requested = True
        self.signal = why


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak dense FLOP/s for MFU: known GPUs by name (bf16/fp16 tensor cores; fp32 at 1/2 for
    TF32), on CPU a matmul rate measured in the run's precision with this process's threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L40", 181), ("A10", 125), ("V100", 125)):
            if key in name:
                return tflops * 1e12 * (0.5 if dtype == torch.float32 else 1.0)
        return 100e12
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(8):
        a @ b
    return 8 * 2 * 1024**3 / (time.perf_counter() - start)


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float, float]:
    """(loss sum, top-1 correct, top-5 correct, count) over the non-padding samples."""
    keep = labels != PAD_LABEL
    logits, labels = logits[keep], labels[keep]
    if labels.numel() == 0:
        return 0.0, 0.0, 0.0, 0.0
    loss = F.cross_entropy(logits, labels, reduction="sum").item()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (top[:, 0] == labels).sum().item()
    top5 = (top == labels[:, None]).any(dim=1).sum().item()
    return loss, top1, top5, float(labels.numel())


@torch.no_grad()
def evaluate(engine: Any, loader: Any, device: torch.device, epoch: int, show: bool) -> dict[str, float]:
    """top-1, top-5 and loss over every rank's share of the validation split (all-reduced)."""
    engine.train(False)
    sums = [0.0, 0.0, 0.0, 0.0]
    for images, labels in _progress(loader.epoch(epoch), len(loader), "eval", show):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = engine.forward(loader.to_model_input(images))
        sums = [a + b for a, b in zip(sums, accuracy_counts(logits.float(), labels))]
    loss, top1, top5, count = D.all_reduce_sum(sums, device)
    engine.train(True)
    return {
        "val/loss": loss / max(count, 1),
        "val/top1": 100 * top1 / max(count, 1),
        "val/top5": 100 * top5 / max(count, 1),
    }


class _EmaEval:
    """The EMA weights behind evaluate()'s engine interface: fp32 and always in eval mode,
    whatever the engine's precision (its inputs are cast back to fp32)."""

    def __init__(self, ema: Any) -> None:
        self.module = ema.module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.float())

    def train(self, mode: bool) -> None:
        self.module.train(False)


def evaluate_with_ema(
    engine: Any, ema: Any, loader: Any, device: torch.device, epoch: int, show: bool
) -> dict[str, float]:
    """evaluate() for the trained weights and, when an EMA is kept, for it too (as val_ema/*)."""
    metrics = evaluate(engine, loader, device, epoch, show)
    if ema is not None:
        ema_metrics = evaluate(_EmaEval(ema), loader, device, epoch, show)
        metrics.update({k.replace("val/", "val_ema/"): v for k, v in ema_metrics.items()})
    return metrics


def _progress(iterable: Any, total: int, desc: str, show: bool) -> Any:
    """A progress bar on rank 0: LSA_PROGRESS=1 forces it (the launcher does when its terminal is
    interactive), 0 disables it, unset lets tqdm decide from the output stream."""
    setting = os.environ.get("LSA_PROGRESS", "")
    if not show or setting == "0":
        return iterable
    from tqdm import tqdm

    disable = False if setting == "1" else None
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, disable=disable)


def _say(env: D.DistEnv, message: str) -> None:
    if env.is_main:
        print(message, flush=True)


class MetricsFile:
    """RUN/metrics.jsonl on rank 0: every logged metric, readable without MLflow."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")


def main(cfg: RunConfig) -> Result:
    """Train (or evaluate) one run; every process of the job calls it."""
    env = D.discover()
    if os.environ.get("OMP_NUM_THREADS"):  # launchers give each of N local workers cores/N threads
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = D.init(env)
    stop = StopRequest()
    stop.install()
    torch.manual_seed(cfg.train.seed)
    run_dir = cfg.run_dir
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    D.barrier()

    info = load_dataset_info(cfg.data.root)
    num_classes = cfg.model.num_classes or info.num_classes
    if num_classes != info.num_classes:
        raise ConfigError(f"model.num_classes: {num_classes} but {cfg.data.root} has {info.num_classes} classes")
    train_loader = build_loader(cfg.data, cfg.data.train_split, env.rank, env.world_size, True, cfg.train.seed, info)
    val_loader = build_loader(cfg.data, cfg.data.val_split, env.rank, env.world_size, False, cfg.train.seed, info)
    steps_per_epoch = len(train_loader)

    model = create_model(cfg.model.name, cfg.model.official_checkpoint or None, **model_overrides(cfg, num_classes))
    macs = count_macs(model)
    engine = build_engine(cfg, model, steps_per_epoch, env.world_size, device)
    manager = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last, env.rank)
    state = TrainState(world_size=env.world_size, backend=cfg.engine.backend, zero_stage=cfg.engine.zero_stage)
    ema = _build_ema(cfg, engine)

    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = manager.latest()
    elif cfg.train.resume != "never":
        resume_from = Path(cfg.train.resume)
    if resume_from is not None:
        state, client_state = manager.load(engine, resume_from)
        if ema is not None and "ema" in client_state:
            ema.module.load_state_dict(client_state["ema"])
        _say(env, f"resumed from {resume_from} (epoch {state.epoch}, batch {state.batch}, step {state.step})")
    manager.clean_staging()

    metrics_file = MetricsFile(run_dir / "metrics.jsonl", env.is_main)
    tracker = Tracker(cfg, "", run_dir / "mlflow_pending.jsonl")
    if env.is_main:
        run_id = os.environ.get(RUN_ID_ENV) or prepare(cfg, state.run_id)
        state.run_id = run_id
        tracker = Tracker(cfg, run_id, run_dir / "mlflow_pending.jsonl")
        tracker.log_config(cfg)
        tags = system_info(env.world_size, env.num_nodes, sha256_file(Path(cfg.data.root) / "dataset.json"))
        tracker.set_tags({f"sys.{k}": v for k, v in tags.items()})
        tracker.log_artifact(run_dir / "config.yaml")
    mixup = build_mixup(cfg.data.augment, num_classes) if cfg.data.augment.recipe == "imagenet" else None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.engine.precision]
    peak_flops = cfg.engine.peak_tflops * 1e12 if cfg.engine.peak_tflops else measured_peak_flops(device, dtype)
    config_yaml = to_yaml(cfg)

    def save() -> str:
        extra = {"ema": ema.module.state_dict()} if ema is not None else {}
        return str(manager.save(engine, state, config_yaml, extra))

    if cfg.train.eval_only:
        metrics = evaluate_with_ema(engine, ema, val_loader, device, state.epoch, env.is_main)
        _say(env, _metrics_line(metrics))
        tracker.log_metrics(metrics, state.step)
        tracker.finish()
        return Result("finished", state.epoch, state.step, metrics, str(resume_from or ""), state.run_id, str(run_dir))

    total_steps = cfg.optim.epochs * steps_per_epoch
    max_steps = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    accum = cfg.optim.grad_accum_steps
    micro = cfg.data.batch_size // accum
    _say(
        env,
        f"run {cfg.train.name}: {cfg.model.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
        f"{macs / 1e9:.2f} GMAC/image), {env.world_size} ranks x batch {cfg.data.batch_size}, "
        f"{steps_per_epoch} steps/epoch, {cfg.engine.backend} ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision}, "
        f"MLflow run {state.run_id or 'off'}; output in {run_dir}",
    )
    last_metrics: dict[str, float] = {}
    status = "finished"
    window_images, window_start = 0, time.perf_counter()
    engine.train(True)
    while state.epoch < cfg.optim.epochs and state.step < max_steps:
        epoch_loss, epoch_count = 0.0, 0
        batches = train_loader.epoch(state.epoch, state.batch)
        for images, labels in _progress(batches, steps_per_epoch - state.batch, f"epoch {state.epoch}", env.is_main):
            images = train_loader.to_model_input(images.to(device, non_blocking=True))
            labels = labels.to(device, non_blocking=True)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            info_step = None
            for chunk in range(accum):
                part = slice(chunk * micro, (chunk + 1) * micro)
                logits = engine.forward(images[part])
                if targets.dim() == 2:
                    loss = torch.sum(-targets[part] * F.log_softmax(logits, dim=-1), dim=-1).mean()
                else:
                    loss = F.cross_entropy(logits, targets[part], label_smoothing=cfg.data.augment.label_smoothing)
                engine.backward(loss)
                info_step = engine.step() or info_step
                epoch_loss += loss.item() * micro
                epoch_count += micro
            if ema is not None:
                ema.update(engine.module, step=state.step)
            state.batch += 1
            state.step += 1
            window_images += images.shape[0] * env.world_size
            if state.step % cfg.tracking.log_every == 0 or state.step == max_steps:
                elapsed = time.perf_counter() - window_start
                images_per_s = window_images / elapsed
                step_metrics = {
                    "train/loss": loss.item(),
                    "train/lr": info_step.lr if info_step else engine.lr(),
                    "train/grad_norm": info_step.grad_norm if info_step else float("nan"),
                    "train/images_per_s": images_per_s,
                    "train/mfu": images_per_s * 6 * macs / (peak_flops * env.world_size),
                }
                tracker.log_metrics(step_metrics, state.step)
                metrics_file.write(step_metrics, state.step)
                window_images, window_start = 0, time.perf_counter()
            if cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0:
                save()
            if D.any_rank(stop.requested, device):
                stop.signal = stop.signal or "by another rank"
                _say(env, f"stop requested ({stop.signal}): checkpointing at step {state.step}")
                save()
                status = "stopped"
                break
            if state.step >= max_steps:
                break
        if status == "stopped":
            break
        if state.batch >= steps_per_epoch:
            state.epoch, state.batch = state.epoch + 1, 0
            epoch_metrics = {"train/epoch_loss": epoch_loss / max(epoch_count, 1), "epoch": state.epoch}
            if state.epoch % cfg.train.eval_every == 0 or state.epoch == cfg.optim.epochs:
                epoch_metrics.update(evaluate_with_ema(engine, ema, val_loader, device, state.epoch, env.is_main))
                state.best_top1 = max(state.best_top1, epoch_metrics["val/top1"])
                epoch_metrics["val/top1_best"] = state.best_top1
            last_metrics = epoch_metrics
            tracker.log_metrics(epoch_metrics, state.step)
            metrics_file.write(epoch_metrics, state.step)
            _say(env, f"epoch {state.epoch}/{cfg.optim.epochs} step {state.step}  {_metrics_line(epoch_metrics)}")
            save()
        elif state.step >= max_steps:
            save()

    checkpoint = str(manager.latest() or "")
    if status == "finished":
        if "val/top1" not in last_metrics:
            last_metrics.update(evaluate_with_ema(engine, ema, val_loader, device, state.epoch, env.is_main))
        full = engine.full_state_dict()
        if env.is_main and cfg.checkpoint.export_at_end and full is not None:
            export = run_dir / "model.pt"
            save_model_file(export, dict(model.cfg.__dict__), full)
            tracker.log_artifact(export)
            if ema is not None:
                ema_state = {k: v.detach().float().cpu() for k, v in ema.module.state_dict().items()}
                save_model_file(run_dir / "model_ema.pt", dict(model.cfg.__dict__), ema_state)
                tracker.log_artifact(run_dir / "model_ema.pt")
            _final = run_dir / "final_metrics.txt"
            _final.write_text("".join(f"{k} {v}\n" for k, v in sorted(last_metrics.items())))
            tracker.log_artifact(_final)
            if cfg.tracking.register_model:
                tracker.log_model(model.cpu().float(), "model", cfg.tracking.register_model)
        tracker.log_metrics({k: v for k, v in last_metrics.items() if k.startswith(("val/", "val_ema/"))}, state.step)
        _say(env, f"done: {_metrics_line(last_metrics)}; checkpoint {checkpoint}; weights {run_dir / 'model.pt'}")
    tracker.finish("FINISHED" if status == "finished" else "KILLED")
    return Result(status, state.epoch, state.step, last_metrics, checkpoint, state.run_id, str(run_dir), stop.signal)


def _metrics_line(metrics: dict[str, float]) -> str:
    parts = []
    for key in ("train/epoch_loss", "val/loss", "val/top1", "val/top5", "val_ema/top1"):
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key} {value:.2f}%" if key.endswith(("top1", "top5")) else f"{key} {value:.4f}")
    return "  ".join(parts)


def _build_ema(cfg: RunConfig, engine: Any) -> Any:
    if not cfg.optim.ema_decay:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(engine.module, decay=cfg.optim.ema_decay)
    ema.module.float()
    return ema


def run_worker(cfg: RunConfig) -> int:
    """main(cfg) with the exit protocol launchers rely on: 0 done, 3 stopped after a checkpoint,
    2 bad input (one line on stderr), 1 crash (traceback)."""
    try:
        result = main(cfg)
    except (ConfigError, DatasetError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    else:
        code = 0 if result.status == "finished" else PREEMPTED_EXIT
    D.shutdown(code)
    return code


def parse_args(argv: list[str] | None = None) -> tuple[Path | None, list[str]]:
    parser = argparse.ArgumentParser(description="Train (or evaluate) an LSA model: one process of the job.")
    parser.add_argument("--config", type=Path, default=None, help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def cli(argv: list[str] | None = None) -> int:
    config, overrides = parse_args(argv)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_worker(cfg)


if __name__ == "__main__":
    sys.exit(cli())


__all__ = ["Result", "main", "run_worker"]
