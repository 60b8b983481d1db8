"""The Trainer: one process's part of a run, assembled from parts.

The constructor takes the run (its lock), builds the data, the model and engine, restores the
resume plan (lsa_dist.resume) and opens the sinks; `fit()` is the loop. The parts: the stop
controller (signals and the ranks' vote), the checkpointer (the save policy), telemetry (what the
loop measures), the evaluator, and the sinks (metrics.jsonl, MLflow, rank 0's console).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import dist as D
from . import rng
from .attention import EvaluationPictures
from .build import Data, Model, build_data, build_model, build_sinks, export_run, write_run_configs
from .checkpoint import Checkpointer, CheckpointError, CheckpointManager, TrainState
from .config import RunConfig, to_yaml
from .data import DatasetError
from .evaluation import Evaluator
from .lock import own_run
from .resume import Here, plan_resume, restore, take_lineage
from .sinks import Console, metrics_line
from .stop import StopController
from .telemetry import Position, StepOutput, Telemetry

logger = logging.getLogger(__name__)


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
    first_step: int = 0  # the step this process started from (step - first_step: steps it trained)


@dataclass
class Span:
    """How far training goes: the batches of the epoch in progress (after a resume on another
    layout, those read before it plus what the rest gives), the step it ends at, and the step
    this process started from."""

    epoch_length: int
    max_steps: int
    first_step: int = 0


class Trainer:
    """Training (or evaluation) of one run on this process's rank; every rank builds one."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.env = D.discover()
        self.device = D.init(self.env)
        self.lock = own_run(cfg.run_dir, self.device)
        self.stop = StopController()
        rng.seed_all(cfg.train.seed)  # the initial weights: the same on every rank
        write_run_configs(cfg, self.env.is_main)
        D.barrier()
        self.data: Data = build_data(cfg, self.env)
        console = Console(
            self.env.is_main, cfg.optim.epochs, self._schedule_end(cfg.optim.epochs * self.data.steps_per_epoch)
        )
        self.model: Model = build_model(cfg, self.data, self.env, self.device, console.say)
        self.checkpoints = Checkpointer(
            CheckpointManager(cfg.run_dir / "checkpoints", cfg.checkpoint.keep_last, self.env.rank),
            cfg.checkpoint.every_steps,
        )
        self.state, self.resumed_from, fallback = self._resume(console)
        self.span = self._span()
        console.total_steps = self.span.max_steps
        self.sinks = build_sinks(cfg, self.env, self.state, fallback, console)
        self.telemetry = Telemetry(cfg, self.model.macs, self.env.world_size, self.device)
        self.evaluator = Evaluator(self.data.val_loader, console, self.stop, self.device)
        self.pictures = EvaluationPictures(
            cfg.tracking.attention_maps if cfg.tracking.enabled else 0,
            self.model.config,
            self.data.val_loader,
            cfg.run_dir,
            self.sinks.tracker.log_artifact,
        )

    # -- taking the run and resuming ----------------------------------------------------------
    def _resume(self, console: Console) -> tuple[TrainState, str, str]:
        """The resume plan, its lineage taken by rank 0 (a no-op where the launcher holding the
        lock took it before starting the workers), then restored on every rank. Returns the
        state, the checkpoint resumed ('' for a new run) and why a fall-back was taken."""
        cfg, env, data = self.cfg, self.env, self.data
        dataset_sha = data.identity
        restarted = D.restart_count() > 0

        def take() -> None:
            take_lineage(plan_resume(cfg, env.world_size, dataset_sha, restarted), cfg.run_dir, console.say)

        D.rank0_acts(take, self.device, "the resume plan", CheckpointError)
        plan = plan_resume(cfg, env.world_size, dataset_sha, restarted)
        state = TrainState(
            world_size=env.world_size,
            backend=cfg.engine.backend,
            zero_stage=cfg.engine.zero_stage,
            data_workers=data.workers,
            batch_size=cfg.data.batch_size,
        )
        folder, fallback = "", ""
        if plan.folder is not None:
            here = Here(env.world_size, data.workers, cfg.data.batch_size, data.train_samples, data.steps_per_epoch)
            restored = restore(
                plan,
                self.checkpoints.manager,
                self.model.engine,
                cfg,
                here,
                self.device,
                console.say,
                lambda s: data.train_loader.batches_left(s.epoch, s.layouts),
            )
            state, folder, fallback = restored.state, str(restored.folder), restored.fallback
            if self.model.ema is not None and "ema" in restored.client_state:
                self.model.ema.module.load_state_dict(restored.client_state["ema"])
        state.dataset_sha256 = dataset_sha
        self.checkpoints.manager.clean_staging()
        return state, folder, fallback

    def _span(self) -> Span:
        s, steps = self.state, self.data.steps_per_epoch
        length = steps
        if s.layouts:
            length = s.batches_before() + self.data.train_loader.batches_left(s.epoch, s.layouts)
        total = s.step + (length - s.batch) + (self.cfg.optim.epochs - s.epoch - 1) * steps
        return Span(length, self._schedule_end(total if s.epoch < self.cfg.optim.epochs else s.step), s.step)

    def _schedule_end(self, total: int) -> int:
        """The step training ends at: the schedule's end (or train.max_steps, if sooner)."""
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> Result:
        """Train to the end of the schedule (or train.max_steps), or until a stop is requested."""
        self._announce()
        self.model.engine.train(True)
        self.telemetry.start()
        if self.state.eval_pending:  # stopped during an epoch-end evaluation: it comes first
            self._epoch_metrics({"epoch": self.state.epoch})
        while self.state.epoch < self.cfg.optim.epochs and self.state.step < self.span.max_steps:
            self.telemetry.epoch.reset()
            for batch in self._batches():
                if batch is None or self.stop.stopping():  # None: a read failed, and the stop explains it
                    return self._stop()
                images, labels = batch
                output = self.train_step(images, labels)
                self._count(output, images.shape[0] * self.env.world_size)
                self.checkpoint("every_steps")
                if self.state.step >= self.span.max_steps:
                    break
            if self.state.batch >= self.span.epoch_length:
                self._end_epoch()
            elif self.state.step >= self.span.max_steps:
                self.checkpoint("max_steps")
            if self.stop.stopping(at_once=True):
                return self._stop()
        return self._end("finished")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """One optimizer step on a uint8 batch: model input, mixup, micro-batches, backward, step.
        Its randomness (erasing, mixup/cutmix, drop path) is a function of (seed, rank, step)."""
        rng.seed_step(self.cfg.train.seed, self.env.rank, self.state.step)
        engine, mixup = self.model.engine, self.model.mixup
        inputs = self.data.train_loader.to_model_input(images.to(self.device, non_blocking=True))
        targets = labels.to(self.device, non_blocking=True)
        if mixup is not None:
            inputs, targets = mixup(inputs, targets)
        accum = self.cfg.optim.grad_accum_steps
        micro = inputs.shape[0] // accum
        loss_sum, info = torch.zeros((), device=self.device), None
        for chunk in range(accum):
            part = slice(chunk * micro, (chunk + 1) * micro)
            loss = self.loss(engine.forward(inputs[part]), targets[part])
            engine.backward(loss)
            info = engine.step() or info
            loss_sum += loss.detach()
        if self.model.ema is not None:
            self.model.ema.update(engine.module, step=self.state.step)
        return StepOutput(loss_sum / accum, info)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against hard labels (with label smoothing) or mixup's soft targets."""
        if targets.dim() == 2:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.data.augment.label_smoothing)

    def evaluate(self) -> dict[str, float]:
        """val/* of the trained weights and, when an EMA is kept, val_ema/* of it (every rank);
        a complete evaluation also draws the attention pictures (tracking.attention_maps)."""
        metrics = self.evaluator(self.model.engine, self.model.ema, self.state.epoch)
        if not self.evaluator.cut:
            self.pictures.draw(self.model.engine, self.state.step, self.env.is_main)
        return metrics

    def checkpoint(self, event: str) -> None:
        """Save if the policy says so for this event (lsa_dist.checkpoint.Checkpointer)."""
        if not self.checkpoints.should_save(self.state.step, event):
            return
        self.state.run_id = self.sinks.tracker.run_id or self.state.run_id  # opened late if the server was down
        self.checkpoints.save(self.model.engine, self.state, to_yaml(self.cfg), self.model.ema_state())

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Every sink: metrics.jsonl and MLflow on rank 0, and the console's line or bar."""
        self.sinks.log(metrics, step)

    # -- inside the loop ----------------------------------------------------------------------
    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        """The rest of the epoch's batches, timing how long the loop waits for each. A shard
        read that fails once this rank was asked to stop ends in None when the ranks' vote
        (at this step, as the loop would take it) agrees to stop: the signal that stops the
        run may have ended the reader too. Otherwise the read error stands."""
        s = self.state
        start = s.batch - s.batches_before()  # in this layout's share of the epoch
        batches = self.sinks.console.progress(
            self.data.train_loader.epoch(s.epoch, start, layouts=list(s.layouts)),
            self.span.epoch_length - s.batch,
            f"epoch {s.epoch}",
        )
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator, None)
            except DatasetError as err:
                if not (self.stop.requested and self.stop.stopping()):
                    raise
                logger.warning(f"{err}: read after the stop request ({self.stop.signal}); stopping as asked")
                yield None
                return
            if batch is None:
                return
            self.telemetry.waited(time.perf_counter() - start)
            yield batch

    def _count(self, output: StepOutput, images: int) -> None:
        """Advance the position and log what telemetry says is due at this step."""
        s = self.state
        s.batch += 1
        s.step += 1

        def position() -> Position:
            epoch = s.epoch + s.batch / self.span.epoch_length
            size = self.cfg.data.train_size(s.epoch)
            return Position(epoch, self.span.max_steps - s.step, self.model.engine.lr(), size)

        for metrics in self.telemetry.count(output, images, s.step, s.step == self.span.max_steps, position):
            self.log(metrics, s.step)

    def _end_epoch(self) -> None:
        s, cfg = self.state, self.cfg
        s.epoch, s.batch, s.layouts = s.epoch + 1, 0, []
        self.span.epoch_length = self.data.steps_per_epoch
        s.eval_pending = s.epoch % cfg.train.eval_every == 0 or s.epoch == cfg.optim.epochs
        size = cfg.data.train_size(s.epoch - 1)  # data.progressive: the size this epoch trained at
        loss = self.telemetry.epoch.mean_loss()
        (skipped,) = D.all_reduce_sum([self.data.train_loader.skipped.count], self.device)
        metrics = {"train/epoch_loss": loss, "epoch": s.epoch, "train/image_size": size}
        self._epoch_metrics({**metrics, "data/skipped_samples": skipped})
        self.checkpoint("epoch_end")

    def _epoch_metrics(self, metrics: dict[str, float]) -> None:
        """Log the epoch's metrics with its evaluation when one is due; an evaluation cut short
        by a stop stays pending in the checkpoint and runs first when the run resumes."""
        s = self.state
        if s.eval_pending:
            val = self.evaluate()
            if not self.evaluator.cut:
                s.eval_pending = False
                s.best_top1 = max(s.best_top1, val["val/top1"])
                metrics.update(val)
                metrics["val/top1_best"] = s.best_top1
        self.telemetry.last_epoch = metrics
        self.log(metrics, s.step)

    # -- start and end ------------------------------------------------------------------------
    def _announce(self) -> None:
        cfg, e, tracker, m = self.cfg, self.cfg.engine, self.sinks.tracker, self.model
        gmacs = m.macs[cfg.data.image_size][0] / 1e9  # the architecture's count, as papers quote it
        mlflow = tracker.run_id or ("pending (server down)" if tracker.enabled else "off")
        backend = "" if e.compile_backend == "inductor" else f" ({e.compile_backend})"
        compiled = f", compiled{backend}" if e.compile else ""
        self.sinks.console.say(
            f"run {cfg.train.name}: {cfg.model.name} ({m.num_params / 1e6:.2f} M params, "
            f"{gmacs:.2f} GMAC/image), {self.env.world_size} ranks x batch {cfg.data.batch_size}, "
            f"{self.data.steps_per_epoch} steps/epoch, {e.backend} ZeRO-{e.zero_stage} {e.precision}"
            f"{compiled}, MLflow run {mlflow}; output in {cfg.run_dir}"
        )

    def _stop(self) -> Result:
        self.sinks.console.say(f"stop requested ({self.stop.signal}): checkpointing at step {self.state.step}")
        self.checkpoint("stop")
        return self._end("stopped")

    def evaluate_only(self) -> Result:
        """train.eval_only: the metrics of the resumed (or initial) weights, logged; no training."""
        metrics = self.evaluate()
        self.sinks.console.say(metrics_line(metrics))
        self.log(metrics, self.state.step)
        self.sinks.tracker.finish()
        s = self.state
        return Result("finished", s.epoch, s.step, metrics, self.resumed_from, s.run_id, str(self.cfg.run_dir))

    def _end(self, status: str) -> Result:
        checkpoint = str(self.checkpoints.manager.latest() or "")
        if status == "finished":
            if "val/top1" not in self.telemetry.last_epoch:  # stopped by train.max_steps between evaluations
                final = self.evaluate()
                self.telemetry.last_epoch.update(final)
                self.log(final, self.state.step)
            export_run(self.cfg, self.model, self.telemetry.last_epoch, self.sinks.tracker, self.env.is_main)
            weights = self.cfg.run_dir / "model.pt"
            self.sinks.console.say(
                f"done: {metrics_line(self.telemetry.last_epoch)}; checkpoint {checkpoint}; weights {weights}"
            )
        self.sinks.tracker.finish("FINISHED" if status == "finished" else "KILLED")
        s = self.state
        s.run_id = self.sinks.tracker.run_id or s.run_id
        return Result(
            status,
            s.epoch,
            s.step,
            self.telemetry.last_epoch,
            checkpoint,
            s.run_id,
            str(self.cfg.run_dir),
            self.stop.signal,
            self.span.first_step,
        )
