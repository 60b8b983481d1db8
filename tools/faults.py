#!/usr/bin/env python
"""Fault matrix: the signals a cluster sends, at each phase of a run, with each shard reader,
and whether every one ends well.

    python tools/faults.py --config configs/demo.yaml [--all] [--limit N] [--slurm] [--json faults.json] [key=value ...]

A cell is (signal, target, phase, reader): SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2 or SIGKILL,
sent to launch/local.py alone or to its whole process group, during start-up, mid-training,
during an evaluation or while a checkpoint is written, with shards read from local WebDataset
tars, through a `pipe:` command, over http (curl) or from FFCV files. Each cell starts the run,
waits for its phase (a state: the workers exist, a new step, the epoch's last step with a slow
evaluation after it, a checkpoint being staged), sends the signal, then runs the same command
until the run finishes, and compares its weights with an uninterrupted run (WebDataset readers;
on FFCV, whose compiled decoder draws its crops unseeded, no two runs are equal, and the check is
that every step was trained once, in order).

Expected: a stop signal checkpoints and exits 3; SIGKILL kills the launcher (its workers
checkpoint and stop on their own); either way the same command resumes, and the final weights
equal the uninterrupted run's tensor by tensor. By default a covering subset runs: every pair
of values of any two dimensions in at least one cell; `--all` runs the full product. Prints a
table (and writes JSON); exit 0 only if every cell ended as expected.

With `--slurm` (a SLURM cluster reachable from this shell, with an `urgent` partition that
preempts the default one, as tools/slurm_cluster.sh starts it), four SLURM cells follow, each on
a 2-node job submitted with `launch/slurm.py --wait` and faulted mid-training: `scancel`
(expected: a stop checkpoint, not requeued; resubmitting finishes the run), `scancel
--signal=USR2` and a preemption by an urgent job (expected: a checkpoint, a requeue, and the job
finishes by itself), and one task SIGKILLed (expected: the job fails; resubmitting resumes from
the last periodic checkpoint). Their weights are compared with the same uninterrupted run.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from chaos import compare, last_step, latest_checkpoint, processes_of  # noqa: E402

from lsa_dist import cli  # noqa: E402

SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL")
TARGETS = ("launcher", "group")
PHASES = ("start-up", "training", "evaluation", "checkpoint")
READERS = ("wds", "pipe", "http", "ffcv")
# an evaluation long enough to be signalled in (the training split, 2 images a batch), every
# step logged (so the epoch's last one is seen), no MLflow
FIXED = ("data.val_split=train", "data.eval_batch_size=2", "tracking.log_every=1", "tracking.enabled=false")


@dataclass
class Cell:
    signal: str
    target: str
    phase: str
    reader: str
    expected: str = ""
    observed: str = ""
    stop_step: int | None = None  # the checkpoint the stop wrote (a stop signal)
    relaunches: int = 0
    identical: str = ""  # "126/126" tensors equal to the uninterrupted run's; FFCV: "steps once"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        same, _, total = self.identical.partition("/")
        return self.observed == self.expected and (self.identical == "steps once" or bool(total) and same == total)


def covering(seed: int) -> list[Cell]:
    """Cells such that every pair of values of any two dimensions is in one of them (greedy,
    from a seeded order of the full product)."""
    dims = (SIGNALS, TARGETS, PHASES, READERS)
    product = list(itertools.product(*dims))
    random.Random(seed).shuffle(product)

    def pairs(cell: tuple) -> set:
        return {(i, cell[i], j, cell[j]) for i, j in itertools.combinations(range(len(dims)), 2)}

    left = set().union(*(pairs(c) for c in product))
    chosen = []
    while left:
        best = max(product, key=lambda c: len(pairs(c) & left))
        chosen.append(best)
        left -= pairs(best)
    return [Cell(*c) for c in sorted(chosen, key=lambda c: [d.index(v) for d, v in zip(dims, c)])]


class ShardServer:
    """The dataset's shards over http on a free local port, in this process (outside the
    launcher's process group)."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *a: None  # type: ignore[method-assign]
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def reader_overrides(reader: str, root: Path, server: ShardServer) -> list[str]:
    return {
        "wds": [],
        "pipe": [f"data.urls=pipe:cat {root}/wds/{{shard}}"],
        "http": [f"data.urls={server.url}/wds/{{shard}}"],
        "ffcv": ["data.format=ffcv"],
    }[reader]


def command(args: argparse.Namespace, out: Path, name: str, extra: list[str]) -> list[str]:
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--config", str(args.config), "--nproc", str(args.nproc)]
    return cmd + [*args.overrides, *FIXED, *extra, f"train.output_dir={out}", f"train.name={name}"]


def reached(phase: str, run_dir: Path, steps_per_epoch: int) -> bool:
    """Whether the run is in `phase` now (each a state, never a delay)."""
    if phase == "start-up":
        return bool(processes_of(run_dir))
    if phase == "training":
        return last_step(run_dir) >= 2
    if phase == "evaluation":  # the epoch's last step is logged; its evaluation runs now
        return last_step(run_dir) >= steps_per_epoch
    staging = run_dir / "checkpoints" / ".staging"
    return staging.is_dir() and any(staging.iterdir())


