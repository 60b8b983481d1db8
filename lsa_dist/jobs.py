"""The job side of launch/slurm.py: the callable submitit runs on every task."""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any

from .config import load_config


class TrainJob:
    """What submitit runs on every task of the job."""

    def __init__(self, config_path: str, run_id: str) -> None:
        self.config_path = config_path
        self.run_id = run_id

    def __call__(self) -> dict[str, Any]:
        import submitit
        import torch
        import torch.distributed as dist

        from . import dist as D
        from .tracking import RUN_ID_ENV
        from .train import PREEMPTED_EXIT, main

        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        os.environ["OMP_NUM_THREADS"] = str(cpus)
        torch.set_num_threads(cpus)
        if self.run_id:
            os.environ[RUN_ID_ENV] = self.run_id
        cfg = load_config(self.config_path)
        result = main(cfg)
        if result.status == "stopped":
            # USR2 is SLURM's warning before preemption or the time limit: requeue. Anything
            # else (scancel's SIGTERM) stops the job for good, its checkpoint kept.
            if result.stop_signal in ("SIGUSR2", "by another rank"):
                if env.rank == 0 and callable(requeue):
                    requeue(signal.SIGUSR2, None)  # calls self.checkpoint(), requeues, exits
                D.shutdown(PREEMPTED_EXIT)  # leave no result: the requeued job is the continuation
            raise RuntimeError(f"stopped by {result.stop_signal} after checkpointing at step {result.step}")
        if dist.is_initialized():
            dist.destroy_process_group()
        return dataclasses.asdict(result)

    def checkpoint(self) -> Any:
        """submitit's hook on preemption/timeout: the resubmitted job resumes from the latest
        checkpoint of the run (train.resume=auto), which the ranks have just written."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config_path, self.run_id))
