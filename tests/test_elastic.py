"""The local launcher's restart loop on torch's public elastic launcher, with real worker
processes (small Python scripts, no training): which exits restart the workers, which rank is
named as the first to fail, what a restarted worker is told, and a forwarded SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lsa_dist.cli import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_STOPPED
from lsa_dist.dist import EXIT_RECORD_ENV
from lsa_dist.elastic import recorded_exit, run_workers

# Each worker appends "<rank> <restart count>" to a file, then ends as its rank's line says.
WORKER = """
import os, signal, sys, time
rank, restart = int(os.environ["RANK"]), os.environ["LSA_RESTART_COUNT"]
with open(sys.argv[1], "a") as f:
    f.write(f"{rank} {restart}\\n")
plan = dict(line.split(":", 1) for line in sys.argv[2].split(";"))
action = plan.get(str(rank), "exit 0").split()
if action[0] == "sleep":  # through the launcher's SIGTERM, as a rank busy in a collective
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(float(action[1]))
    sys.exit(int(action[2]))
if action[0] == "kill":
    time.sleep(float(action[1]))
    os.kill(os.getpid(), signal.SIGKILL)
if action[0] == "wait-term-forever":
    time.sleep(60)
if action[0] == "stop":  # as a rank stopping on request: SIGTERM from the launcher is a stop too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
    while len(open(sys.argv[1]).read().split()) < 2 * int(os.environ["WORLD_SIZE"]):
        time.sleep(0.01)
    sys.exit(3)
if action[0] == "wait-term":  # a stop signal: exit as stopped
    for stop in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(stop, lambda *_: sys.exit(3))
    with open(sys.argv[1] + ".ready", "a") as f:
        f.write(f"{rank}\\n")
    time.sleep(60)
sys.exit(int(action[1]))
"""


def launch(tmp_path: Path, plan: str, nproc: int = 2, max_restarts: int = 0) -> tuple[object, list[tuple], list[str]]:
    tmp_path.mkdir(exist_ok=True)
    script, starts = tmp_path / "worker.py", tmp_path / "starts.txt"
    script.write_text(WORKER)
    restarts: list[tuple] = []
    outcome = run_workers(
        nproc,
        [str(script), str(starts), plan],
        max_restarts=max_restarts,
        stop_timeout=10,
        on_restart=lambda failure, n, most: restarts.append((failure, n, most)),
    )
    return outcome, restarts, sorted(starts.read_text().split("\n")[:-1]) if starts.exists() else []


def test_a_crash_restarts_every_worker_up_to_the_limit_and_each_start_is_counted(tmp_path: Path) -> None:
    outcome, restarts, starts = launch(tmp_path, "1:exit 1", max_restarts=2)
    assert starts == ["0 0", "0 1", "0 2", "1 0", "1 1", "1 2"]
    assert [(f.rank, f.code, n, most) for f, n, most in restarts] == [(1, 1, 1, 2), (1, 1, 2, 2)]
    assert "LSA_RESTART_COUNT" not in os.environ  # the caller's environment is left as it was
    assert not any(key.startswith("TORCHELASTIC_") for key in os.environ)
    assert outcome.restarts == 2 and [(e.rank, e.code) for e in outcome.failures()] == [(1, EXIT_CRASH)]


def test_bad_input_is_not_restarted(tmp_path: Path) -> None:
    outcome, restarts, starts = launch(tmp_path, f"0:exit {EXIT_BAD_INPUT}", max_restarts=3)
    assert restarts == [] and starts == ["0 0", "1 0"]
    assert outcome.failures()[0].code == EXIT_BAD_INPUT


def test_the_first_rank_to_fail_is_named_even_within_the_same_second(tmp_path: Path) -> None:
    """Rank 2 is killed at once; the launcher then stops rank 1 (SIGTERM); rank 0 crashes 0.3 s
    later, as a rank whose peer has gone does. Ordered by exit time, not by rank."""
    outcome, _, _ = launch(tmp_path, "0:sleep 0.5 1;2:kill 0.2;1:wait-term-forever", nproc=3)
    failed = outcome.failures()
    assert [(e.rank, e.code) for e in failed] == [(2, -signal.SIGKILL), (1, -signal.SIGTERM), (0, EXIT_CRASH)]
    assert failed[2].at - failed[0].at > 0.2


def test_a_finished_run_and_a_requested_stop_are_not_failures(tmp_path: Path) -> None:
    done, _, _ = launch(tmp_path / "done", "0:exit 0", max_restarts=1)
    assert done.failures() == [] and not done.stopped and [e.code for e in done.exits] == [0, 0]
    stopped, restarts, _ = launch(tmp_path / "stopped", "0:stop;1:stop", max_restarts=1)
    assert stopped.stopped and restarts == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_the_launchers_stop_signal_reaches_the_workers_and_nothing_restarts(tmp_path: Path, sig: int) -> None:
    starts = tmp_path / "starts.txt"

    def terminate_once_both_started() -> None:
        ready = starts.with_name("starts.txt.ready")  # both have their stop handlers
        while not ready.exists() or len(ready.read_text().split()) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)

    sender = threading.Thread(target=terminate_once_both_started, daemon=True)
    sender.start()
    outcome, restarts, _ = launch(tmp_path, "0:wait-term;1:wait-term", max_restarts=2)
    sender.join()
    assert outcome.launcher_signal == signal.Signals(sig).name and restarts == []
    # each exits 3 (one the launcher reaps before its exit is read counts as ended by the signal)
    assert outcome.stopped and outcome.failures() == [] and len(outcome.exits) == 2
    assert EXIT_STOPPED in [e.code for e in outcome.exits]
    assert signal.getsignal(signal.SIGTERM) is not None and sys.exc_info() == (None, None, None)


def test_a_worker_the_forwarded_signal_ends_while_starting_up_stopped_rather_than_failed(tmp_path: Path) -> None:
    """Before a worker has its stop handlers (still importing), the signal the launcher forwards
    ends it: that is the stop asked for, not a crash, and nothing restarts."""
    starts = tmp_path / "starts.txt"

    def terminate_once_both_started() -> None:
        while not starts.exists() or len(starts.read_text().split()) < 4:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=terminate_once_both_started, daemon=True)
    sender.start()
    outcome, restarts, _ = launch(tmp_path, "0:wait-term-forever;1:wait-term-forever", max_restarts=2)
    sender.join()
    assert [e.code for e in outcome.exits] == [-signal.SIGTERM, -signal.SIGTERM]
    assert outcome.failures() == [] and outcome.stopped and restarts == []


def test_a_worker_records_its_exit_code_where_the_launcher_reads_it(tmp_path: Path) -> None:
    """On a busy host the launcher can reap a worker before its watch reads the status: the code
    the worker wrote as it exited (lsa_dist.dist.shutdown) is what the attempt then reads."""
    env = {**os.environ, EXIT_RECORD_ENV: str(tmp_path), "RANK": "1"}
    code = "from lsa_dist.dist import shutdown; shutdown(3)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert recorded_exit(tmp_path, 1) == EXIT_STOPPED and recorded_exit(tmp_path, 0) is None