def run_cell(args: argparse.Namespace, cell: Cell, out: Path, extra: list[str], steps_per_epoch: int) -> None:
    """Start the run, signal it in its phase, then finish it with the same command."""
    name = f"{cell.signal}-{cell.target}-{cell.phase}-{cell.reader}".lower()
    cmd, run_dir, start = command(args, out, name, extra), out / name, time.time()
    cell.expected = "killed" if cell.signal == "SIGKILL" else "stopped (exit 3)"
    with (out / f"{name}.log").open("w") as log:
        launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while launcher.poll() is None and not reached(cell.phase, run_dir, steps_per_epoch):
            time.sleep(0.005)
        if launcher.poll() is not None:
            cell.observed = f"ended before its phase (exit {launcher.returncode})"
            return
        sig = signal.Signals[cell.signal]
        os.killpg(launcher.pid, sig) if cell.target == "group" else launcher.send_signal(sig)
        code = launcher.wait(timeout=600)
    deadline = time.time() + 60
    while processes_of(run_dir) and time.time() < deadline:  # SIGKILL: the workers stop on their own
        time.sleep(0.1)
    cell.observed = {3: "stopped (exit 3)", -signal.SIGKILL: "killed"}.get(code, f"exit {code}")
    cell.stop_step = latest_checkpoint(run_dir)
    for cell.relaunches in range(1, 4):
        finish = subprocess.run(cmd, capture_output=True, text=True)
        if finish.returncode == 0:
            break
    else:
        cell.identical = "0/0"
        return
    cell.identical = compared(cell, out, run_dir)
    cell.seconds = round(time.time() - start, 1)


def compared(cell: Cell, out: Path, run_dir: Path) -> str:
    """WebDataset readers: "same/total" tensors equal to the uninterrupted run's. FFCV draws its
    crops unseeded in its compiled decoder, so no two FFCV runs are equal: "steps once" when
    the finished run logged every step exactly once, in order (nothing lost or trained twice)."""
    if cell.reader != "ffcv":
        same, total = compare(out / "reference-wds" / "model.pt", run_dir / "model.pt")
        return f"{same}/{total}"
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in rows if '"train/loss"' in line]
    reference = steps_of(out / "reference-ffcv", epoch=2)
    return "steps once" if steps == list(range(1, reference + 1)) else f"steps {len(steps)} of {reference}"


def references(args: argparse.Namespace, out: Path, server: ShardServer, root: Path) -> None:
    """The uninterrupted runs the cells are compared with: one for the WebDataset readers (local,
    pipe and http read the same samples), one for FFCV."""
    for kind in ("wds", "ffcv"):
        with (out / f"reference-{kind}.log").open("w") as log:
            cmd = command(args, out, f"reference-{kind}", reader_overrides(kind, root, server))
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"the uninterrupted {kind} run failed (exit {proc.returncode}); see {log.name}")


SLURM_FAULTS = {  # a fault sent to a running job -> how the cell must end
    "scancel": "stopped, not requeued",
    "scancel --signal=USR2": "requeued, finished",
    "preemption": "requeued, finished",
    "task SIGKILL": "failed",
}


def slurm_command(args: argparse.Namespace, out: Path, name: str) -> list[str]:
    """A 2-node job of one task each (the same 2 ranks as the local reference), waited for."""
    cmd = [sys.executable, str(ROOT / "launch" / "slurm.py"), "--config", str(args.config), "--wait"]
    cmd += ["--nodes", str(args.nproc), "--cpus-per-task", "1", "--time", "30"]  # the threads of a local rank here
    return cmd + [*args.overrides, *FIXED, f"train.output_dir={out}", f"train.name={name}"]


def submitted_job(log: Path, launcher: subprocess.Popen) -> str:
    while launcher.poll() is None:
        found = re.search(r"submitted job (\d+)", log.read_text())
        if found:
            return found.group(1)
        time.sleep(0.2)
    raise SystemExit(f"launch/slurm.py ended before submitting (exit {launcher.returncode}); see {log}")


def send_slurm_fault(fault: str, job: str, run_dir: Path) -> None:
    if fault == "scancel":
        subprocess.run(["scancel", job], check=True)
    elif fault == "scancel --signal=USR2":
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
    elif fault == "preemption":  # every node, on the partition that preempts the default one
        nodes = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True, check=True).stdout
        cmd = ["sbatch", "-p", "urgent", "-N", nodes.split()[0], "--exclusive", "-o", "/dev/null", "--wrap", "sleep 5"]
        subprocess.run(cmd, check=True, capture_output=True)
    else:  # one task of the job step, as a node's OOM killer would
        pids = subprocess.run(
            ["pgrep", "-f", f"submitit.core._submit {run_dir}/slurm/"], capture_output=True, text=True
        )
        os.kill(max(int(p) for p in pids.stdout.split()), signal.SIGKILL)


