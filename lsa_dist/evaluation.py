"""Evaluation: val/* of the trained weights and, when an EMA is kept, val_ema/* of it, on every
rank, cut short when a stop is requested (an ImageNet evaluation outlasts SLURM's warning)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .metrics import evaluate
from .sinks import Console
from .stop import StopController


class Evaluator:
    """Evaluates on the validation loader; `cut` tells whether an evaluation was cut short by a
    stop request (it then stays pending in the checkpoint and runs first on resume)."""

    def __init__(self, val_loader: Any, console: Console, stop: StopController, device: torch.device) -> None:
        self.loader, self.console, self.stop, self.device = val_loader, console, stop, device
        self.cut = False

    def __call__(self, engine: Any, ema: Any, epoch: int) -> dict[str, float]:
        engine.train(False)
        metrics = self._evaluate(engine.forward, epoch)
        engine.train(True)
        if ema is not None:
            ema.module.eval()
            averaged = self._evaluate(lambda images: ema.module(images.float()), epoch)
            metrics.update({key.replace("val/", "val_ema/"): value for key, value in averaged.items()})
        return metrics

    def _evaluate(self, forward: Callable[[torch.Tensor], torch.Tensor], epoch: int) -> dict[str, float]:
        batches = self.console.progress(self.loader.epoch(epoch), len(self.loader), "eval")
        return evaluate(forward, self._unless_stopped(batches), self.loader.to_model_input, self.device)

    def _unless_stopped(self, batches: Iterable[Any]) -> Iterator[Any]:
        for batch in batches:
            if self.stop.stopping(at_once=True):
                self.cut = True
                return
            yield batch
