#!/usr/bin/env python
"""Train on this machine with N processes.

    python launch/local.py --config configs/demo.yaml [--nproc N] [key=value ...]

Validates the config before anything starts, prepares MLflow (database, experiment, run),
then starts N workers with a torchrun-style rendezvous on 127.0.0.1 and a free port. Rank 0's
output streams here; every rank's output goes to RUN/logs/rank<r>.log. If a worker dies, the
others are stopped at once and its last lines are shown. Ctrl-C (or SIGTERM) is forwarded:
the workers checkpoint and stop, and the same command resumes the run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsa_dist.config import ConfigError, RunConfig, load_config, to_yaml  # noqa: E402

WORKER = (
    "import sys; from lsa_dist.config import load_config; from lsa_dist.train import run_worker; "
    "sys.exit(run_worker(load_config(sys.argv[1])))"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, nproc: int, port: int, run_id: str) -> dict[str, str]:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
        PYTHONUNBUFFERED="1",
    )
    if run_id:
        env["LSA_MLFLOW_RUN_ID"] = run_id
    env.setdefault("LSA_PROGRESS", "1" if rank == 0 and sys.stdout.isatty() else "0")
    return env


def _pump(stream, log: Path, echo: bool, tail: deque) -> None:  # noqa: ANN001
    """Copy a worker's output to its log (and rank 0's to our terminal, progress bars included)."""
    with log.open("ab") as f:
        for chunk in iter(lambda: stream.read1(65536), b""):
            f.write(chunk)
            f.flush()
            tail.extend(chunk.decode(errors="replace").splitlines(keepends=True))
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()


def launch(cfg: RunConfig, nproc: int) -> int:
    """Run the job; returns the exit code (0 done, 3 stopped after checkpointing, else failure)."""
    from lsa_dist.checkpoint import CheckpointError, run_id_to_continue
    from lsa_dist.data import DatasetError, load_dataset_info
    from lsa_dist.tracking import prepare

    run_dir = cfg.run_dir
    try:
        info = load_dataset_info(cfg.data.root)
        info.check_size(cfg.data.train_split, nproc, cfg.data.batch_size)
        previous = run_id_to_continue(run_dir, cfg.train.resume)
    except (DatasetError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "launch_config.yaml"
    resolved.write_text(to_yaml(cfg))
    run_id = prepare(cfg, previous)
    if run_id:
        print(f"MLflow run {run_id} ({cfg.tracking.experiment})")
    port = free_port()
    procs, tails, pumps = [], [], []
    for rank in range(nproc):
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(resolved)],
            env=worker_env(rank, nproc, port, run_id),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the workers only through us
        )
        tail: deque = deque(maxlen=30)
        pump = threading.Thread(target=_pump, args=(proc.stdout, run_dir / "logs" / f"rank{rank}.log", rank == 0, tail))
        pump.start()
        procs.append(proc)
        tails.append(tail)
        pumps.append(pump)

    forwarded = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        print(f"\n{signal.Signals(signum).name}: asking the workers to checkpoint and stop", file=sys.stderr)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    died: dict[int, float] = {}  # rank -> when it exited: the first failure is the cause

    def watch(rank: int, proc: subprocess.Popen) -> None:
        proc.wait()
        died[rank] = time.monotonic()

    watchers = [threading.Thread(target=watch, args=(r, p), daemon=True) for r, p in enumerate(procs)]
    for w in watchers:
        w.start()
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [r for r in died if procs[r].returncode not in (0, 3)]
            if bad and failed is None:
                failed = min(bad, key=died.get)
                for other in procs:
                    if other.poll() is None:
                        other.kill()
            time.sleep(0.1)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for w in watchers:
            w.join(timeout=10)
        for pump in pumps:
            pump.join(timeout=10)
    codes = [p.returncode for p in procs]
    if failed is None and any(c not in (0, 3) for c in codes):
        failed = min((r for r, c in enumerate(codes) if c not in (0, 3)), key=lambda r: died.get(r, 0.0))
    if failed is not None:
        code = codes[failed]
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        print(f"\nerror: rank {failed} failed ({how}); its last lines:", file=sys.stderr)
        if failed != 0 or code != 2:
            sys.stderr.write("".join(line for line in tails[failed] if "\r" not in line))
        others = [
            f"rank {r} ({'signal ' + str(-c) if c < 0 else 'exit ' + str(c)})"
            for r, c in enumerate(codes)
            if r != failed and c not in (0, 3)
        ]
        if others:
            print(f"then stopped: {', '.join(others)}", file=sys.stderr)
        print(f"all logs: {run_dir / 'logs'}", file=sys.stderr)
        return 2 if code == 2 else 1
    if 3 in codes:
        print(f"stopped after checkpointing; run the same command to resume ({run_dir / 'checkpoints'})")
        return 3
    print(f"\nrun folder: {run_dir} (metrics.jsonl, checkpoints/, model.pt, logs/)")
    if run_id:
        from lsa_dist.tracking import tracking_uri

        print(f"MLflow: mlflow ui --backend-store-uri {tracking_uri(cfg)}  (run {run_id})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--nproc", type=int, default=None, help="worker processes (default: launch.nproc)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.nproc is not None:
        overrides.append(f"launch.nproc={args.nproc}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return launch(cfg, cfg.launch.nproc)


if __name__ == "__main__":
    sys.exit(main())
