"""The front door every entry point shares: `--config` and `key=value` overrides, one-line
errors with exit code 2, the checks made before any process starts, and MLflow preparation.

Used by launch/local.py, launch/slurm.py, `python -m lsa_dist.train` and the tools that take a
config. Exit codes, for launchers, workers and tools alike: 0 done, 1 crash (a traceback),
2 bad input (one line on stderr), 3 stopped on request after checkpointing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ConfigError, RunConfig, load_config, to_yaml
from .data import DatasetError, dataset_identity, load_dataset_info
from .dist import check_local_ranks, check_precision
from .fs import OWNER_ONLY, atomic_write_text
from .redact import redact_text
from .resume import ResumePlan, plan_resume
from .tracking import prepare

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CRASH = 1  # a traceback: a bug, or a failure of the machine
EXIT_BAD_INPUT = 2  # a one-line error naming the config key, file or checkpoint to fix
EXIT_STOPPED = 3  # stopped on request after checkpointing: the same command resumes

# what a user can fix from the message alone
USER_ERRORS = (ConfigError, DatasetError, CheckpointError)


def config_parser(doc: str, config_required: bool = True) -> argparse.ArgumentParser:
    """An argument parser with --config and key=value overrides; `doc` (the entry point's
    docstring) gives the description (its first paragraph) and the epilog (the rest)."""
    first, _, rest = doc.strip().partition("\n\n")
    parser = argparse.ArgumentParser(
        description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=config_required, help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=1e-3")
    return parser


def fail(err: BaseException) -> int:
    """Print `error: <message>` on one line and return the bad-input exit code. A print, not a
    log record: the line and exit code are the protocol launchers and tools rely on, shown even
    where logging was never set up or a library reconfigured it."""
    print(f"error: {redact_text(str(err))}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def load(args: argparse.Namespace, *extra: str) -> RunConfig:
    """The config of --config with the command line's overrides, then `extra` (flags that
    stand for config keys, such as --nproc); ConfigError if it cannot run."""
    return load_config(args.config, [*args.overrides, *extra])


def preflight(cfg: RunConfig, world_size: int, *, dataset: bool = True, hardware: bool = True) -> ResumePlan:
    """The checks made before any process starts or any job is queued: the dataset can give
    every one of `world_size` ranks a batch (`dataset`), this machine's device can train in
    engine.precision (`hardware`: only where the workers run here), and the resume plan
    (lsa_dist.resume: lineage, a readable checkpoint, the same mathematics; any number of
    ranks may continue it). The launcher carries out the plan's lineage decision once it
    holds the run's lock (`resume.take_lineage`)."""
    dataset = dataset and not cfg.train.synthetic
    if dataset:
        load_dataset_info(cfg.data.root).check_size(cfg.data.train_split, world_size, cfg.data.batch_size)
    if hardware:
        check_precision(cfg.engine.precision, "cuda" if torch.cuda.is_available() else "cpu")
        check_local_ranks(world_size, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    plan = plan_resume(cfg, world_size, dataset_identity(cfg.data.root) if dataset else "")
    if plan.folder is not None and plan.saved_world_size != world_size:
        logger.info(
            f"resuming {plan.folder} (written by {plan.saved_world_size} ranks) on {world_size} ranks: the epoch in "
            "progress goes on with the samples it has not read, re-split over the new ranks"
        )
    return plan


def prepare_run(cfg: RunConfig, previous_run_id: str, config_name: str) -> tuple[Path, str]:
    """Write the resolved config into the run folder (what the workers and a requeued job read)
    and prepare MLflow (database, experiment and run) once, before any worker starts.
    Returns (config path, MLflow run id or '' when tracking is off or unreachable)."""
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / config_name
    atomic_write_text(path, to_yaml(cfg), OWNER_ONLY)
    return path, prepare(cfg, previous_run_id)
