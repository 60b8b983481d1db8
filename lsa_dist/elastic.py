"""Local worker processes through torch's public elastic launcher (`elastic_launch`, what
torchrun runs): N processes on this machine joined by a c10d rendezvous on a free port, all
stopped when one fails, and the launcher's SIGINT/SIGTERM forwarded to them (they checkpoint and
stop within `stop_timeout` seconds, or are killed).

Each attempt is one `elastic_launch` with `max_restarts=0`; restarts are this module's loop, so
it can do what the public API cannot:
- no restart after a bad input (exit 2) or a requested stop (exit 3): neither would go better,
  and a callback says which rank failed before each restart;
- each worker's exit time, taken from a pidfd the moment it exits (the launcher's
  ProcessFailure timestamps have whole seconds), so that the rank that failed first is named
  rather than the ranks that failed because it had gone;
- rank logs kept across attempts: the workers append their own output to RUN/logs/rank<r>.log
  (the launcher's redirects would truncate it on every attempt); rank 0's is echoed here.
Workers see the attempt number in LSA_RESTART_COUNT (torch's own count is 0 in every attempt).
"""

from __future__ import annotations

import logging
import os
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

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from .cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_STOPPED
from .dist import EXIT_RECORD_ENV, RESTART_ENV

# forwarded to the workers as a stop: torch's launcher's defaults, and SLURM's warning signals
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


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
        """The workers that failed; one ended by the very signal the launcher forwarded (still
        starting up, before its stop handlers existed) stopped on request."""
        return [e for e in failures(self.exits) if e.code != self.forwarded]

    @property
    def forwarded(self) -> int | None:
        """The exit code of a worker ended by the forwarded signal (None: nothing forwarded)."""
        return -signal.Signals[self.launcher_signal] if self.launcher_signal else None

    @property
    def stopped(self) -> bool:
        return not self.failures() and any(e.code in (EXIT_STOPPED, self.forwarded) for e in self.exits)


def failures(exits: list[WorkerExit]) -> list[WorkerExit]:
    """Ranks that neither finished nor stopped on request, the first to fail first."""
    return sorted((e for e in exits if e.code not in (EXIT_OK, EXIT_STOPPED)), key=lambda e: e.at)


def _rank_of(pid: int, run_id: str) -> int | None:
    """RANK of our child `pid` if it is a worker of launch `run_id` (from its environment)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(item.split(b"=", 1) for item in env if b"=" in item)
    if values.get(b"TORCHELASTIC_RUN_ID") != run_id.encode() or b"RANK" not in values:
        return None
    return int(values[b"RANK"])


def _children() -> set[int]:
    """Process ids of this process's children."""
    me, out = os.getpid(), set()
    for task in Path(f"/proc/{me}/task").iterdir():
        try:
            out.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass
    return out


class ExitWatch:
    """Finds the workers of one launch among this process's children and records, for each
    rank, its exit status and the moment it exited (a pidfd wait: woken by the kernel, not a poll)."""

    def __init__(self, run_id: str, nproc: int) -> None:
        self.run_id, self.nproc = run_id, nproc
        self.pids: dict[int, int] = {}  # rank -> pid
        self.exits: dict[int, WorkerExit] = {}
        self.done = threading.Event()
        self.threads: list[threading.Thread] = []
        self.finder = threading.Thread(target=self._find, daemon=True)

    def __enter__(self) -> ExitWatch:
        self.finder.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.finder.join(timeout=5)
        for thread in self.threads:
            thread.join(timeout=5)

    def _find(self) -> None:
        while len(self.pids) < self.nproc and not self.done.wait(0.01):
            for pid in _children() - set(self.pids.values()):
                rank = _rank_of(pid, self.run_id)  # None too between fork and exec: asked again
                if rank is not None:
                    self.pids[rank] = pid
                    thread = threading.Thread(target=self._watch, args=(rank, pid), daemon=True)
                    self.threads.append(thread)
                    thread.start()

    def _watch(self, rank: int, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone (and reaped): its status comes from the launcher
            return
        try:  # blocks until it exits; reads the status in the kernel, without reaping (the
            # launcher still waits for this child) and before the launcher's next poll could
            info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOWAIT)
            at = time.monotonic()
        except ChildProcessError:  # the launcher reaped it first
            return
        finally:
            os.close(fd)
        if info is not None:
            code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            self.exits[rank] = WorkerExit(rank, code, at)

    def kill_leftovers(self) -> None:
        """SIGKILL workers still running (a second Ctrl-C cut the graceful stop short)."""
        for rank, pid in self.pids.items():
            if rank not in self.exits:
                try:
                    os.killpg(pid, signal.SIGKILL)  # each worker leads its own session
                except ProcessLookupError:
                    pass


