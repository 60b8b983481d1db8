"""The job side of launch/slurm.py: the callable submitit runs on every task."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from typing import Any

from .config import load_config

logger = logging.getLogger(__name__)


def requeue_refusal(requeues: int, max_requeues: int, step: int, first_step: int) -> str:
    """Why a job warned by USR2 is not requeued again ('' if it is): it has been requeued
    launch.slurm.max_requeues times, or this attempt trained no step (started at `first_step`,
    stopped at `step`): warned during its start-up, it would only start again."""
    resume = "the same launch/slurm.py command resumes the run from its checkpoint"
    if requeues >= max_requeues:
        return f"not requeued: requeued {requeues} times already (launch.slurm.max_requeues={max_requeues}); {resume}"
    if requeues and step <= first_step:
        return (
            f"not requeued: this attempt trained no step before the warning (step {step}); raise --time or "
            f"--signal-delay's room for start-up (launch.slurm.startup_s); {resume}"
        )
    return ""


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
        from .cli import EXIT_STOPPED
        from .log import EVERY_RANK, setup_logging
        from .redact import redact_output
        from .tracking import RUN_ID_ENV, end_run
        from .train import main

        redact_output()  # submitit's log and what libraries print lose their credentials
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        setup_logging(D.discover().rank)
        # the submission's copy, in every task's log
        logger.info(f"lsa_dist from {os.path.dirname(os.path.abspath(__file__))}", extra=EVERY_RANK)
        cfg = load_config(self.config_path)
        # the task's cores, less one for each of its loader workers
        threads = D.compute_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")), cfg.data.num_workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        if self.run_id:
            os.environ[RUN_ID_ENV] = self.run_id
        try:
            result = main(cfg)
        except Exception:
            if D.discover().rank == 0:  # failed before its tracker existed (a dataset missing on the nodes)
                end_run(cfg, self.run_id, "FAILED")  # (a run its tracker ended already stays as it is)
            raise
        if result.status == "stopped":
            # USR2 is SLURM's warning before preemption or the time limit: requeue, up to
            # launch.slurm.max_requeues times. Anything else (scancel's SIGTERM) stops the job
            # for good, its checkpoint kept.
            stopped = f"stopped by {result.stop_signal} after checkpointing at step {result.step}"
            if result.stop_signal in ("SIGUSR2", "by another rank"):
                refusal = requeue_refusal(
                    D.restart_count(), cfg.launch.slurm.max_requeues, result.step, result.first_step
                )
                if refusal:
                    raise RuntimeError(f"{stopped}; {refusal}")
                self._requeue(requeue)
                D.shutdown(EXIT_STOPPED)  # leave no result: the requeued job is the continuation
            raise RuntimeError(stopped)
        if dist.is_initialized():
            dist.destroy_process_group()
        return dataclasses.asdict(result)

    @staticmethod
    def _requeue(handler: Any) -> None:
        """Rank 0 requeues the job through submitit's handler (which pickles self.checkpoint()
        and runs `scontrol requeue`) while the other ranks wait for the outcome.

        Two races are closed here. A rank that exits before the requeue is through makes srun
        (--kill-on-bad-exit) end the step, and that SIGTERM killed rank 0's scontrol before
        it had asked: the job ended instead of coming back. And an accepted requeue ends the
        step at once, which can reach scontrol before it exits, so submitit recorded a failure
        for a job that was requeued. SIGTERM is ignored from here on (an ignored signal stays
        ignored across exec, so scontrol inherits it); SLURM's SIGKILL still ends the step.
        """
        from . import dist as D

        signal.signal(signal.SIGTERM, signal.SIG_IGN)

        def requeue() -> None:
            if not callable(handler):
                raise RuntimeError("submitit's USR2 handler is missing: the job cannot requeue itself")
            try:
                handler(signal.SIGUSR2, None)  # checkpoint, requeue, then sys.exit
            except SystemExit:
                pass  # submitit's way of saying the job is requeued

        D.rank0_acts(requeue, D.device_for(D.discover()), "requeueing the job after its checkpoint")

    def checkpoint(self) -> Any:
        """submitit's hook on preemption/timeout: the resubmitted job resumes from the latest
        checkpoint of the run (train.resume=auto), which the ranks have just written."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config_path, self.run_id))
