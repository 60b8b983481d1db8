#!/usr/bin/env python
"""Time from `launch/slurm.py` to the first training step on a SLURM cluster, split into
queue (submission -> the job starts) and start-up (job start -> first optimizer step:
imports, process group, data, model, DeepSpeed engine).

    eval "$(tools/slurm_cluster.sh env)"
    python tools/benchmark_slurm.py [--nodes 2] [--config configs/demo.yaml] [--json out.json] [key=value ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsa_dist import cli  # noqa: E402


def sacct_start(job_id: str) -> float:
    out = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "start", "-P"], capture_output=True, text=True)
    return datetime.fromisoformat(out.stdout.strip().splitlines()[0]).timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__, config_required=False)
    parser.set_defaults(config=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:  # once here, not as a failed job per repeat
        cli.load(args)
    except cli.USER_ERRORS as err:
        return cli.fail(err)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lsa-bench-slurm-") as tmp:
        for i in range(args.repeats):
            name = f"first-step-{i}"
            cmd = [
                sys.executable,
                str(ROOT / "launch" / "slurm.py"),
                "--config",
                str(args.config),
                "--nodes",
                str(args.nodes),
            ]
            cmd += ["--cpus-per-task", "1", "--time", "30", "--wait", *args.overrides, f"train.output_dir={tmp}"]
            cmd += [f"train.name={name}", "train.max_steps=5", "tracking.log_every=1", "tracking.enabled=false"]
            start = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"job failed:\n{proc.stderr[-2000:]}")
            job_id = proc.stdout.split("submitted job ", 1)[1].split(":", 1)[0]
            first = json.loads((Path(tmp) / name / "metrics.jsonl").read_text().splitlines()[0])["time"]
            began = sacct_start(job_id)
            rows.append({"queue_s": began - start, "startup_s": first - began, "total_s": first - start})
    print(f"\n{args.config.name} on {args.nodes} nodes: submission to first training step")
    print(f"{'run':<5} {'queue s':>8} {'start-up s':>11} {'total s':>8}")
    for i, r in enumerate(rows):
        print(f"{i:<5} {r['queue_s']:>8.1f} {r['startup_s']:>11.1f} {r['total_s']:>8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"nodes": args.nodes, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
