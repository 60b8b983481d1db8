"""One owner per run: a lock in the run folder, released by the kernel when its holder dies.

`run_dir/.owner` is locked with flock(2) by whoever trains into the folder: launch/local.py
for its whole life (its workers inherit the ownership, told through LSA_DIST_RUN_OWNER), the
rank-0 task of a SLURM job, or rank 0 of a run started another way (torchrun). The file also
says who holds it (host, pid, SLURM job, since when), which is what a refused launch prints.
A launcher's workers also share-lock `.owner.workers`, so that workers still checkpointing
after their launcher died keep a new launch out until they have exited. A flock belongs to the
open file, which a forked child (a DataLoader worker) shares: the descriptors are closed in
every forked child, so that only the owner's own life holds the run.

A SLURM job owns its run from submission: the launcher records the job id in the same file,
and until that job has left the queue, a new launch (local or SLURM) is refused, so that it
can neither train into the folder nor rewrite the config the queued job will read; where squeue
cannot tell (no controller in reach), the launch is refused too: the lock fails closed. The lock
needs a file system with working, cluster-wide flock (local disks, NFSv4; Lustre mounted with
-o flock); one without flock, or mounted so that locks stay on one node, is refused by name.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .redact import first_line

OWNER_FILE = ".owner"
WORKERS_FILE = ".owner.workers"  # share-locked by every worker of a launcher that owns the run
OWNER_ENV = "LSA_DIST_RUN_OWNER"  # set for the workers of a launcher that holds the lock
QUEUED_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "PREEMPTED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
}


_HELD: set[int] = set()  # this process's lock descriptors: closed in forked children


def _close_held_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)  # the child's copy only: the parent's lock stays
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunInUseError(CheckpointError):
    """Another process or a queued SLURM job owns the run folder."""


def describe(holder: dict[str, Any]) -> str:
    who = f"SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else holder.get("what", "a launch")
    where = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    return f"{who} ({where}, since {holder.get('since', '?')})"


def read_holder(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / OWNER_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def slurm_job_id() -> str:
    """This process's SLURM job as squeue names it: <array job>_<task> for a task of a job
    array (a sweep), the job id otherwise; '' outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID", ""), os.environ.get("SLURM_ARRAY_TASK_ID", "")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def squeue_query(job_id: str) -> tuple[set[str] | None, str]:
    """(the states squeue gives for a job, empty once it has left the queue; or None where
    squeue cannot tell) and, for None, why not."""
    try:
        cmd = ["squeue", "-h", "-j", str(job_id), "-o", "%T"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None, "squeue is not installed here"
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"squeue failed: {first_line(err)}"
    if out.returncode == 0:
        return set(out.stdout.split()), ""
    if "invalid job id" in out.stderr.lower():  # the controller no longer knows it: gone
        return set(), ""
    return None, f"squeue failed: {first_line(RuntimeError(out.stderr.strip() or out.returncode))}"


def squeue_states(job_id: str) -> set[str] | None:
    """The states squeue gives for a job (empty: it has left the queue), or None where squeue
    cannot tell (not installed, the controller unreachable, no answer in 30 s)."""
    return squeue_query(job_id)[0]


def lock_scope_problem(mountinfo: str, path: Path) -> str:
    """Why flock on `path` would not exclude other nodes, from the mount that holds it (lines of
    /proc/self/mountinfo): NFS mounted with nolock or local_lock=flock|all, Lustre with localflock
    or noflock keep locks on the node that takes them. '' when nothing says so."""
    best: tuple[str, str, str] = ("", "", "")  # mount point, type, options
    target = str(Path(path).resolve())
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 6:
            continue
        point = fields[4].replace("\\040", " ")
        fstype, *rest = line.split(" - ", 1)[1].split()
        options = ",".join([fields[5], rest[1] if len(rest) > 1 else ""])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype, options)
    point, fstype, options = best
    local = {"nfs": {"nolock", "local_lock=flock", "local_lock=all"}, "lustre": {"localflock", "noflock"}}
    found = set(options.split(",")) & local.get(fstype.rstrip("4"), set())
    if found:
        return f"{point} is {fstype} mounted with {', '.join(sorted(found))}"
    return ""


class LockUnsupportedError(CheckpointError):
    """The run folder's file system cannot hold the run's lock across nodes."""


