"""One owner per run: the run folder's lock against another live process, its release by the
kernel when the holder is SIGKILLed, and the refusal message (seconds, real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsa_dist.lock import OWNER_FILE, RunInUseError, RunLock, read_holder

HOLD = """
import sys, time
from lsa_dist.lock import RunLock
RunLock(sys.argv[1], "launch/local.py").acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_refuses_a_second_owner_and_its_death_frees_the_run(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "demo"
    holder = hold_in_another_process(run)
    try:
        with pytest.raises(RunInUseError) as err:
            RunLock(run, "launch/local.py").acquire()
        message = str(err.value)
        assert "\n" not in message and str(run) in message
        assert "launch/local.py (host " in message and f"pid {holder.pid}, since " in message
        assert json.loads((run / OWNER_FILE).read_text())["pid"] == holder.pid  # the record is untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(run, "python -m lsa_dist.train").acquire()  # the kernel released it with the process
    assert read_holder(run)["what"] == "python -m lsa_dist.train"
    lock.release()


def test_a_finished_slurm_job_on_record_does_not_hold_the_run(tmp_path: Path) -> None:
    """A job id that squeue does not know (long gone, or no SLURM here) is no owner."""
    run = tmp_path / "run"
    run.mkdir()
    (run / OWNER_FILE).write_text(json.dumps({"what": "launch/slurm.py", "slurm_job": "999999999", "pid": 1}))
    start = time.time()
    RunLock(run, "launch/local.py").acquire().release()
    assert time.time() - start < 30


OWN_AND_FORK = """
import multiprocessing, os, sys, time
from lsa_dist.lock import RunLock, hold_as_worker
RunLock(sys.argv[1], "python -m lsa_dist.train").acquire()
hold_as_worker(sys.argv[1])
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,), daemon=False)
child.start()  # as a DataLoader worker is: forked, alive for a while after its parent exits
print(child.pid, flush=True)
os._exit(0)  # as a worker ends (lsa_dist.dist.shutdown): no teardown of its children
"""


def test_a_forked_child_outliving_the_owner_does_not_hold_the_run(tmp_path: Path) -> None:
    """flock belongs to the open file, shared with forked children: they must not keep the run."""
    run = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", OWN_AND_FORK, str(run)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    child = int(owner.stdout.readline())  # the child keeps the pipe open: read the line, not to the end
    assert owner.wait(timeout=60) == 0
    try:
        os.kill(child, 0)  # still alive: the case under test
        lock = RunLock(run, "launch/local.py").acquire()  # neither the owner's lock nor the workers' is held
        assert read_holder(run)["what"] == "launch/local.py"
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)
