"""Where a run's metrics go: RUN/metrics.jsonl, MLflow, and the console of rank 0.

`Sinks.log(metrics, step)` is the one call the trainer makes; each sink takes what it shows:
the file and MLflow keep everything, the console prints epoch summaries and, every
`train.log_every` steps, a progress line (or, on a terminal, a progress bar's postfix).
The file is written first: MLflow catches up from it after an outage (lsa_dist.tracking).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .record import last_steps
from .tracking import Recorded, Tracker, append_record

logger = logging.getLogger(__name__)
PROGRESS = "progress/"  # the keys of a progress window (see Console.progress_line)
SUMMARY_KEYS = ("train/epoch_loss", "val/loss", "val/top1", "val/top5", "val_ema/top1")


def interactive() -> bool:
    """Whether rank 0 draws progress bars: LSA_PROGRESS=1/0 (the local launcher sets it from its
    own terminal, since the workers write to log files) or, unset, whether stderr is a terminal."""
    setting = os.environ.get("LSA_PROGRESS", "")
    return setting == "1" or (setting == "" and sys.stderr.isatty())


def metrics_line(metrics: dict[str, float]) -> str:
    """The summary keys of `metrics`, as `key value` pairs (accuracies in percent)."""
    parts = []
    for key in SUMMARY_KEYS:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key} {value:.2f}%" if key.endswith(("top1", "top5")) else f"{key} {value:.4f}")
    return "  ".join(parts)


def progress_line(m: dict[str, float], step: int, total_steps: int) -> str:
    """One plain line per window, for logs that are not a terminal (SLURM, pipes)."""
    p = {k[len(PROGRESS) :]: v for k, v in m.items() if k.startswith(PROGRESS)}
    return (
        f"step {step}/{total_steps}  epoch {p['epoch']:.2f}  loss {p['loss']:.4f}  lr {p['lr']:.3e}  "
        f"{p['images_per_s']:.1f} img/s  data {p['data_wait_ms']:.1f} ms  step {p['step_ms']:.1f} ms  "
        f"mem {p['peak_mem_mb']:.0f} MB  eta {format_duration(p['eta_s'])}"
    )


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Console:
    """Rank 0's terminal or log: bars when interactive, plain lines otherwise; silent elsewhere."""

    def __init__(self, enabled: bool, epochs: int, total_steps: int) -> None:
        self.enabled, self.epochs, self.total_steps = enabled, epochs, total_steps
        self.interactive = enabled and interactive()
        self.bar: Any = None

    def say(self, message: str) -> None:
        """One line on rank 0's stdout, "warning: ..." lines included (a log record at INFO:
        the level decides the stream, and these lines have always been on stdout)."""
        if self.enabled:
            logger.info(message)

    def progress(self, iterable: Iterable, total: int, desc: str) -> Iterator:
        """`iterable` with a progress bar when interactive."""
        if not self.interactive:
            yield from iterable
            return
        from tqdm import tqdm

        with tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0) as bar:
            self.bar = bar
            try:
                yield from bar
            finally:
                self.bar = None

    def show(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if "epoch" in metrics:
            self.say(f"epoch {int(metrics['epoch'])}/{self.epochs} step {step}  {metrics_line(metrics)}")
        elif f"{PROGRESS}loss" in metrics:
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{metrics[PROGRESS + 'loss']:.4f}", lr=f"{metrics[PROGRESS + 'lr']:.2e}")
            elif not self.interactive:
                self.say(progress_line(metrics, step, self.total_steps))


class MetricsFile:
    """RUN/metrics.jsonl on rank 0: every logged metric, readable without MLflow, and the
    record MLflow is sent from."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        # what an earlier attempt logged: the steps a restart trains again are not logged twice
        self.logged = last_steps(path) if enabled else {}

    def fresh(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        """The metrics not logged before at this step or later (resume is exact: a step trained
        again gives the same numbers)."""
        return {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}

    def write(self, metrics: dict[str, float], step: int) -> Recorded | None:
        """One line {"step", "time", **metrics}; where it went (None on other ranks)."""
        return append_record(self.path, metrics, step) if self.enabled else None


class Sinks:
    """Fan-out of `log(metrics, step)` to the metrics file, MLflow and the console."""

    def __init__(self, metrics_file: MetricsFile, tracker: Tracker, console: Console) -> None:
        self.file, self.tracker, self.console = metrics_file, tracker, console

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.console.show(metrics, step)
        metrics = self.file.fresh(metrics, step)
        if metrics:
            # the line is in the file before MLflow is given it: the mark never passes an unwritten line
            at = self.file.write(metrics, step)
            self.tracker.log_metrics(metrics, step, at)
