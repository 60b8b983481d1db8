"""The Trainer: one process's part of a run, from the config to the exported model.

The constructor builds everything from the config (process group, data, model, engine,
checkpoints, tracking) and resumes; `fit()` is the loop, `train_step()` one optimizer step,
`evaluate()` the validation metrics, `checkpoint()` the save policy and `log()` the one way
metrics leave the loop (metrics.jsonl, MLflow and rank 0's console).
"""

from __future__ import annotations

import math
import os
import resource
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import dist as D
from . import rng
from .checkpoint import (
    CheckpointError,
    CheckpointManager,
    TrainState,
    check_compatible,
    check_lineage,
    checkpoint_to_resume,
    init_model_from,
    lineage_conflict,
    save_model_file,
    set_aside,
)
from .config import ConfigError, RunConfig, flatten, model_overrides, redacted_yaml, to_yaml
from .data import Layout, build_loader, dataset_identity, load_dataset_info
from .data.plan import batches_per_rank
from .data.transforms import build_mixup
from .engine import PRECISIONS, StepInfo, build_engine, lr_lambda
from .fs import OWNER_ONLY, atomic_write_text
from .lock import OWNER_ENV, RunInUseError, RunLock, hold_as_worker, slurm_job_id
from .metrics import evaluate, mfu, peak_flops
from .models import LSA, LSAConfig, count_macs, count_parameters, create_model
from .sinks import Console, MetricsFile, Sinks, metrics_line
from .tracking import RECORD_NAME, Tracker, run_id_for, system_info

# USR2: SLURM's warning (submitit); HUP: the terminal or session went away
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


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
    """Set by SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2: checkpoint at the next step boundary (an
    evaluation under way is cut short) and stop."""

    def __init__(self) -> None:
        self.requested = False
        self.signal = ""

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name


class StopVote:
    """Whether any rank was asked to stop, agreed on without stalling the step loop: each poll
    sends this rank's flag in a background all-reduce on a CPU (gloo) group and reads the one
    sent at the previous poll, so every rank sees a stop at the same step, one step late, and no
    poll waits for the device. `poll(..., at_once=True)` settles the vote before returning."""

    def __init__(self) -> None:
        alone = not (dist.is_initialized() and dist.get_world_size() > 1)
        self.group = None if alone else dist.new_group(backend="gloo")
        self.pending: tuple[Any, torch.Tensor] | None = None

    def poll(self, flag: bool, at_once: bool = False) -> bool:
        if self.group is None:
            return flag
        seen = self._collect()
        vote = torch.tensor([1 if flag else 0], dtype=torch.int32)
        work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.pending = (work, vote)
        return (self._collect() or seen) if at_once else seen

    def _collect(self) -> bool:
        if self.pending is None:
            return False
        work, vote = self.pending
        self.pending = None
        work.wait()
        return bool(vote.numpy()[0])  # a CPU tensor: no device synchronisation


@dataclass
class StepOutput:
    """One optimizer step: its mean loss on this rank (a tensor on the device: reading it
    waits for the step) and what the engine reported at the step's end."""

    loss: torch.Tensor
    info: StepInfo | None


