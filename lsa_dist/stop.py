"""The stop controller: the signals that ask a run to stop, and the vote that makes every rank
stop at the same step.

SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 (SLURM's warning before preemption or the time
limit, through submitit) set a flag; the trainer checkpoints at the next step boundary (an
evaluation under way is cut short) and ends with exit code 3. The processes a worker starts
(loader workers, shard readers) ignore these signals, which clusters send to all of a job's
processes at once.
"""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# For a shell that starts a shard reader: ignored, and so ignored by the commands it runs.
SHELL_IGNORES_STOP_SIGNALS = "trap '' TERM INT HUP USR1 USR2"


def ignore_stop_signals() -> None:
    """In a helper process of a worker (a loader worker): the stop signals are ignored, here and
    in what it starts (shard readers). Schedulers signal every process of a job (a process
    group, a SLURM step); only the training process decides how to stop, and a helper killed
    by the signal would crash the step it serves instead of letting it checkpoint."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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


class StopController:
    """This process's stop request (set by a signal) and the ranks' vote on it. Every rank asks
    `stopping()` at the same points (a collective): before every step, at epoch ends, during
    evaluation."""

    def __init__(self) -> None:
        self.requested = False
        self.signal = ""  # what asked: SIGUSR2 (SLURM preemption / time limit), SIGTERM, ...
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        self.vote = StopVote()

    def _handle(self, signum: int, _frame: object) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def stopping(self, at_once: bool = False) -> bool:
        """Whether any rank was asked to stop. Between steps the vote runs in the background and
        is read a step later; `at_once` waits for it (epoch ends, evaluation)."""
        if self.vote.poll(self.requested, at_once):
            self.signal = self.signal or "by another rank"
            return True
        return False