def quiet_agent() -> None:
    """Silence the launcher's own log lines (each of its modules sets its logger's level): the
    launcher says what happened, with the failing rank's own lines."""
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("torch.distributed.") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)


def run_attempt(nproc: int, args: list[str], stop_timeout: int) -> tuple[list[WorkerExit], str]:
    """One start of `python <args>` as `nproc` workers, until all have ended: how each ended, and
    the signal the launcher received (forwarded to the workers), if any."""
    run_id = uuid.uuid4().hex
    handlers = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    codes: dict[int, int] = {}
    stopped_by = ""
    with TemporaryDirectory(prefix="lsa-agent-") as tmp, ExitWatch(run_id, nproc) as watch:
        os.environ[EXIT_RECORD_ENV] = tmp  # inherited by the workers; run_workers restores os.environ
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=run_id,
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",
            max_restarts=0,
            monitor_interval=0.1,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=tmp),
            shutdown_timeout=stop_timeout,
            signals_to_handle=",".join(sig.name for sig in HANDLED_SIGNALS),
        )
        try:
            elastic_launch(config, sys.executable)(*args)
        except ChildFailedError as err:
            codes = {rank: failure.exitcode for rank, failure in err.failures.items()}
        except SignalException as err:
            stopped_by = signal.Signals(err.sigval).name
        finally:
            watch.kill_leftovers()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        now, finished = time.monotonic(), not codes and not stopped_by
        recorded = {rank: code for rank in range(nproc) if (code := recorded_exit(Path(tmp), rank)) is not None}
    # The launcher can reap a worker before the watch reads its status (a busy host): then the
    # code the worker recorded as it exited counts, and a worker that recorded none was ended by
    # the forwarded signal. After a failure, a rank the launcher stopped unseen is left out.
    unseen = -signal.Signals[stopped_by] if stopped_by else EXIT_OK
    exits = []
    for rank in range(nproc):
        if rank in watch.exits:
            exits.append(watch.exits[rank])
        elif rank in codes or finished or stopped_by:
            exits.append(WorkerExit(rank, codes.get(rank, recorded.get(rank, unseen)), now))
    return exits, stopped_by


def recorded_exit(folder: Path, rank: int) -> int | None:
    """The exit code rank `rank` wrote into `folder` as it exited (lsa_dist.dist.shutdown)."""
    try:
        return int((folder / f"rank{rank}").read_text())
    except (OSError, ValueError):
        return None


def run_workers(nproc: int, args: list[str], *, max_restarts: int, stop_timeout: int, on_restart: Callable) -> Outcome:
    """Run `python <args>` as `nproc` workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ... set by
    torch's launcher) until they all end, restarting them after a crash up to `max_restarts`
    times; `on_restart(failure, restart, max_restarts)` before each restart."""
    quiet_agent()
    restarts, environment = 0, dict(os.environ)
    try:
        while True:
            os.environ[RESTART_ENV] = str(restarts)  # what the workers inherit
            exits, stopped_by = run_attempt(nproc, args, stop_timeout)
            outcome = Outcome(exits, restarts, stopped_by)
            failed = outcome.failures()
            # a requested stop, or bad input first: neither would go better on a restart
            if stopped_by or not failed or failed[0].code == EXIT_BAD_INPUT or restarts >= max_restarts:
                return outcome
            restarts += 1
            on_restart(failed[0], restarts, max_restarts)
    finally:  # this process's own environment as it was (torch's launcher adds TORCHELASTIC_* too)
        os.environ.clear()
        os.environ.update(environment)


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