class Window:
    """What happened since a window (of logging) began: steps, images, data wait, loss sum."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps, self.images, self.data_wait = 0, 0, 0.0
        self.loss_sum: torch.Tensor | float = 0.0

    def add(self, output: StepOutput, images: int) -> None:
        self.steps += 1
        self.images += images
        self.loss_sum = self.loss_sum + output.loss

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Trainer:
    """Training (or evaluation) of one run on this process's rank; every rank builds one."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.env = D.discover()
        self.device = D.init(self.env)
        self.lock = self._own_run()
        self.fallback = ""  # why the resume used an older checkpoint than the latest, if it did
        self.stop = StopRequest()
        self.stop.install()
        self.stop_vote = StopVote()
        rng.seed_all(cfg.train.seed)  # the initial weights: the same on every rank
        self.run_dir = cfg.run_dir
        self.config_yaml = to_yaml(cfg)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", self.config_yaml, OWNER_ONLY)  # may hold credentials
            shown = self.run_dir / "mlflow" / "config.yaml"  # what MLflow gets: secrets redacted
            shown.parent.mkdir(exist_ok=True)
            atomic_write_text(shown, redacted_yaml(cfg))
        D.barrier()
        self._build_data()
        self.console = Console(self.env.is_main, cfg.optim.epochs, self.max_steps)
        self._build_model()
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last, self.env.rank)
        self.state = TrainState(
            world_size=self.env.world_size,
            backend=cfg.engine.backend,
            zero_stage=cfg.engine.zero_stage,
            data_workers=self.data_workers,
            batch_size=cfg.data.batch_size,
        )
        self.resumed_from = self._resume()
        self.epoch_length = self._epoch_length()  # batches of the epoch in progress
        self.max_steps = self._max_steps()
        self.console.total_steps = self.max_steps
        self.sinks = Sinks(MetricsFile(self.run_dir / "metrics.jsonl", self.env.is_main), self._tracker(), self.console)
        self.mixup = build_mixup(cfg.data.augment, self.num_classes) if cfg.data.augment.recipe == "imagenet" else None
        dtype = PRECISIONS[cfg.engine.precision]
        self.peak_flops = cfg.engine.peak_tflops * 1e12 or peak_flops(self.device, dtype)
        self.last_metrics: dict[str, float] = {}
        self.saved_step = -1
        self.windows = {"tracking": Window(), "progress": Window()}  # of logging: MLflow's and the console's
        self.epoch_loss = Window()
        self.first_step_logged = False
        self.eval_cut = False  # an evaluation was cut short by a stop request

    # -- building -----------------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg = self.cfg
        if cfg.train.synthetic:
            self._build_synthetic_data()
        else:
            self._build_dataset_loaders()
        self.steps_per_epoch = len(self.train_loader)
        total = cfg.optim.epochs * self.steps_per_epoch
        self.max_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total

    def _build_dataset_loaders(self) -> None:
        cfg, env = self.cfg, self.env
        info = load_dataset_info(cfg.data.root)
        self.train_samples = info.split(cfg.data.train_split).num_samples
        self.data_workers = max(1, cfg.data.num_workers)  # a rank's sample span is cut per worker
        self.num_classes = cfg.model.num_classes or info.num_classes
        if self.num_classes != info.num_classes:
            raise ConfigError(
                f"model.num_classes: {self.num_classes} but {cfg.data.root} has {info.num_classes} classes"
            )
        self.train_loader = build_loader(
            cfg.data, cfg.data.train_split, env.rank, env.world_size, True, cfg.train.seed, info
        )
        self.val_loader = build_loader(
            cfg.data, cfg.data.val_split, env.rank, env.world_size, False, cfg.train.seed, info
        )

    def _build_synthetic_data(self) -> None:
        """train.synthetic: in-memory random batches (lsa_dist/data/synthetic.py), no dataset read."""
        from .data.synthetic import IMAGENET_TRAIN, SyntheticLoader

        cfg, env = self.cfg, self.env
        self.num_classes = cfg.model.num_classes or 1000
        self.train_samples, self.data_workers = IMAGENET_TRAIN, 1
        self.train_loader, self.val_loader = (
            SyntheticLoader(cfg.data, self.num_classes, env.rank, env.world_size, train, cfg.train.seed)
            for train in (True, False)
        )

    def _build_model(self) -> None:
        cfg = self.cfg
        overrides = model_overrides(cfg, self.num_classes)
        model = create_model(cfg.model.name, cfg.model.official_checkpoint or None, **overrides)
        if cfg.model.init_from:
            notes = init_model_from(model, cfg.model.init_from)
            self.console.say(f"initialised from {cfg.model.init_from}{''.join(f'; {n}' for n in notes)}")
        self.model_config = dict(model.cfg.__dict__)
        self.macs, self.num_params = count_macs(model), count_parameters(model)  # before ZeRO-3 partitions it
        self.engine = build_engine(cfg, model, self.steps_per_epoch, self.env.world_size, self.device)
        self.ema = None
        if cfg.optim.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.engine.module, decay=cfg.optim.ema_decay)
            self.ema.module.float()

    def _resume(self) -> Path | None:
        """Restore the checkpoint that train.resume names at launch; after a restart (the local
        launcher's --max-restarts, a SLURM requeue) the run's own latest checkpoint instead,
        where there is one: train.resume=never or a PATH acts once, not on every requeue."""
        if D.restart_count() > 0:
            restarted = self.checkpoints.latest()
        else:
            self._start_lineage()
            restarted = None
        folder = restarted or checkpoint_to_resume(self.run_dir, self.cfg.train.resume)
        dataset_sha = "synthetic" if self.cfg.train.synthetic else dataset_identity(self.cfg.data.root)
        if folder is not None:
            accepted = check_compatible(folder, flatten(self.cfg), dataset_sha, self.cfg.train.accept_changes)
            configured_lrs = self.engine.base_lrs()
            own_latest = restarted is not None or self.cfg.train.resume == "auto"
            folder, client_state = self._load_good(folder, fall_back=own_latest)
            s = self.state
            self.console.say(f"resumed from {folder} (epoch {s.epoch}, batch {s.batch}, step {s.step})")
            new_steps = self._adopt_layout()
            if new_steps or any(key.startswith("optim.") for key in accepted):
                self.engine.rebase_lr(configured_lrs)
            if s.lr_origin != [0, 0.0]:  # an epoch's steps changed once (world or batch size): the schedule is placed
                origin = (int(s.lr_origin[0]), float(s.lr_origin[1]))
                factor = lr_lambda(self.cfg, self.steps_per_epoch, self.env.world_size, origin)
                self.engine.rebase_lr(self.engine.base_lrs(), factor)
            if self.ema is not None and "ema" in client_state:
                self.ema.module.load_state_dict(client_state["ema"])
        self.state.dataset_sha256 = dataset_sha
        self.checkpoints.clean_staging()
        return folder

    def _adopt_layout(self) -> bool:
        """A checkpoint written by another number of ranks, loader workers or data.batch_size
        (an accepted change): the epoch in progress goes on with the samples its earlier layouts
        left, re-split over this run's ranks, and the lr schedule is placed where the run stands
        in epochs. Returns whether an epoch now has another number of steps."""
        s, world, workers, batch = self.state, self.env.world_size, self.data_workers, self.cfg.data.batch_size
        saved_world, saved_workers, saved_batch = s.world_size, s.data_workers or workers, s.batch_size or batch
        if (saved_world, saved_workers, saved_batch) == (world, workers, batch):
            return False
        done = sum(layout[2] for layout in s.layouts)
        if s.batch > done:
            s.layouts.append([saved_world, saved_workers, s.batch - done, saved_batch])
        new_steps = (saved_world, saved_batch) != (world, batch)
        if new_steps:
            saved_steps = batches_per_rank(self.train_samples, saved_world, saved_batch, True)
            origin_step, origin_epochs = s.lr_origin
            s.lr_origin = [s.step, origin_epochs + (s.step - origin_step) / saved_steps]
        s.world_size, s.data_workers, s.batch_size = world, workers, batch
        left = self.train_loader.batches_left(s.epoch, self._layouts())
        self.console.say(
            f"resumed {saved_world} ranks x {saved_workers} loader workers x batch {saved_batch} on {world} x "
            f"{workers} x {batch}: epoch {s.epoch} goes on with its unread samples, {left} batches per rank"
        )
        return new_steps

    def _layouts(self) -> list[Layout]:
        return [Layout(*layout) for layout in self.state.layouts]

    def _epoch_length(self) -> int:
        """Batches of the epoch in progress: read one way, len(train_loader); after a resume on
        another layout, those read before it plus what the rest of the epoch gives."""
        s = self.state
        if not s.layouts:
            return self.steps_per_epoch
        return sum(layout[2] for layout in s.layouts) + self.train_loader.batches_left(s.epoch, self._layouts())

    def _max_steps(self) -> int:
        """The step training ends at: the schedule's end (or train.max_steps, if sooner)."""
        s, epochs = self.state, self.cfg.optim.epochs
        total = s.step + (self.epoch_length - s.batch) + (epochs - s.epoch - 1) * self.steps_per_epoch
        total = total if s.epoch < epochs else s.step
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    def _own_run(self) -> RunLock | None:
        """Rank 0 takes the run folder's lock unless its launcher holds it for the workers; a
        refusal (another launch or a queued SLURM job owns the run) ends every rank with exit 2."""
        lock, failure = None, None
        if os.environ.get(OWNER_ENV):
            hold_as_worker(self.cfg.run_dir)
        elif self.env.is_main:
            job = slurm_job_id()
            what = "a SLURM job's rank 0" if job else "python -m lsa_dist.train"
            try:
                lock = RunLock(self.cfg.run_dir, what).acquire(own_job=job)
            except RunInUseError as err:
                failure = err
        if D.any_rank(failure is not None, self.device):
            raise failure or RunInUseError(f"rank 0 could not take {self.cfg.run_dir}'s lock; see rank 0's output")
        return lock

    def _load_good(self, folder: Path, fall_back: bool) -> tuple[Path, dict[str, Any]]:
        """Load `folder`; if it fails on any rank and it is the run's own latest (not a path the
        user named), the previous complete checkpoint instead, and so on, with a warning (and an
        MLflow tag, `resume.fallback`). Every rank ends on the same checkpoint."""
        older = [c for c in self.checkpoints.complete() if c.name < folder.name] if fall_back else []
        candidates = [folder, *reversed(older)]
        error: CheckpointError | None = None
        for i, candidate in enumerate(candidates):
            if i:
                reason = str(error) if error else "it failed on another rank"
                self.console.say(f"warning: {reason}; falling back to the previous checkpoint {candidate}")
            error = None
            try:
                self.state, client_state = self.checkpoints.load(self.engine, candidate)
            except CheckpointError as err:
                error = err
            if not D.any_rank(error is not None, self.device):
                if i:  # the unloadable ones go aside: a new save at their steps must not be skipped
                    self.fallback = f"{folder.name} could not be loaded; resumed from {candidate.name}"
                    if self.env.is_main:
                        set_aside(self.run_dir, candidates[:i])
                    D.barrier()
                return candidate, client_state
        raise error or CheckpointError(f"cannot load checkpoint {candidates[-1]} on another rank; see its log")

    def _start_lineage(self) -> None:
        """At launch: refuse to mix a new lineage into the run's checkpoints (train.resume=never
        on a folder that has some, unless train.overwrite), and set aside what a rollback or an
        overwrite leaves behind, so that no new save is skipped, pruned or adopted because of it."""
        resume = self.cfg.train.resume
        check_lineage(self.run_dir, resume, self.cfg.train.overwrite)  # the same answer on every rank
        conflict, _ = lineage_conflict(self.run_dir, resume)
        if conflict and self.env.is_main:
            moved = set_aside(self.run_dir, conflict)
            self.console.say(f"train.resume={resume}: {len(conflict)} earlier checkpoint(s) moved to {moved}")
        D.barrier()

    def _tracker(self) -> Tracker:
        """The MLflow run on rank 0 (the launcher's, or prepared here), with params, tags, config."""
        cfg = self.cfg
        record = self.run_dir / RECORD_NAME
        if not self.env.is_main:
            return Tracker(cfg, "", record)
        previous = self.state.run_id
        tracker = Tracker(cfg, run_id_for(cfg, previous), record, previous=previous)
        self.state.run_id = tracker.run_id or previous  # a PENDING run is recorded once it exists
        if tracker.enabled:
            tracker.log_config(cfg)
            tags = system_info(self.env.world_size, self.env.num_nodes, self.state.dataset_sha256)
            tracker.set_tags({f"sys.{k}": v for k, v in tags.items()})
            tracker.log_artifact(self.run_dir / "mlflow" / "config.yaml")
            if self.fallback:
                tracker.set_tags({"resume.fallback": self.fallback})
        return tracker

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> Result:
        """Train to the end of the schedule (or train.max_steps), or until a stop is requested."""
        self._announce()
        self.engine.train(True)
        for window in self.windows.values():
            window.reset()
        if self.state.eval_pending:  # stopped during an epoch-end evaluation: it comes first
            self._epoch_metrics({"epoch": self.state.epoch})
        while self.state.epoch < self.cfg.optim.epochs and self.state.step < self.max_steps:
            self.epoch_loss.reset()
            for images, labels in self._batches():
                if self._stopping():
                    return self._stop()
                output = self.train_step(images, labels)
                self._count(output, images.shape[0] * self.env.world_size)
                self.checkpoint("every_steps")
                if self.state.step >= self.max_steps:
                    break
            if self.state.batch >= self.epoch_length:
                self._end_epoch()
            elif self.state.step >= self.max_steps:
                self.checkpoint("max_steps")
            if self._stopping(at_once=True):
                return self._stop()
        return self._end("finished")

    def _stopping(self, at_once: bool = False) -> bool:
        """Whether any rank was asked to stop (a collective: every rank asks at the same points).
        Between steps the vote runs in the background and is read a step later (`StopVote`);
        `at_once` waits for it (epoch ends, evaluation)."""
        if self.stop_vote.poll(self.stop.requested, at_once):
            self.stop.signal = self.stop.signal or "by another rank"
            return True
        return False

    def _stop(self) -> Result:
        self.console.say(f"stop requested ({self.stop.signal}): checkpointing at step {self.state.step}")
        self.checkpoint("stop")
        return self._end("stopped")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """One optimizer step on a uint8 batch: model input, mixup, micro-batches, backward, step.
        Its randomness (erasing, mixup/cutmix, drop path) is a function of (seed, rank, step)."""
        rng.seed_step(self.cfg.train.seed, self.env.rank, self.state.step)
        inputs = self.train_loader.to_model_input(images.to(self.device, non_blocking=True))
        targets = labels.to(self.device, non_blocking=True)
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        accum = self.cfg.optim.grad_accum_steps
        micro = inputs.shape[0] // accum
        loss_sum, info = torch.zeros((), device=self.device), None
        for chunk in range(accum):
            part = slice(chunk * micro, (chunk + 1) * micro)
            loss = self.loss(self.engine.forward(inputs[part]), targets[part])
            self.engine.backward(loss)
            info = self.engine.step() or info
            loss_sum += loss.detach()
        if self.ema is not None:
            self.ema.update(self.engine.module, step=self.state.step)
        return StepOutput(loss_sum / accum, info)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against hard labels (with label smoothing) or mixup's soft targets."""
        if targets.dim() == 2:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.data.augment.label_smoothing)

    def evaluate(self) -> dict[str, float]:
        """val/* of the trained weights and, when an EMA is kept, val_ema/* of it (every rank)."""
        self.engine.train(False)
        metrics = self._evaluate(self.engine.forward)
        self.engine.train(True)
        if self.ema is not None:
            self.ema.module.eval()
            ema = self._evaluate(lambda images: self.ema.module(images.float()))
            metrics.update({key.replace("val/", "val_ema/"): value for key, value in ema.items()})
        return metrics

    def _evaluate(self, forward: Any) -> dict[str, float]:
        loader = self.val_loader
        batches = self.console.progress(loader.epoch(self.state.epoch), len(loader), "eval")
        return evaluate(forward, self._unless_stopped(batches), loader.to_model_input, self.device)

    def _unless_stopped(self, batches: Any) -> Iterator[Any]:
        """The evaluation's batches until a stop is requested (on any rank): an ImageNet
        evaluation outlasts SLURM's warning, so a stop does not wait for it."""
        for batch in batches:
            if self._stopping(at_once=True):
                self.eval_cut = True
                return
            yield batch

    def checkpoint(self, event: str) -> None:
        """The save policy: every checkpoint.every_steps steps ("every_steps"), and always at an
        epoch end, at train.max_steps and on a stop request; never twice for one step."""
        every = self.cfg.checkpoint.every_steps
        if event == "every_steps" and not (every and self.state.step % every == 0):
            return
        if self.saved_step == self.state.step:
            return
        extra = {"ema": self.ema.module.state_dict()} if self.ema is not None else {}
        self.state.run_id = self.sinks.tracker.run_id or self.state.run_id  # opened late if the server was down
        self.checkpoints.save(self.engine, self.state, self.config_yaml, extra)
        self.saved_step = self.state.step

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Every sink: metrics.jsonl and MLflow on rank 0, and the console's line or bar."""
        self.sinks.log(metrics, step)

    # -- inside the loop ----------------------------------------------------------------------
    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the epoch's batches, timing how long the loop waits for each."""
        s = self.state
        start = s.batch - sum(layout[2] for layout in s.layouts)  # in this layout's share of the epoch
        batches = self.console.progress(
            self.train_loader.epoch(s.epoch, start, layouts=self._layouts()),
            self.epoch_length - s.batch,
            f"epoch {s.epoch}",
        )
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                return
            for window in self.windows.values():
                window.data_wait += time.perf_counter() - start
            yield batch

    def _count(self, output: StepOutput, images: int) -> None:
        """Advance the position and log: train/* every tracking.log_every steps, progress/*
        (averaged over the window and the ranks: a collective) every train.log_every steps."""
        self.state.batch += 1
        self.state.step += 1
        step, last = self.state.step, self.state.step == self.max_steps
        self.epoch_loss.add(output, images)
        for window in self.windows.values():
            window.add(output, images)
        progress = self.windows["progress"]
        if not self.first_step_logged:  # start-up cost: DeepSpeed's first step, torch.compile's compilation
            self.first_step_logged = True
            self.log({"train/first_step_s": progress.elapsed() - progress.data_wait}, step)
        if step % self.cfg.tracking.log_every == 0 or last:
            self.log(self._train_metrics(output, self.windows["tracking"]), step)
            self.windows["tracking"].reset()
        if step % self.cfg.train.log_every == 0 or last:
            self.log(self._progress_metrics(progress), step)
            progress.reset()

    def _train_metrics(self, output: StepOutput, window: Window) -> dict[str, float]:
        images_per_s = window.images / window.elapsed()
        info = output.info
        return {
            "train/loss": output.loss.item(),
            "train/lr": info.lr if info else self.engine.lr(),
            "train/grad_norm": info.norm() if info else math.nan,
            "train/images_per_s": images_per_s,
            "train/mfu": mfu(images_per_s, self.macs, self.peak_flops, self.env.world_size),
        }

    def _progress_metrics(self, window: Window) -> dict[str, float]:
        elapsed, steps = window.elapsed(), max(window.steps, 1)
        loss_sum = float(window.loss_sum)
        total_loss, count = D.all_reduce_sum([loss_sum, window.steps], self.device)
        step_ms, wait_ms, memory = D.all_reduce_max(
            [1000 * (elapsed - window.data_wait) / steps, 1000 * window.data_wait / steps, peak_memory_mb(self.device)],
            self.device,
        )
        s = self.state
        return {
            "progress/loss": total_loss / max(count, 1),
            "progress/lr": self.engine.lr(),
            "progress/epoch": s.epoch + s.batch / self.epoch_length,
            "progress/images_per_s": window.images / elapsed,
            "progress/data_wait_ms": wait_ms,
            "progress/step_ms": step_ms,
            "progress/peak_mem_mb": memory,
            "progress/eta_s": (self.max_steps - s.step) * elapsed / steps,
        }

    def _end_epoch(self) -> None:
        s, cfg = self.state, self.cfg
        s.epoch, s.batch, s.layouts = s.epoch + 1, 0, []
        self.epoch_length = self.steps_per_epoch
        epoch_loss = float(self.epoch_loss.loss_sum) / max(self.epoch_loss.steps, 1)
        s.eval_pending = s.epoch % cfg.train.eval_every == 0 or s.epoch == cfg.optim.epochs
        size = cfg.data.train_size(s.epoch - 1)  # data.progressive: the size this epoch trained at
        self._epoch_metrics({"train/epoch_loss": epoch_loss, "epoch": s.epoch, "train/image_size": size})
        self.checkpoint("epoch_end")

    def _epoch_metrics(self, metrics: dict[str, float]) -> None:
        """Log the epoch's metrics with its evaluation when one is due; an evaluation cut short
        by a stop stays pending in the checkpoint and runs first when the run resumes."""
        s = self.state
        if s.eval_pending:
            val = self.evaluate()
            if not self.eval_cut:
                s.eval_pending = False
                s.best_top1 = max(s.best_top1, val["val/top1"])
                metrics.update(val)
                metrics["val/top1_best"] = s.best_top1
        self.last_metrics = metrics
        self.log(metrics, s.step)

    # -- start and end ------------------------------------------------------------------------
    def _announce(self) -> None:
        cfg, e, tracker = self.cfg, self.cfg.engine, self.sinks.tracker
        mlflow = tracker.run_id or ("pending (server down)" if tracker.enabled else "off")
        self.console.say(
            f"run {cfg.train.name}: {cfg.model.name} ({self.num_params / 1e6:.2f} M params, "
            f"{self.macs / 1e9:.2f} GMAC/image), {self.env.world_size} ranks x batch {cfg.data.batch_size}, "
            f"{self.steps_per_epoch} steps/epoch, {e.backend} ZeRO-{e.zero_stage} {e.precision}"
            f"{', compiled' if e.compile else ''}, MLflow run {mlflow}; output in {self.run_dir}"
        )

    def evaluate_only(self) -> Result:
        """train.eval_only: the metrics of the resumed (or initial) weights, logged; no training."""
        metrics = self.evaluate()
        self.console.say(metrics_line(metrics))
        self.log(metrics, self.state.step)
        self.sinks.tracker.finish()
        s = self.state
        return Result("finished", s.epoch, s.step, metrics, str(self.resumed_from or ""), s.run_id, str(self.run_dir))

    def _end(self, status: str) -> Result:
        checkpoint = str(self.checkpoints.latest() or "")
        if status == "finished":
            if "val/top1" not in self.last_metrics:  # stopped by train.max_steps between evaluations
                final = self.evaluate()
                self.last_metrics.update(final)
                self.log(final, self.state.step)
            self._export()
            self.console.say(
                f"done: {metrics_line(self.last_metrics)}; checkpoint {checkpoint}; weights {self.run_dir / 'model.pt'}"
            )
        self.sinks.tracker.finish("FINISHED" if status == "finished" else "KILLED")
        s = self.state
        s.run_id = self.sinks.tracker.run_id or s.run_id
        return Result(
            status, s.epoch, s.step, self.last_metrics, checkpoint, s.run_id, str(self.run_dir), self.stop.signal
        )

    def _export(self) -> None:
        """model.pt (fp32), model_ema.pt, final_metrics.txt and, if asked, a registered model."""
        full = self.engine.full_state_dict()  # a collective under ZeRO-3
        if not (self.env.is_main and self.cfg.checkpoint.export_at_end and full is not None):
            return
        tracker = self.sinks.tracker
        files = {"model.pt": full}
        if self.ema is not None:
            files["model_ema.pt"] = {k: v.detach().float().cpu() for k, v in self.ema.module.state_dict().items()}
        for name, state_dict in files.items():
            save_model_file(self.run_dir / name, self.model_config, state_dict)
            tracker.log_artifact(self.run_dir / name)
        final = self.run_dir / "final_metrics.txt"
        atomic_write_text(final, "".join(f"{k} {v}\n" for k, v in sorted(self.last_metrics.items())))
        tracker.log_artifact(final)
        if self.cfg.tracking.register_model:
            model = LSA(LSAConfig(**self.model_config))
            model.load_state_dict(full)
            tracker.log_model(model, "model", self.cfg.tracking.register_model)
