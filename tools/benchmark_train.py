#!/usr/bin/env python
"""What the training system costs on top of the model, and what ZeRO saves per rank.

1. Throughput: images/s of the real training run (launch/local.py: data pipeline from shards,
   DeepSpeed engine, metrics, checkpoint-free steady state) against the model-only step (the
   same model, batch and precision, forward + backward + AdamW, data already in memory, the
   same threads per process), measured in the same run. Ratio target: at least 0.9. And the
   same run with MLflow tracking on (a sqlite backend, metrics logged every step) against off,
   interleaved and repeated (--repeats) so drift on a busy machine hits both: target at least 0.98.
2. torch.compile (engine.compile): eager against compiled runs of the same config, the first
   step's extra time (compilation) and the steady-state speed-up.
3. Memory: bytes held by each rank's model states (weights, gradients, optimizer state) after
   two steps, for ZeRO 0/1/2/3 and fairscale OSS with 2 processes, on a model with lsa_large's
   widths (its depth scaled down to fit a small machine).

    python tools/benchmark_train.py [--config configs/demo.yaml] [--steps 60] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsa_dist import cli  # noqa: E402

MEMORY_CASES = [
    ("ZeRO-0", ["engine.backend=deepspeed", "engine.zero_stage=0"]),
    ("ZeRO-1", ["engine.backend=deepspeed", "engine.zero_stage=1"]),
    ("ZeRO-2", ["engine.backend=deepspeed", "engine.zero_stage=2"]),
    ("ZeRO-3", ["engine.backend=deepspeed", "engine.zero_stage=3"]),
    ("fairscale OSS", ["engine.backend=fairscale", "engine.zero_stage=1"]),
]
LARGE_LIKE = [
    "model.name=lsa_large",
    "model.options.depths=[1,1,4]",
    "model.options.image_size=64",
    "data.image_size=64",
]


def model_only_worker(cfg_path: Path, overrides: list[str], steps: int, threads: int) -> dict:
    """Images/s of forward + backward + AdamW on in-memory data (runs in its own process)."""
    import torch

    from lsa_dist.config import load_config, model_overrides
    from lsa_dist.data import load_dataset_info
    from lsa_dist.engine import PRECISIONS
    from lsa_dist.models import create_model

    torch.set_num_threads(threads)
    cfg = load_config(cfg_path, overrides)
    info = load_dataset_info(cfg.data.root)
    dtype = PRECISIONS[cfg.engine.precision]
    model = create_model(cfg.model.name, **model_overrides(cfg, info.num_classes)).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, size = cfg.data.batch_size, cfg.data.image_size
    images = torch.randn(batch, 3, size, size, dtype=dtype)
    labels = torch.randint(0, info.num_classes, (batch,))

    def step() -> None:
        torch.nn.functional.cross_entropy(model(images).float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"images_per_s": steps * batch / (time.perf_counter() - start)}


def memory_worker(cfg_path: Path, overrides: list[str]) -> dict:
    """Bytes held by tensors after building the engine and two steps, and their peak during
    them (one rank of two): weights, gradients, optimizer state and communication buckets."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lsa_dist import dist as D
    from lsa_dist.config import load_config, model_overrides
    from lsa_dist.engine import build_engine
    from lsa_dist.models import count_parameters, create_model

    env = D.discover()
    device = D.init(env)
    cfg = load_config(None, overrides)  # the schema's defaults: an lsa_large-like model, no dataset needed
    batch, size = cfg.data.batch_size, cfg.data.image_size
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = create_model(cfg.model.name, **model_overrides(cfg, 10))
        params = count_parameters(model)
        engine = build_engine(cfg, model, 100, env.world_size, device)
        images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(engine.forward(images), labels)
            engine.backward(loss)
            engine.step()
        del loss
    live = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    return {"rank": env.rank, "live_mb": live / 2**20, "peak_mb": peak / 2**20, "params": params}


def _worker(kind: str, *args: str) -> list:
    return [sys.executable, __file__, "--worker", kind, *args]


