#!/usr/bin/env python
"""Fashion-MNIST benchmark: validation top-1 against epochs and wall time, beside the figures of
the data set's own published benchmark table.

Writes the data set and converts it when `data.root` holds no dataset.json yet, trains
`configs/fashion.yaml` with launch/local.py (any key=value overrides it), then prints one row per
evaluation: epoch, minutes since the first step, top-1, and its ratio to the published 2-conv
net (under 100K parameters, 0.925) and ResNet-18 (0.949). --reuse reads a finished run instead.

    python tools/benchmark_fashion.py --json runs/bench/fashion.json --plot docs/fashion_mnist.png
    python tools/benchmark_fashion.py --reuse --plot docs/fashion_mnist.png     # runs/fashion as it is
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsa_dist import cli  # noqa: E402
from lsa_dist.config import load_config  # noqa: E402

# The data set's README (Debian's dataset-fashion-mnist, /usr/share/doc/dataset-fashion-mnist):
# test accuracy of submitted benchmarks, as listed there.
PUBLISHED = {
    "2 Conv, <100K params": 0.925,
    "ResNet-18": 0.949,
    "DenseNet-BC, 768K params": 0.954,
    "WRN-40-4, 8.9M params": 0.967,
}
TARGET, AIM = 0.925, 0.949


class RunError(RuntimeError):
    """The run folder holds no evaluation to report."""


def evaluations(run_dir: Path) -> list[dict[str, float]]:
    """One row per evaluation of the run: epoch, step, minutes since the first step, top-1 (0-1)."""
    record = run_dir / "metrics.jsonl"
    if not record.is_file():
        raise RunError(f"{record} is missing: train the run first (leave out --reuse)")
    rows = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    if not rows:
        raise RunError(f"{run_dir}/metrics.jsonl is empty: the run has not started")
    start = rows[0]["time"] - rows[0].get("train/first_step_s", 0.0)
    return [
        {"epoch": r["epoch"], "step": r["step"], "minutes": (r["time"] - start) / 60, "top1": r["val/top1"] / 100}
        for r in rows
        if "val/top1" in r and "epoch" in r
    ]


def prepare_data(root: Path) -> None:
    """The data set in the ImageNet layout and its shards, unless dataset.json is already there."""
    if (root / "dataset.json").is_file():
        return
    source = root.parent / "imagenet"
    py = sys.executable
    subprocess.run([py, str(ROOT / "tools" / "make_fashion_dataset.py"), "--out", str(source)], check=True)
    convert = [py, str(ROOT / "tools" / "convert_imagenet.py"), "--src", str(source), "--out", str(root)]
    subprocess.run([*convert, "--format", "wds", "--jpeg-quality", "95", "--samples-per-shard", "5000"], check=True)


def plot(runs: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x, label in ((axes[0], "epoch", "epoch"), (axes[1], "minutes", "wall time (minutes)")):
        for k, (label_of_run, rows) in enumerate(runs.items()):
            ax.plot(
                [r[x] for r in rows], [r["top1"] for r in rows], marker="os^"[k % 3], color=f"C{k}", label=label_of_run
            )
        for k, (name, value) in enumerate(PUBLISHED.items()):
            ax.axhline(value, color=f"C{k + len(runs)}", linestyle="--", linewidth=1, label=f"{name}: {value:.3f}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation top-1")
    lowest = min(r["top1"] for rows in runs.values() for r in rows)
    axes[0].set_ylim(min(0.8, lowest - 0.01), 0.975)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__, config_required=False)
    parser.set_defaults(config=ROOT / "configs" / "fashion.yaml")
    parser.add_argument("--reuse", action="store_true", help="read the run's metrics.jsonl; do not train")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and summary here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of top-1 against epochs and wall time")
    parser.add_argument(
        "--beside", type=Path, action="append", default=[], help="another finished run folder drawn in the plot too"
    )
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = cfg.run_dir
        total = None
        if not args.reuse:
            prepare_data(Path(cfg.data.root))
            started = time.monotonic()
            launch = [sys.executable, str(ROOT / "launch" / "local.py"), "--config", str(args.config), *args.overrides]
            subprocess.run(launch, check=True)
            total = (time.monotonic() - started) / 60
        rows = evaluations(run_dir)
        beside = {folder.name: evaluations(folder) for folder in args.beside}
    except subprocess.CalledProcessError as err:
        print(f"error: {' '.join(map(str, err.cmd[:3]))} ... exited {err.returncode}", file=sys.stderr)
        return 1
    except (*cli.USER_ERRORS, RunError) as err:
        return cli.fail(err)
    if not rows:
        return cli.fail(RunError(f"{run_dir} holds no evaluation yet: nothing to report"))
    print(f"{'epoch':>5} {'minutes':>8} {'top-1':>7} {'/ ' + str(TARGET):>8} {'/ ' + str(AIM):>8}")
    for r in rows:
        print(
            f"{r['epoch']:>5} {r['minutes']:>8.1f} {r['top1']:>7.4f} {r['top1'] / TARGET:>8.3f} {r['top1'] / AIM:>8.3f}"
        )
    best = max(rows, key=lambda r: r["top1"])
    reached = next((r for r in rows if r["top1"] >= TARGET), None)
    print(f"best {best['top1']:.4f} at epoch {best['epoch']}; {TARGET} ", end="")
    print(f"reached at epoch {reached['epoch']} ({reached['minutes']:.1f} min)" if reached else "not reached")
    print("published: " + ", ".join(f"{k} {v:.3f}" for k, v in PUBLISHED.items()))
    summary = {"run": str(run_dir), "rows": rows, "best": best, "target": TARGET, "target_reached": reached}
    summary |= {"published": PUBLISHED, "launch_minutes": total}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        runs = {run_dir.name: rows} | beside
        plot(runs, args.plot, f"Fashion-MNIST validation top-1, LSA of the demo's size, {cfg.optim.epochs} epochs")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
