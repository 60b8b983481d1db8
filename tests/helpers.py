"""Shared pieces of the end-to-end tests: the tiny model config and the local launcher."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# configs/demo.yaml shrunk to a 16-wide, 3-block LSA in fp32: fast real training runs (a CPU
# without bf16 units emulates bf16 matmuls, ~3x slower steps); tests of bf16 ask for it
TINY = [
    "engine.precision=fp32",
    "model.options.widths=[16,16]",
    "model.options.heads=[2,2]",
    "model.options.depths=[2,1]",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.num_workers=0",
    "optim.epochs=2",
    "optim.warmup_epochs=0.5",
    "tracking.log_every=1",
    "tracking.attention_maps=0",  # drawn where a test asks for them (test_tracking)
]

# the paper's training recipe (DeiT's, as lsa_tiny.yaml has it) on the demo images: the
# randomness that resume and reproducibility must survive
PAPER_RECIPE = [
    "model.drop_path_rate=0.1",
    "data.augment.recipe=imagenet",
    "data.augment.hflip=0.5",
    "data.augment.rand_augment=rand-m9-mstd0.5-inc1",
    "data.augment.reprob=0.25",
    "data.augment.mixup=0.8",
    "data.augment.cutmix=1.0",
    "data.augment.label_smoothing=0.1",
]


def local_command(tmp: Path, name: str, data: Path, *overrides: str, nproc: int = 2) -> list[str]:
    """launch/local.py on the demo config with TINY, then `overrides` (which win)."""
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    return cmd + [
        "--nproc",
        str(nproc),
        f"data.root={data}",
        f"train.output_dir={tmp}",
        f"train.name={name}",
        *TINY,
        *overrides,
    ]


def run_local(
    tmp: Path, name: str, data: Path, *overrides: str, nproc: int = 2, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    return subprocess.run(
        local_command(tmp, name, data, *overrides, nproc=nproc),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
        env=env,
    )


def worker_of_rank(run_dir: Path, rank: int) -> int:
    """The pid of launch/local.py's worker of rank `rank` (RANK in its environment; not one of
    its DataLoader processes, which share its command line and environment)."""
    out = subprocess.run(["pgrep", "-f", f"{run_dir}/launch_config.yaml"], capture_output=True, text=True).stdout
    pids = set(map(int, out.split()))
    for pid in sorted(pids):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ and parent not in pids:
            return pid
    raise AssertionError(f"no worker of rank {rank} for {run_dir}")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc), parents before their children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(_parent(int(entry.name)), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        found = children.get(todo.pop(0), [])
        out += found
        todo += found
    return out


@contextlib.contextmanager
def held_still(pid: int) -> Iterator[list[int]]:
    """`pid` and every process below it stopped (SIGSTOP) for the block, continued after it: what a
    test checks meanwhile cannot race the run on a busy host."""
    pids = [pid, *descendants(pid)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


def _pending(pid: int, sig: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (sig - 1) & 1 for mask in masks)


def signal_local_run(launcher: int, sig: int, timeout: float = 60) -> None:
    """`sig` to launch/local.py's process group, as a scheduler or `timeout` sends it, with its
    workers held still until the launcher has forwarded it to each of them (they lead their own
    process groups): every rank sees the signal at the step it had reached, however busy the host."""
    with held_still(launcher) as pids:
        ranks = []
        for pid in pids:
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if _parent(pid) == launcher and any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in environ):
                    ranks.append(pid)
        os.killpg(launcher, sig)
        os.kill(launcher, signal.SIGCONT)  # the launcher alone runs on, and forwards it
        deadline = time.time() + timeout
        while not all(_pending(pid, sig) for pid in ranks):
            if time.time() > deadline:
                raise AssertionError(f"the launcher did not forward signal {sig} to its workers {ranks}")
            time.sleep(0.01)
