"""Distributed environment discovery and process-group setup.

Every launcher (launch/local.py, torchrun, launch/slurm.py through submitit) ends up setting
the torch.distributed environment variables; this module reads them, picks the backend
(NCCL on GPUs, gloo on CPUs) and the device, and shuts down cleanly.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from .config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


LAUNCHER_PID_ENV = "LSA_DIST_LAUNCHER_PID"  # set by launch/local.py for its workers


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def discover() -> DistEnv:
    """The process's place in the job, from the torch.distributed environment variables."""
    world = _int("WORLD_SIZE", 1)
    local_world = _int("LOCAL_WORLD_SIZE", world)
    return DistEnv(
        rank=_int("RANK", 0),
        world_size=world,
        local_rank=_int("LOCAL_RANK", 0),
        local_world_size=local_world,
        node_rank=_int("GROUP_RANK", _int("NODE_RANK", _int("RANK", 0) // max(1, local_world))),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int("MASTER_PORT", 29500),
    )


EXIT_RECORD_ENV = "LSA_EXIT_RECORD_DIR"  # where a local worker writes its exit code as it exits
RESTART_ENV = "LSA_RESTART_COUNT"  # set by lsa_dist.elastic for each start of the local workers


def restart_count() -> int:
    """How many times this job's workers were started again: by the local launcher
    (--max-restarts), torch's elastic agent or SLURM requeueing the job (preemption, time limit,
    node failure). 0 on the launch itself; a restart continues the run, whatever train.resume
    said at launch."""
    return max(_int(RESTART_ENV, 0), _int("TORCHELASTIC_RESTART_COUNT", 0), _int("SLURM_RESTART_COUNT", 0))


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local rendezvous or server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_precision(precision: str, device_type: str) -> None:
    """ConfigError unless this machine's device can train in `precision`: fp16 on a CPU needs
    AVX-512 FP16 or AMX-FP16 (DeepSpeed's CPU accelerator refuses it otherwise), bf16 on a GPU
    needs compute capability 8.0 or newer."""
    if device_type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"engine.precision: bf16 is not supported by {torch.cuda.get_device_name()}; use fp16 or fp32"
        )
    if device_type == "cpu" and precision == "fp16" and not cpu_has_fp16():
        raise ConfigError(
            "engine.precision: fp16 needs a GPU or a CPU with AVX-512 FP16 / AMX-FP16, which this one lacks; "
            "use bf16 or fp32"
        )


def compute_threads(cpus: int, loader_workers: int) -> int:
    """Intra-op threads of a training process that has `cpus` cores and is fed by
    `loader_workers` loader processes: each worker keeps a core, the rest compute (one at least)."""
    return max(1, cpus - loader_workers)


def check_local_ranks(ranks: int, gpus: int) -> None:
    """ConfigError when a machine with GPUs is asked for more processes than it has GPUs: two
    ranks on one GPU break NCCL's communicators."""
    if gpus and ranks > gpus:
        raise ConfigError(
            f"launch.nproc: {ranks} processes but this machine has {gpus} GPU{'s' if gpus > 1 else ''}; "
            f"one process a GPU: use --nproc {gpus} or fewer"
        )


def cpu_has_fp16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_settings() -> None:
    """Training's CUDA settings (benchmarks take them too): fp32 matmuls and convolutions on
    tensor cores (TF32, what the peak MFU is measured against), and cuDNN's fastest convolution
    for the run's fixed shapes."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def init(env: DistEnv, timeout_s: int = 600) -> torch.device:
    """Join the process group (always, also alone: the engines expect one) and return the device.

    Intra-op threads follow OMP_NUM_THREADS when a launcher set it (cores / local processes):
    two processes with all cores each ran ZeRO steps several times slower on a small machine.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # DeepSpeed sets its device from LOCAL_RANK: where each task sees only its own GPU (SLURM's
        # per-task binding) that is not a device here; make it name the one chosen above
        os.environ["LOCAL_RANK"] = str(device.index)
        cuda_settings()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,  # NCCL binds its communicator at once
        )
    return device


def barrier() -> None:
    """Wait for every rank (nothing to wait for alone or without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers across ranks (metrics)."""
    return _all_reduce(values, device, "sum")


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """The largest of a few numbers across ranks (slowest step, highest memory)."""
    return _all_reduce(values, device, "max")


def _all_reduce(values: list[float], device: torch.device, op: str) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (a stop request that reached only some ranks)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def is_main() -> bool:
    """Whether this process is rank 0 (or alone)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def rank0_acts(
    action: Callable[[], T], device: torch.device, what: str, error: type[Exception] = RuntimeError
) -> T | None:
    """Rank 0 runs `action` while the others wait, and every rank learns whether it failed: rank 0
    raises its own exception, the others `error` naming `what`. Returns rank 0's result (None
    elsewhere). A collective."""
    failure: Exception | None = None
    result = None
    if is_main():
        try:
            result = action()
        except Exception as err:  # noqa: BLE001 - re-raised below, after every rank has heard of it
            failure = err
    if any_rank(failure is not None, device):
        if failure is not None:
            raise failure
        raise error(f"{what} failed on rank 0; see rank 0's output")
    return result


def shutdown(code: int = 0) -> None:
    """Leave the process group and exit without the interpreter's teardown.

    With gloo, about 1 in 15 processes died with SIGABRT in interpreter teardown after
    training had finished; exiting right after destroy_process_group avoids it.
    """
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone must not change the exit code
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    record = os.environ.get(EXIT_RECORD_ENV)
    if record:  # the launcher may reap this process before it reads its status
        with contextlib.suppress(OSError):
            Path(record, f"rank{os.environ.get('RANK', '0')}").write_text(str(code))
    os._exit(code)
