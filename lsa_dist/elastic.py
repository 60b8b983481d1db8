"""Local worker processes on torch's elastic agent (what torchrun runs): N processes on this
machine joined by a c10d rendezvous on a free port, all stopped when one fails, restarted up to
`max_restarts` times, and the launcher's SIGINT/SIGTERM forwarded to them (they checkpoint and
stop within `stop_timeout` seconds, or are killed).

What this module adds to the agent:
- each worker's exit time, taken from a pidfd the moment it exits (the agent polls, and its
  failure timestamps have whole seconds), so that the rank that failed first is named rather
  than the ranks that failed because it had gone;
- no restart after a bad input (exit 2) or a requested stop (exit 3): neither would go better;
- rank 0's output echoed here from its log file (the workers append their own output to
  RUN/logs/rank<r>.log; the agent's redirection would truncate the file of every attempt).

torch's public launcher API (`elastic_launch`, what torchrun runs) offers none of these, so the
agent's `_start_workers`, `_monitor_workers`, `_remaining_restarts` and `_pcontext` are used;
tests/test_elastic.py pins each of them, so a torch upgrade that changes one fails there by name.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from .cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_STOPPED

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # the agent's defaults


@dataclass(frozen=True)
class WorkerExit:
    rank: int
    code: int  # negative: killed by that signal
    at: float  # time.monotonic() when it exited

    def describe(self) -> str:
        return f"signal {-self.code}" if self.code < 0 else f"exit code {self.code}"


@dataclass
class Outcome:
    """How the workers of the last attempt ended."""

    exits: list[WorkerExit]
    restarts: int = 0
    launcher_signal: str = ""  # SIGINT/SIGTERM received by the launcher, forwarded to the workers

    def failures(self) -> list[WorkerExit]:
        return failures(self.exits)

    @property
    def stopped(self) -> bool:
        return not self.failures() and any(e.code == EXIT_STOPPED for e in self.exits)


def failures(exits: list[WorkerExit]) -> list[WorkerExit]:
    """Ranks that neither finished nor stopped on request, the first to fail first."""
    return sorted((e for e in exits if e.code not in (EXIT_OK, EXIT_STOPPED)), key=lambda e: e.at)


class _Agent(LocalElasticAgent):
    """LocalElasticAgent that records exact exit times and skips pointless restarts."""

    def __init__(self, spec: WorkerSpec, log_dir: str, stop_timeout: int, on_restart: Callable) -> None:
        super().__init__(spec, DefaultLogsSpecs(log_dir=log_dir), start_method="spawn", shutdown_timeout=stop_timeout)
        self.attempts = 0
        self.exit_times: dict[int, float] = {}
        self.on_restart = on_restart

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        if self.attempts:
            failure = next(iter(failures(self.exits())), None)
            self.on_restart(failure, self.attempts, worker_group.spec.max_restarts)
        pids = super()._start_workers(worker_group)
        self.attempts += 1
        self.exit_times = {}
        for rank, pid in pids.items():
            threading.Thread(target=self._watch, args=(rank, pid), daemon=True).start()
        return pids

    def _watch(self, rank: int, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone (and reaped)
            self.exit_times[rank] = time.monotonic()
            return
        try:
            select.select([fd], [], [])  # readable once the process has exited
        finally:
            os.close(fd)
        self.exit_times[rank] = time.monotonic()

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.is_failed():
            failed = failures(self.exits())
            if not failed or failed[0].code == EXIT_BAD_INPUT:  # a requested stop, or bad input first
                self._remaining_restarts = 0  # as the agent itself does for workers it cannot restart
        return result

    def exits(self) -> list[WorkerExit]:
        """How each worker of the current attempt ended (running ones are left out)."""
        handlers = getattr(self._pcontext, "subprocess_handlers", {}) if self._pcontext else {}
        out = []
        for rank, handler in sorted(handlers.items()):
            code = handler.proc.poll()
            if code is not None:
                out.append(WorkerExit(rank, code, self.exit_times.get(rank, time.monotonic())))
        return out

    def kill_leftovers(self) -> None:
        """SIGKILL what is still running (a second Ctrl-C cut the graceful stop short)."""
        handlers = getattr(self._pcontext, "subprocess_handlers", {}) if self._pcontext else {}
        for handler in handlers.values():
            if handler.proc.poll() is None:
                try:
                    os.killpg(handler.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                handler.proc.wait()


def quiet_agent() -> None:
    """Silence the agent's own log lines (each of its modules sets its logger's level): the
    launcher says what happened, with the failing rank's own lines."""
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)


def run_workers(nproc: int, args: list[str], *, max_restarts: int, stop_timeout: int, on_restart: Callable) -> Outcome:
    """Run `python <args>` as `nproc` workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ... set by the
    agent) until they all end; `on_restart(failure, restart, max_restarts)` before each restart."""
    quiet_agent()
    # Each attempt gets a fresh store hosted by its rank 0: on the agent's shared store, a
    # restarted rank 1 read rank 0's gloo address of the previous attempt (connection refused).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    rendezvous = RendezvousParameters(
        backend="c10d", endpoint="127.0.0.1:0", run_id=uuid.uuid4().hex, min_nodes=1, max_nodes=1
    )
    spec = WorkerSpec(
        role="worker",
        local_world_size=nproc,
        entrypoint=sys.executable,
        args=tuple(args),
        rdzv_handler=get_rendezvous_handler(rendezvous),
        max_restarts=max_restarts,
        monitor_interval=0.1,
    )
    handlers = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    stopped_by = ""
    with TemporaryDirectory(prefix="lsa-agent-") as tmp:
        agent = _Agent(spec, tmp, stop_timeout, on_restart)
        try:
            agent.run()
        except SignalException as err:
            stopped_by = signal.Signals(err.sigval).name
        finally:
            agent.kill_leftovers()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            spec.rdzv_handler.shutdown()
    return Outcome(agent.exits(), max(0, agent.attempts - 1), stopped_by)


class Echo:
    """Copy what a growing file gains to our stdout (rank 0's log), until stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Echo:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            stopping = self.done.is_set()
            self._copy()
            if stopping:
                return
            self.done.wait(0.05)

    def _copy(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        if chunk:
            self.offset += len(chunk)
            try:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            except OSError:  # a closed pipe (| head) or terminal: the log file still has it all
                stdout_to_devnull()


def stdout_to_devnull() -> None:
    """Point file descriptor 1 at /dev/null: once a reader of our output has gone (`| head`, a
    closed terminal), writing on must neither fail nor stop the launcher or its workers."""
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.close(fd)


class SurvivingStdout:
    """sys.stdout whose writes go to /dev/null once the reader has gone, instead of raising."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError:
            stdout_to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            stdout_to_devnull()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def tail(path: Path, start: int, lines: int = 30) -> list[str]:
    """The last `lines` lines written to `path` after byte `start`, progress-bar redraws left out."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    kept = [line.rstrip("\n") for line in text.splitlines(keepends=True) if "\r" not in line]
    return kept[-lines:]
