"""One owner per run: the run folder's lock against another live process, its release by the
kernel when the holder is SIGKILLed, and the refusal message (seconds, real processes)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lsa_dist.lock import (
    OWNER_FILE,
    LockUnsupportedError,
    RunInUseError,
    RunLock,
    lock_scope_problem,
    read_holder,
)

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


def test_a_slurm_job_on_record_that_squeue_cannot_check_keeps_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails closed: where squeue is missing, or cannot reach a controller, a job on record
    might still be queued, so the launch is refused in one line saying why and the way out.
    (A job that has left a reachable controller's queue frees the run: test_slurm.py.)"""
    run = tmp_path / "run"
    run.mkdir()
    record = json.dumps({"what": "launch/slurm.py", "slurm_job": "4242", "host": "login1", "pid": 1})
    (run / OWNER_FILE).write_text(record)
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    with pytest.raises(RunInUseError) as err:
        RunLock(run, "launch/local.py").acquire()
    message = str(err.value)
    assert "is in use by SLURM job 4242 (host login1" in message and "(squeue is not installed here)" in message
    assert f"remove {run / OWNER_FILE} once the job has surely ended" in message and "\n" not in message
    assert read_holder(run)["slurm_job"] == "4242"  # nothing taken or rewritten
    squeue = shutil.which("squeue", path=os.defpath + ":/usr/bin:/usr/local/bin")
    if squeue:  # installed, but no controller in reach
        monkeypatch.setenv("PATH", str(Path(squeue).parent))
        monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nowhere.conf"))
        with pytest.raises(RunInUseError, match="squeue failed: "):
            RunLock(run, "launch/local.py").acquire()
    (run / OWNER_FILE).unlink()  # the way out the message names
    RunLock(run, "launch/local.py").acquire().release()


MOUNTS = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 27 0:50 / /home rw,relatime - nfs4 srv:/home rw,vers=4.2,local_lock=none,addr=10.0.0.1
41 27 0:51 / /scratch rw,relatime - nfs srv:/scratch rw,vers=3,nolock,local_lock=all
42 27 0:52 / /lustre rw - lustre 10.0.0.2@tcp:/fs rw,localflock
43 27 0:53 / /lustre/proj rw - lustre 10.0.0.2@tcp:/proj rw,flock
"""


@pytest.mark.parametrize(
    "path,problem",
    [
        ("/home/me/runs/a", ""),
        ("/tmp/runs/a", ""),
        ("/scratch/me/runs/a", "/scratch is nfs mounted with local_lock=all, nolock"),
        ("/lustre/me/a", "/lustre is lustre mounted with localflock"),
        ("/lustre/proj/a", ""),
    ],
)
def test_a_mount_that_keeps_locks_on_one_node_is_named(path: str, problem: str) -> None:
    assert lock_scope_problem(MOUNTS, Path(path)) == problem


def test_a_file_system_without_flock_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lustre without -o flock answers ENOSYS, NFS without lockd ENOLCK (simulated: neither
    file system is here): a one-line error naming the fix, not a traceback."""
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LockUnsupportedError) as err:
        RunLock(tmp_path / "run", "launch/local.py").acquire()
    assert "cannot lock files (No locks available)" in str(err.value) and "\n" not in str(err.value)


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