def run_slurm_cell(args: argparse.Namespace, cell: Cell, out: Path) -> None:
    """Submit, fault the job mid-training, wait for it; resubmit until the run is finished."""
    name = "slurm-" + re.sub(r"\W+", "-", cell.signal).strip("-").lower()
    cmd, run_dir, start = slurm_command(args, out, name), out / name, time.time()
    cell.expected = SLURM_FAULTS[cell.signal]
    log = out / f"{name}.log"
    with log.open("w") as sink:
        launcher = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        job = submitted_job(log, launcher)
        while launcher.poll() is None and last_step(run_dir) < 2:
            time.sleep(0.05)
        if launcher.poll() is not None:
            cell.observed = f"ended before training (exit {launcher.returncode})"
            return
        at = last_step(run_dir)
        send_slurm_fault(cell.signal, job, run_dir)
        code = launcher.wait(timeout=1800)
    logs = "".join(p.read_text() for p in (run_dir / "slurm").rglob("*_0_log.out"))
    saved = latest_checkpoint(run_dir)
    cell.stop_step = saved if saved is not None and saved >= at else None
    if code == 0:
        cell.observed = "requeued, finished" if "resumed from" in logs else "finished (no fault seen)"
    elif cell.stop_step is not None:
        cell.observed = "stopped, not requeued"
    else:
        cell.observed = "failed" if code == 1 else f"exit {code}"
    finish = subprocess.CompletedProcess(cmd, code)
    while finish.returncode != 0 and cell.relaunches < 3:
        cell.relaunches += 1
        finish = subprocess.run(cmd, capture_output=True, text=True)
    if finish.returncode != 0:
        cell.identical = "0/0"
        return
    cell.identical, cell.seconds = compared(cell, out, run_dir), round(time.time() - start, 1)


def slurm_cells(args: argparse.Namespace, out: Path) -> list[Cell]:
    if shutil.which("squeue") is None or subprocess.run(["squeue", "-h"], capture_output=True).returncode != 0:
        raise SystemExit("error: --slurm needs a SLURM cluster reachable from this shell (squeue failed)")
    cells = [Cell(fault, "job", "training", "wds") for fault in SLURM_FAULTS]
    for i, cell in enumerate(cells, 1):
        run_slurm_cell(args, cell, out)
        print(f"SLURM cell {i}/{len(cells)}: {cell.signal}: {cell.observed}, weights {cell.identical}", flush=True)
    return cells


def table(cells: list[Cell]) -> str:
    head = f"{'signal':21} {'target':8} {'phase':10} {'reader':6} {'expected':22} {'observed':22} {'stop ckpt':>9} "
    lines = [head + f"{'relaunch':>8} {'weights':>9} {'s':>6}  ok"]
    for c in cells:
        stop = "-" if c.stop_step is None else str(c.stop_step)
        lines.append(
            f"{c.signal:21} {c.target:8} {c.phase:10} {c.reader:6} {c.expected:22} {c.observed:22} {stop:>9} "
            f"{c.relaunches:>8} {c.identical:>9} {c.seconds:>6}  {'yes' if c.ok else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__)
    parser.add_argument("--all", action="store_true", help="the full product of cells, not a covering subset")
    parser.add_argument("--limit", type=int, default=0, help="run only the first N cells (a quick check)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (SLURM cells: nodes of one task each)")
    parser.add_argument("--slurm", action="store_true", help="add the SLURM cells (needs a reachable cluster)")
    parser.add_argument("--slurm-only", action="store_true", help="only the SLURM cells")
    parser.add_argument("--seed", type=int, default=0, help="seed of the covering subset's order")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        cfg = cli.load(args)
    except cli.USER_ERRORS as err:
        return cli.fail(err)
    root = Path(cfg.data.root).resolve()
    cells = (
        [Cell(*c) for c in itertools.product(SIGNALS, TARGETS, PHASES, READERS)] if args.all else covering(args.seed)
    )
    cells = [] if args.slurm_only else cells[: args.limit] if args.limit else cells
    server, started = ShardServer(root), time.time()
    with tempfile.TemporaryDirectory(prefix="lsa-faults-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        references(args, out, server, root)
        steps_per_epoch = steps_of(out / "reference-wds")
        for i, cell in enumerate(cells, 1):
            run_cell(args, cell, out, reader_overrides(cell.reader, root, server), steps_per_epoch)
            what = f"{cell.signal} to the {cell.target} in {cell.phase} ({cell.reader})"
            print(f"cell {i}/{len(cells)}: {what}: {cell.observed}, weights {cell.identical}", flush=True)
        if args.slurm or args.slurm_only:
            cells += slurm_cells(args, out)
    print("\n" + table(cells))
    good = sum(c.ok for c in cells)
    print(f"\n{good}/{len(cells)} cells ended as expected in {(time.time() - started) / 60:.0f} min")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(c), "ok": c.ok} for c in cells], indent=1) + "\n")
    return 0 if good == len(cells) else 1


def steps_of(run_dir: Path, epoch: int = 1) -> int:
    """The step a finished run ended `epoch` at (its epoch-end line): steps per epoch for 1."""
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("epoch") == epoch:
            return int(row["step"])
    raise SystemExit(f"{run_dir} logged no epoch end: give the runs at least 2 epochs")


if __name__ == "__main__":
    sys.exit(main())