def check_lock_scope(run_dir: Path) -> None:
    """LockUnsupportedError when the run folder's mount keeps flocks on one node."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return
    problem = lock_scope_problem(mountinfo, run_dir)
    if problem:
        raise LockUnsupportedError(
            f"run folder {run_dir}: its locks would hold on one node only ({problem}); two nodes could train into "
            "it at once: put train.output_dir on a file system with cluster-wide flock (NFSv4 with lockd, "
            "Lustre with -o flock, or a local disk for a local run)"
        )


class RunLock:
    """The run folder's lock; `acquire` raises RunInUseError (a one-line user error, exit 2) naming
    the holder. Held until `release` or the process's death."""

    def __init__(self, run_dir: Path, what: str) -> None:
        self.run_dir, self.what = Path(run_dir), what
        self.fd: int | None = None

    def acquire(self, own_job: str = "") -> RunLock:
        """Take the lock; `own_job` is the SLURM job this process belongs to (its own record is no conflict)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.fd = self._take(own_job)
        _HELD.add(self.fd)
        self.record({"slurm_job": own_job} if own_job else {})
        return self

    def check_free(self) -> None:
        """RunInUseError if someone owns the run now; takes and changes nothing (a launcher asks
        first, so that a relaunch of a running run hears that, not what its config would do)."""
        if (self.run_dir / OWNER_FILE).exists():
            os.close(self._take(""))

    def _take(self, own_job: str) -> int:
        check_lock_scope(self.run_dir)
        fd = os.open(self.run_dir / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUseError(self._message(read_holder(self.run_dir))) from None
        except OSError as err:  # ENOSYS (Lustre without -o flock), ENOLCK (NFS without lockd), ...
            os.close(fd)
            raise LockUnsupportedError(
                f"run folder {self.run_dir}: its file system cannot lock files ({err.strerror}); the run's lock "
                "needs flock: use NFSv4 with lockd, Lustre mounted with -o flock, or a local disk"
            ) from None
        if not _no_workers_left(self.run_dir):
            os.close(fd)
            raise RunInUseError(
                f"run folder {self.run_dir}: worker processes of an earlier launch are still running in it "
                "(they checkpoint and exit within 30 s of their launcher's end); try again shortly"
            )
        holder = read_holder(self.run_dir)
        job = holder.get("slurm_job")
        if job and job != own_job:
            states, why = squeue_query(job)
            if states is None or states & QUEUED_STATES:
                os.close(fd)
                raise RunInUseError(self._message(holder, "queued") if states else self._unknown(holder, why))
        return fd

    def record(self, extra: dict[str, Any]) -> None:
        """Write who holds the lock (and, for a submission, the job that will) into the file."""
        assert self.fd is not None
        holder = {
            "what": self.what,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def _unknown(self, holder: dict[str, Any], why: str) -> str:
        """Ownership that cannot be decided: refused (a lock that failed open would let a launch
        train into, or rewrite the config of, a run a queued job will continue)."""
        return (
            f"run folder {self.run_dir} is in use by {describe(holder)} unless that job has ended, which cannot be "
            f"told here ({why}); run this where squeue reaches the cluster's controller, or remove "
            f"{self.run_dir / OWNER_FILE} once the job has surely ended"
        )

    def _message(self, holder: dict[str, Any], state: str = "running") -> str:
        return (
            f"run folder {self.run_dir} is in use by {describe(holder)}, {state}; wait for it to end, stop it "
            "(Ctrl-C, scancel), or give this launch another train.name"
        )


def _no_workers_left(run_dir: Path) -> bool:
    fd = os.open(Path(run_dir) / WORKERS_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def hold_as_worker(run_dir: Path, attempts: int = 100) -> None:
    """Share-lock the workers' file for this process's life (a launcher checking it holds it
    exclusively for an instant: retry for a few seconds)."""
    fd = os.open(Path(run_dir) / WORKERS_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    for _ in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            _HELD.add(fd)
            return  # the descriptor stays open: released when the process ends
        except BlockingIOError:
            time.sleep(0.05)
    os.close(fd)


def own_run(run_dir: Path, device: Any) -> RunLock | None:
    """A worker's side of ownership (a collective): rank 0 takes the run folder's lock unless its
    launcher holds it for the workers; a refusal (another launch or a queued SLURM job owns the
    run) ends every rank with RunInUseError (exit 2). Returns the lock rank 0 holds."""
    from . import dist as D

    if os.environ.get(OWNER_ENV):
        hold_as_worker(run_dir)
        return None
    job = slurm_job_id()
    what = "a SLURM job's rank 0" if job else "python -m lsa_dist.train"

    def take() -> RunLock:
        return RunLock(run_dir, what).acquire(own_job=job)

    return D.rank0_acts(take, device, f"taking {run_dir}'s lock", RunInUseError)