def model_only_rate(cfg_path: Path, overrides: list[str], steps: int, threads: int) -> float:
    cmd = _worker("model", str(cfg_path), str(steps), str(threads), *overrides)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def end_to_end_rate(
    cfg_path: Path,
    overrides: list[str],
    workdir: Path,
    nproc: int,
    steps: int,
    tracked: bool = False,
    log_every: int = 10,
    tag: str = "",
) -> float:
    """Steady-state images/s of a real training run: every logged window but the first 10 steps.

    Windows hold equal numbers of images, so the harmonic mean of their rates is images / time.
    """
    name = f"e2e{nproc}{'-tracked' if tracked else ''}{tag}"
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--config", str(cfg_path), "--nproc", str(nproc)]
    cmd += [*overrides, f"train.output_dir={workdir}", f"train.name={name}", f"train.max_steps={steps}"]
    tracking = [f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}"] if tracked else ["tracking.enabled=false"]
    cmd += [*tracking, f"tracking.log_every={log_every}", "checkpoint.export_at_end=false", "train.eval_every=1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training run failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r and r["step"] > 10]
    return len(rates) / sum(1.0 / r for r in rates)


def memory_per_rank(cfg_path: Path, overrides: list[str]) -> tuple[dict, int]:
    """The memory worker on 2 ranks, started by torch's own launcher (torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [__file__, "--worker", "memory", str(cfg_path), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // 2)), PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"memory run {overrides} failed:\n{proc.stderr[-2000:]}")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"rank"')]
    worst = {key: max(r[key] for r in results) for key in ("live_mb", "peak_mb")}
    return worst, results[0]["params"]


def throughput(args: argparse.Namespace, workdir: Path, threads: int) -> dict:
    e2e = end_to_end_rate(args.config, args.overrides, workdir, args.nproc, args.steps)
    model_only = model_only_rate(args.config, args.overrides, args.steps // 2, threads) * args.nproc
    print(f"\nthroughput ({args.config.name}, {args.nproc} process(es) x {threads} threads)")
    print(f"{'':<34} {'images/s':>9}")
    print(f"{'model-only step (data in memory)':<34} {model_only:>9.1f}")
    print(f"{'training run (launch/local.py)':<34} {e2e:>9.1f}")
    print(f"{'ratio':<34} {e2e / model_only:>9.2f}")
    return {"end_to_end": e2e, "model_only": model_only, "ratio": e2e / model_only}


def tracking_cost(args: argparse.Namespace, workdir: Path) -> dict:
    pairs = []
    for repeat in range(args.repeats):
        run = partial(end_to_end_rate, args.config, args.overrides, workdir, args.nproc, args.steps)
        pair = [run(tracked=tracked, log_every=1, tag=f"-every-step-{repeat}") for tracked in (False, True)]
        pairs.append(pair)
        print(f"  tracking off/on pair {repeat + 1}: {pair[0]:.1f} / {pair[1]:.1f} images/s", file=sys.stderr)
    untracked, tracked = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[1] / p[0] for p in pairs)
    print(f"\nMLflow tracking, metrics every step (median of {args.repeats} interleaved pairs)")
    print(f"{'training run, tracking off':<34} {untracked:>9.1f}")
    print(f"{'training run, tracking on':<34} {tracked:>9.1f}")
    print(f"{'tracking on / off (per pair)':<34} {ratio:>9.2f}")
    last_tracked = workdir / f"e2e{args.nproc}-tracked-every-step-{args.repeats - 1}"
    cpu = tracking_cpu(last_tracked, workdir, max(1, (os.cpu_count() or 1) // args.nproc) * args.nproc)
    print(
        f"tracking's own CPU time for that run ({cpu['metrics']} metrics): {cpu['tracking_cpu_s']:.2f} s, "
        f"{100 * cpu['share']:.2f}% of the training's CPU time (a cost of at most that share of throughput)"
    )
    return {"off": untracked, "on": tracked, "ratio": ratio, "pairs": pairs, "log_every": 1, "cpu": cpu}


def tracking_cpu(run_dir: Path, workdir: Path, cores: int) -> dict:
    """What tracking costs, measured where whole-run timings are too noisy to tell 1% apart:
    every metric a tracked run logged (its metrics.jsonl) is queued and sent again to a fresh
    sqlite backend, timing the CPU of both (time.thread_time), against the run's own CPU time
    (wall time between its first and last metric x the cores its workers used)."""
    from lsa_dist.config import RunConfig
    from lsa_dist.tracking import RECORD_NAME, Tracker, prepare

    rows = [json.loads(line) for line in (run_dir / RECORD_NAME).read_text().splitlines()]
    cfg = RunConfig()
    cfg.tracking.uri = f"sqlite:///{workdir / 'replay.db'}"
    replay = workdir / "replay"  # a run folder of its own: the replayed record and its mark
    replay.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg, prepare(cfg), replay / RECORD_NAME, flush_every_s=3600)
    start = time.thread_time()
    for row in rows:
        tracker.log_metrics({k: v for k, v in row.items() if k not in ("step", "time")}, row["step"])
    tracker.finish()  # sends everything queued, in this thread
    cpu = time.thread_time() - start
    training = (rows[-1]["time"] - rows[0]["time"]) * cores
    metrics = sum(len(row) - 2 for row in rows)
    return {"metrics": metrics, "tracking_cpu_s": cpu, "training_cpu_s": training, "share": cpu / training}


def compile_cost(args: argparse.Namespace, workdir: Path) -> dict:
    """engine.compile: the first step's extra time (compilation) and the steady-state speed-up,
    eager and compiled runs of the same config (activation checkpointing as configured)."""
    rows = {}
    for compiled in (False, True):
        tag = f"-compile-{compiled}"
        overrides = [*args.overrides, f"engine.compile={str(compiled).lower()}"]
        rate = end_to_end_rate(args.config, overrides, workdir, args.nproc, args.steps, tag=tag)
        first = first_step_seconds(workdir / f"e2e{args.nproc}{tag}")
        rows[compiled] = {"images_per_s": rate, "first_step_s": first}
    eager, compiled = rows[False], rows[True]
    speedup = compiled["images_per_s"] / eager["images_per_s"]
    compile_s = compiled["first_step_s"] - eager["first_step_s"]
    print(f"\ntorch.compile (engine.compile), {args.nproc} process(es)")
    print(f"{'':<34} {'images/s':>9} {'first step':>11}")
    print(f"{'eager':<34} {eager['images_per_s']:>9.1f} {eager['first_step_s']:>9.1f} s")
    print(f"{'compiled':<34} {compiled['images_per_s']:>9.1f} {compiled['first_step_s']:>9.1f} s")
    print(f"{'compiled / eager':<34} {speedup:>9.2f}   compile time {compile_s:.0f} s")
    return {"eager": eager, "compiled": compiled, "speedup": speedup, "compile_s": compile_s}


def first_step_seconds(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["train/first_step_s"] for r in rows if "train/first_step_s" in r)


def memory_table(args: argparse.Namespace) -> dict:
    memory = {}
    base = [*LARGE_LIKE, "data.batch_size=2", "engine.precision=bf16", "engine.bucket_size=5000000"]
    for label, case in MEMORY_CASES:
        start = time.perf_counter()
        memory[label], params = memory_per_rank(args.config, base + case)
        print(f"  measured {label} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"\nmodel states per rank, 2 processes, bf16, {params / 1e6:.1f} M parameters (lsa_large widths)")
    print(f"{'engine':<16} {'held after step':>16} {'vs ZeRO-0':>10} {'peak in step':>13} {'vs ZeRO-0':>10}")
    zero0 = memory["ZeRO-0"]
    for label, mb in memory.items():
        held, peak = mb["live_mb"], mb["peak_mb"]
        print(
            f"{label:<16} {held:>13.0f} MB {held / zero0['live_mb']:>9.2f}x "
            f"{peak:>10.0f} MB {peak / zero0['peak_mb']:>9.2f}x"
        )
    return memory


def run_worker(args: argparse.Namespace) -> int:
    kind, cfg_path, *rest = args.worker
    if kind == "model":
        print(json.dumps(model_only_worker(Path(cfg_path), rest[2:] + args.overrides, int(rest[0]), int(rest[1]))))
        return 0
    from lsa_dist import dist as D

    print(json.dumps(memory_worker(Path(cfg_path), rest + args.overrides)), flush=True)
    D.shutdown(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__, config_required=False)
    parser.set_defaults(config=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--steps", type=int, default=60, help="training steps per throughput run")
    parser.add_argument("--nproc", type=int, default=1, help="processes of the end-to-end run (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved tracking off/on pairs (default 3)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-compile", action="store_true", help="no eager vs engine.compile runs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    try:  # the runs below would each fail on a bad config; say it once, before any starts
        cli.load(args)
    except cli.USER_ERRORS as err:
        return cli.fail(err)
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    results: dict = {"config": str(args.config), "nproc": args.nproc}
    with tempfile.TemporaryDirectory(prefix="lsa-bench-train-") as tmp:
        workdir = Path(tmp)
        results["throughput"] = throughput(args, workdir, threads)
        results["tracking"] = tracking_cost(args, workdir)
        if not args.skip_compile:
            results["compile"] = compile_cost(args, workdir)
        if not args.skip_memory:
            results["memory_mb_per_rank"] = memory_table(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
