#!/usr/bin/env python
"""Chaos campaign: SIGKILL every process of a training run at random moments, N times, finish
it with the same command, and compare its final weights with an uninterrupted run's.

    python tools/chaos.py --config configs/demo.yaml --kills 20 [--json chaos.json] [key=value ...]

Each attempt runs `launch/local.py` with the same command line, and the launcher and all its
workers are SIGKILLed at once, as a node failure would, at a random moment of a random phase:
during start-up (--startup-share of the kills: within --startup-window seconds after the
workers exist), or in training (from --min-delay to --max-delay seconds after the attempt's
first new step: training, evaluation or a save may be under way). The moments are measured
from these states, not from the launch, so a slow or busy machine still kills in training.
The next attempt must continue from the run's latest checkpoint. After the last kill the run
is finished by the same command, and its model.pt is compared tensor by tensor (exact
equality) with the model.pt of the same config run without interruption.
Prints a table of the attempts and the verdict; exit 0 only if every relaunch resumed and
the weights are identical. The runs go to --out (default: a temporary folder, removed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsa_dist import cli  # noqa: E402


def launch_command(args: argparse.Namespace, out: Path, name: str) -> list[str]:
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--config", str(args.config)]
    cmd += ["--nproc", str(args.nproc), *args.overrides, f"train.output_dir={out}", f"train.name={name}"]
    return cmd + ["tracking.enabled=false"]


def processes_of(run_dir: Path) -> list[int]:
    """The workers of a run (their command line names the run's launch config)."""
    out = subprocess.run(["pgrep", "-f", f"{run_dir}/launch_config.yaml"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def kill_everything(launcher: subprocess.Popen, run_dir: Path) -> int:
    """SIGKILL the launcher and every worker at the same moment; wait until all are gone."""
    victims = [launcher.pid, *processes_of(run_dir)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()
    deadline = time.time() + 60
    while processes_of(run_dir) and time.time() < deadline:
        time.sleep(0.1)
    if processes_of(run_dir):
        raise SystemExit(f"workers of {run_dir} survived SIGKILL")
    return len(victims)


def last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def latest_checkpoint(run_dir: Path) -> int | None:
    """The step of the run's latest complete checkpoint (None: there is none yet)."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    meta = run_dir / "checkpoints" / pointer.read_text().strip() / "meta.json"
    return json.loads(meta.read_text())["step"] if meta.is_file() else None


def reached(phase: str, run_dir: Path, before: int) -> bool:
    """Whether an attempt is in the phase to kill it in: its workers exist (start-up), or it
    has trained a step beyond `before` (training)."""
    if phase == "start-up":
        return bool(processes_of(run_dir))
    return last_step(run_dir) > before


def resumed_step(log: str) -> int | None:
    match = re.search(r"resumed from \S+ \(epoch \d+, batch \d+, step (\d+)\)", log)
    return int(match.group(1)) if match else None


def compare(a: Path, b: Path) -> tuple[int, int]:
    """(identical tensors, all tensors) of two model.pt files."""
    import torch

    from lsa_dist.weights import load_model_file

    sa, sb = load_model_file(a).state_dict(), load_model_file(b).state_dict()
    same = sum(1 for k in sa if k in sb and torch.equal(sa[k], sb[k]))
    return same, len(sa)


def campaign(args: argparse.Namespace, out: Path) -> dict:
    rng = random.Random(args.seed)
    reference = subprocess.run(launch_command(args, out, "reference"), capture_output=True, text=True)
    if reference.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{reference.stderr[-3000:]}")
    run_dir, attempts = out / "chaos", []
    cmd = launch_command(args, out, "chaos")
    # exactly the share asked for (rounded), at random kills: a draw per kill can give none
    in_startup = set(rng.sample(range(1, args.kills + 1), round(args.kills * args.startup_share)))
    for kill in range(1, args.kills + 1):
        log = out / f"attempt{kill}.log"
        with log.open("w") as f:
            launcher = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        phase = "start-up" if kill in in_startup else "training"
        delay = (
            rng.uniform(0, args.startup_window) if phase == "start-up" else rng.uniform(args.min_delay, args.max_delay)
        )
        before, latest = last_step(run_dir), latest_checkpoint(run_dir)
        while launcher.poll() is None and not reached(phase, run_dir, before):
            time.sleep(0.05)
        started = time.time()
        while time.time() - started < delay and launcher.poll() is None:
            time.sleep(0.05)
        if launcher.poll() is not None:
            raise SystemExit(f"the run ended before kill {kill} (make it longer): see {log}")
        killed = kill_everything(launcher, run_dir)
        text = log.read_text()
        attempts.append(
            {
                "kill": kill,
                "phase": phase,
                "delay_s": round(delay, 1),
                "latest_checkpoint": latest,  # what this attempt had to resume from
                "resumed_from": resumed_step(text),
                "step_at_kill": last_step(run_dir),
                "processes_killed": killed,
            }
        )
        print(f"kill {kill:2d} in {phase} after {delay:5.1f} s: step {attempts[-1]['step_at_kill']}", flush=True)
    latest = latest_checkpoint(run_dir)
    final = subprocess.run(cmd, capture_output=True, text=True)
    if final.returncode != 0:
        raise SystemExit(f"the finishing run failed:\n{final.stderr[-3000:]}")
    same, total = compare(out / "reference" / "model.pt", run_dir / "model.pt")
    # an attempt killed in start-up before it said where it resumed cannot be judged; every
    # other one, and the finishing run, must have resumed from the latest checkpoint there was
    judged = [(a["resumed_from"], a["latest_checkpoint"]) for a in attempts if a["phase"] == "training"]
    judged += [
        (a["resumed_from"], a["latest_checkpoint"])
        for a in attempts
        if a["phase"] == "start-up" and a["resumed_from"] is not None
    ]
    judged.append((resumed_step(final.stdout), latest))
    return {
        "kills": args.kills,
        "attempts": attempts,
        "final_resumed_from": judged[-1][0],
        "relaunches_resumed": sum(resumed == want for resumed, want in judged),
        "relaunches": len(judged),
        "identical_tensors": same,
        "tensors": total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__)
    parser.add_argument("--kills", type=int, default=20, help="how many times to SIGKILL the run (20)")
    parser.add_argument(
        "--min-delay", type=float, default=1.0, help="earliest training kill, s after an attempt's first new step (1)"
    )
    parser.add_argument(
        "--max-delay", type=float, default=20.0, help="latest training kill, s after an attempt's first new step (20)"
    )
    parser.add_argument("--startup-share", type=float, default=0.25, help="share of kills during start-up (0.25)")
    parser.add_argument(
        "--startup-window", type=float, default=10.0, help="start-up kills: within this many s after the workers exist"
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        cli.load(args)
    except cli.USER_ERRORS as err:
        return cli.fail(err)
    with tempfile.TemporaryDirectory(prefix="lsa-chaos-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        result = campaign(args, out)
    print(f"\n{'kill':>4} {'phase':>9} {'after s':>8} {'resumed from':>13} {'step at kill':>13}")
    for a in result["attempts"]:
        resumed = "-" if a["resumed_from"] is None else str(a["resumed_from"])
        print(f"{a['kill']:>4} {a['phase']:>9} {a['delay_s']:>8} {resumed:>13} {a['step_at_kill']:>13}")
    print(f"{'end':>4} {'':>9} {'':>8} {result['final_resumed_from']!s:>13} {'finished':>13}")
    ok = result["relaunches_resumed"] == result["relaunches"] and result["identical_tensors"] == result["tensors"]
    print(
        f"\n{result['kills']} kills: {result['relaunches_resumed']}/{result['relaunches']} relaunches that got as far "
        "resumed from the latest checkpoint there was; "
        f"final weights identical in {result['identical_tensors']}/{result['tensors']} tensors -> "
        f"{'PASS' if ok else 'FAIL'}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
