#!/usr/bin/env python
"""Train on this machine with N processes.

    python launch/local.py --config configs/demo.yaml [--nproc N] [--max-restarts K] [key=value ...]

Checks the config, the dataset, the device's support for engine.precision and the checkpoint
to resume before anything starts, prepares MLflow, then starts N workers through torch's
elastic launcher (a c10d rendezvous on a free local port). Rank 0's output streams here; every
rank's output is appended to RUN/logs/rank<r>.log. If a worker dies, the others are stopped at
once and the first failing rank's last lines are shown; with --max-restarts K the workers are
restarted from the run's last checkpoint instead, up to K times. Ctrl-C (or SIGTERM) is
forwarded: the workers checkpoint and stop, and the same command resumes the run.

Exit codes: 0 done, 1 crash, 2 bad input, 3 stopped (after checkpointing, or during start-up).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsa_dist import cli  # noqa: E402
from lsa_dist import dist as D  # noqa: E402
from lsa_dist.config import RunConfig  # noqa: E402
from lsa_dist.elastic import Echo, Outcome, SurvivingStdout, WorkerExit, run_workers, tail  # noqa: E402
from lsa_dist.lock import OWNER_ENV, RunLock  # noqa: E402
from lsa_dist.log import setup_logging  # noqa: E402
from lsa_dist.redact import redact_output, redact_text  # noqa: E402
from lsa_dist.resume import take_lineage  # noqa: E402
from lsa_dist.tracking import PENDING, RUN_ID_ENV, end_run, tracking_uri  # noqa: E402

logger = logging.getLogger("lsa_dist.launch.local")  # under the library's logger: one setup shows both


def worker_environment(nproc: int, loader_workers: int, run_id: str) -> None:
    """What the workers inherit besides the agent's RANK, WORLD_SIZE, MASTER_ADDR, ...: among
    them intra-op threads, this machine's cores shared by the workers less their loader workers'."""
    threads = D.compute_threads((os.cpu_count() or 1) // nproc, loader_workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ[D.LAUNCHER_PID_ENV] = str(os.getpid())  # the workers stop when this process dies
    os.environ.setdefault("LSA_PROGRESS", "1" if sys.stdout.isatty() else "0")  # workers write to files
    if run_id:
        os.environ[RUN_ID_ENV] = run_id
    else:
        os.environ.pop(RUN_ID_ENV, None)


def announce_restart(failure: WorkerExit | None, restart: int, max_restarts: int) -> None:
    why = f"rank {failure.rank} failed ({failure.describe()})" if failure else "the workers ended"
    logger.warning(f"\n{why}; restarting the workers from the last checkpoint ({restart} of {max_restarts})")


def launch(cfg: RunConfig, config_path: Path, run_id: str, stop_timeout: int) -> tuple[Outcome, dict[int, int]]:
    """Start the workers and wait for them; returns how they ended and where each rank's log
    stood before they started (what this launch wrote comes after)."""
    nproc, logs = cfg.launch.nproc, cfg.run_dir.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    offsets = {
        r: (logs / f"rank{r}.log").stat().st_size if (logs / f"rank{r}.log").exists() else 0 for r in range(nproc)
    }
    worker_environment(nproc, cfg.data.num_workers, run_id)
    args = ["-m", "lsa_dist.train", "--config", str(config_path), "--log-dir", str(logs)]
    with Echo(logs / "rank0.log"):
        outcome = run_workers(
            nproc, args, max_restarts=cfg.launch.max_restarts, stop_timeout=stop_timeout, on_restart=announce_restart
        )
    return outcome, offsets


def report(cfg: RunConfig, outcome: Outcome, offsets: dict[int, int], run_id: str) -> int:
    """Say how the run ended and where to look; returns the launcher's exit code. These lines
    are the command's result, printed as they are, like cli.fail's error line."""
    run_dir = cfg.run_dir
    if outcome.launcher_signal:
        print(f"\n{outcome.launcher_signal}: the workers were asked to checkpoint and stop", file=sys.stderr)
    failures = outcome.failures()
    if failures:
        end_run(cfg, run_id, "FAILED")  # rank 0 may have died without a word to MLflow
        first = failures[0]
        print(f"\nerror: rank {first.rank} failed ({first.describe()}); its last lines:", file=sys.stderr)
        if first.rank != 0 or first.code != cli.EXIT_BAD_INPUT:  # rank 0's one-line error is already shown
            log = run_dir / "logs" / f"rank{first.rank}.log"
            print("\n".join(tail(log, offsets.get(first.rank, 0))), file=sys.stderr)
        if len(failures) > 1:
            print(
                f"then stopped: {', '.join(f'rank {e.rank} ({e.describe()})' for e in failures[1:])}", file=sys.stderr
            )
        print(f"all logs: {run_dir / 'logs'}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT if first.code == cli.EXIT_BAD_INPUT else cli.EXIT_CRASH
    if outcome.stopped:
        if all(e.code == cli.EXIT_STOPPED for e in outcome.exits):
            print(f"stopped after checkpointing; run the same command to resume ({run_dir / 'checkpoints'})")
        else:  # a worker still starting up ended by the signal itself: nothing new to save yet
            end_run(cfg, run_id, "KILLED")
            print(f"stopped during start-up; run the same command to resume ({run_dir / 'checkpoints'})")
        return cli.EXIT_STOPPED
    restarted = f" after {outcome.restarts} restart(s)" if outcome.restarts else ""
    print(f"\nrun folder{restarted}: {run_dir} (metrics.jsonl, checkpoints/, model.pt, logs/)")
    if run_id and run_id != PENDING:
        print(f"MLflow: mlflow ui --backend-store-uri {redact_text(tracking_uri(cfg))}  (run {run_id})")
    return cli.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__)
    parser.add_argument("--nproc", type=int, default=None, help="worker processes (default: launch.nproc)")
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        help="after a worker crash, restart all workers from the last checkpoint, up to N times "
        "(default: launch.max_restarts)",
    )
    parser.add_argument(
        "--stop-timeout", type=int, default=300, help="seconds the workers get to checkpoint after Ctrl-C (300)"
    )
    args = parser.parse_args(argv)
    redact_output()
    sys.stdout = SurvivingStdout(sys.stdout)  # a closed pipe (| head) must not end the run
    setup_logging(0)
    flags = {"launch.nproc": args.nproc, "launch.max_restarts": args.max_restarts}
    try:
        cfg = cli.load(args, *(f"{k}={v}" for k, v in flags.items() if v is not None))
        lock = RunLock(cfg.run_dir, "launch/local.py")
        lock.check_free()  # a run in use is refused as such, before what its config would do is checked
        plan = cli.preflight(cfg, cfg.launch.nproc)
        lock.acquire()  # held until this process ends
        take_lineage(plan, cfg.run_dir)  # before any worker starts: no restart sees the lineage left
    except cli.USER_ERRORS as err:
        return cli.fail(err)
    os.environ[OWNER_ENV] = "1"  # the workers train under this process's ownership
    config_path, run_id = cli.prepare_run(cfg, plan.run_id, "launch_config.yaml")
    if run_id:
        logger.info(f"MLflow run {run_id} ({cfg.tracking.experiment})")
    outcome, offsets = launch(cfg, config_path, run_id, args.stop_timeout)
    return report(cfg, outcome, offsets, run_id)


if __name__ == "__main__":
    sys.exit(main())
