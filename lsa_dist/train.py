"""The one entry point every launcher ends in: `main(cfg)` (launch/local.py's workers,
launch/slurm.py's tasks, torchrun); each process finds its rank from the environment.

    python -m lsa_dist.train --config configs/demo.yaml [--log-dir DIR] [key=value ...]

runs one process (or, under torchrun, one of many).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from . import cli
from . import dist as D
from .config import RunConfig
from .log import EVERY_RANK, setup_logging
from .redact import redact_output, redact_text
from .trainer import Result, Trainer

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl(2)


def main(cfg: RunConfig) -> Result:
    """Train (or, with train.eval_only, evaluate) one run; every process of the job calls it."""
    trainer = Trainer(cfg)
    try:
        return trainer.evaluate_only() if cfg.train.eval_only else trainer.fit()
    except BaseException:
        trainer.sinks.tracker.finish("FAILED")  # what was logged is sent; the run does not stay RUNNING
        raise


def run_worker(cfg: RunConfig) -> int:
    """main(cfg) with the exit protocol launchers rely on (lsa_dist.cli's exit codes), leaving
    the process group and exiting without the interpreter's teardown."""
    try:
        result = main(cfg)
    except cli.USER_ERRORS as err:
        code = cli.fail(err)
    except Exception:
        logger.error(redact_text(traceback.format_exc()).rstrip("\n"))
        code = cli.EXIT_CRASH
    else:
        code = cli.EXIT_OK if result.status == "finished" else cli.EXIT_STOPPED
    D.shutdown(code)
    return code


def append_output_to(log_dir: Path) -> None:
    """Send this process's stdout and stderr to log_dir/rank<RANK>.log, appended, so that a
    resumed or restarted run keeps the earlier attempts' lines."""
    log_dir.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    fd = os.open(log_dir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    restart = D.restart_count()
    if restart:  # in each rank's own log, not rank 0's alone
        logger.info(f"--- restart {restart} of this job's workers ---", extra=EVERY_RANK)


def die_with_launcher() -> None:
    """A worker of launch/local.py gets SIGTERM (checkpoint and stop) when the launcher dies,
    however it dies (SIGKILL, a closed terminal): no worker outlives it by more than a stop."""
    launcher = os.environ.get(D.LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(launcher):  # it died before the line above: nobody will signal us
        os.kill(os.getpid(), signal.SIGTERM)


def command(argv: list[str] | None = None) -> int:
    die_with_launcher()
    parser = cli.config_parser(__doc__, config_required=False)
    parser.add_argument("--log-dir", type=Path, default=None, help="append this rank's output to DIR/rank<r>.log")
    args = parser.parse_args(argv)
    setup_logging(D.discover().rank)
    if args.log_dir is not None:
        append_output_to(args.log_dir)
    redact_output()  # what libraries print (a connection error's URL) loses its credentials
    try:
        cfg = cli.load(args)
    except cli.USER_ERRORS as err:
        return cli.fail(err)
    return run_worker(cfg)


if __name__ == "__main__":
    sys.exit(command())


__all__ = ["Result", "main", "run_worker"]
