#!/usr/bin/env python
"""Training-step throughput and peak memory of the LSA model against a straightforward
reference implementation of the same math, measured in the same run.

Peak memory is what one training step allocates above what was live before it
(weights, gradients and optimizer state excluded): torch's CUDA allocator statistics on
a GPU, the profiler's allocation events on CPU.

One training step = forward + cross-entropy + backward + AdamW step, on random data
already in memory. Each implementation runs in a fresh subprocess so that its peak
memory is its own; rounds alternate between implementations so that a slow phase of
the machine hits all of them alike. Before timing, both implementations are checked to
give the same logits and gradients for the same weights.

    python tools/benchmark_model.py --model lsa_tiny --batch-size 8 --dtype fp32 [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsa_dist.dist import cuda_settings  # noqa: E402
from lsa_dist.models import LSA, count_macs, create_model  # noqa: E402
from lsa_dist.models.reference import ReferenceLSA, reference_forward  # noqa: E402

IMPLEMENTATIONS = ("reference", "lsa_dist", "lsa_dist+compile")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _setup(args: argparse.Namespace, impl: str) -> tuple[LSA, torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = create_model(args.model).to(device)
    runner = ReferenceLSA(model) if impl == "reference" else model
    if impl.endswith("+compile"):
        runner = torch.compile(runner)
    size = model.cfg.image_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.batch_size, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, model.cfg.num_classes, (args.batch_size,), generator=gen).to(device)
    return model, runner, images, labels


def _loss(runner: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, dtype: str, device: str) -> torch.Tensor:
    if dtype == "fp32":
        return torch.nn.functional.cross_entropy(runner(images), labels)
    with torch.autocast(device_type=device, dtype=getattr(torch, DTYPES[dtype])):
        return torch.nn.functional.cross_entropy(runner(images).float(), labels)


def worker(args: argparse.Namespace) -> dict:
    """Time `args.steps` training steps of one implementation (runs in its own process)."""
    cuda = args.device.startswith("cuda")
    if cuda:
        cuda_settings()  # as training runs: TF32, cuDNN's benchmark
    model, runner, images, labels = _setup(args, args.worker)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=cuda)

    def step() -> None:
        loss = _loss(runner, images, labels, args.dtype, args.device.split(":")[0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()  # first step: allocator warm-up, optimizer state, compilation
    first = time.perf_counter() - start
    for _ in range(max(args.warmup - 1, 0)):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = _cpu_step_peak_mb(step)
    return {"step_times": times, "first_step_s": first, "peak_mem_mb": peak}


def _cpu_step_peak_mb(step: Callable[[], None]) -> float:
    """Peak bytes allocated by one step above what was live before it (CPU allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    return peak / 2**20


def check_same_outputs(args: argparse.Namespace) -> dict:
    """Max differences between reference and lsa_dist logits and gradients (same weights)."""
    model, _, images, labels = _setup(args, "lsa_dist")
    model.eval()  # no stochastic layers; dropout rates are 0 by default anyway
    diffs = {}
    grads = []
    for fn in (model, lambda x: reference_forward(model, x)):
        model.zero_grad(set_to_none=True)
        logits = fn(images)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast_logits, fast_grads), (ref_logits, ref_grads) = grads
    diffs["logits_max_abs_diff"] = (fast_logits - ref_logits).abs().max().item()
    diffs["logits_max_abs"] = ref_logits.abs().max().item()
    rel = max(
        ((fast_grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12)).item()
        for n in ref_grads
    )
    diffs["grad_max_rel_diff"] = rel
    return diffs


def _run_worker(args: argparse.Namespace, impl: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--steps", str(steps), "--warmup", str(args.warmup)]
    for key in ("model", "batch_size", "dtype", "device", "seed", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise WorkerError(f"benchmark of {impl} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class WorkerError(Exception):
    """One implementation's process failed (a compile error, out of memory): the others still run."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="lsa_tiny", help="named variant (default lsa_tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16 runs under autocast")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; steps are split across them")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    parser.add_argument("--compile", action="store_true", help="also time lsa_dist under torch.compile")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args)))
        return 0

    check = check_same_outputs(args)
    tol = 1e-4 if args.dtype == "fp32" else 5e-2
    ok = check["logits_max_abs_diff"] <= tol * max(1.0, check["logits_max_abs"]) and check["grad_max_rel_diff"] <= 1e-3
    print(
        f"same outputs: logits max |diff| {check['logits_max_abs_diff']:.2e}, "
        f"gradients max relative diff {check['grad_max_rel_diff']:.2e} -> {'ok' if ok else 'MISMATCH'}"
    )
    if not ok:
        print("error: lsa_dist and the reference disagree; not timing", file=sys.stderr)
        return 1

    impls = [i for i in IMPLEMENTATIONS if args.compile or not i.endswith("+compile")]
    per_round = max(1, args.steps // args.rounds)
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    failed: dict[str, str] = {}
    for _ in range(args.rounds):
        for impl in impls:
            if impl not in failed:
                try:
                    runs[impl].append(_run_worker(args, impl, per_round))
                except WorkerError as err:
                    failed[impl] = str(err)
                    print(f"error: {err}", file=sys.stderr)
    if "reference" in failed or "lsa_dist" in failed:
        return 1  # no ratio without both

    model = create_model(args.model)
    macs = count_macs(model)
    results = {}
    for impl in impls:
        if impl in failed:
            continue
        times = [t for r in runs[impl] for t in r["step_times"]]
        step = statistics.median(times)
        results[impl] = {
            "images_per_s": args.batch_size / step,
            "step_ms": step * 1e3,
            "peak_mem_mb": max(r["peak_mem_mb"] for r in runs[impl]),
            "first_step_s": max(r["first_step_s"] for r in runs[impl]),
            "steps": len(times),
        }
    base = results["reference"]
    for r in results.values():
        r["speedup"] = r["images_per_s"] / base["images_per_s"]
        r["memory_ratio"] = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else float("nan")
        r["gmac_per_s"] = r["images_per_s"] * 3 * macs / 1e9  # forward + backward ~ 3x forward

    mem_kind = "peak step memory MB"
    print(
        f"\n{args.model}, batch {args.batch_size}, {args.dtype}, {args.device}, {args.threads} threads, "
        f"{macs / 1e9:.2f} GMAC/image forward (architecture count)"
    )
    header = f"{'implementation':<18} {'images/s':>9} {'ms/step':>9} {mem_kind:>20} {'speedup':>8} {'memory':>7}"
    print(header)
    print("-" * len(header))
    for impl, r in results.items():
        print(
            f"{impl:<18} {r['images_per_s']:>9.2f} {r['step_ms']:>9.1f} {r['peak_mem_mb']:>20.0f} "
            f"{r['speedup']:>7.2f}x {r['memory_ratio']:>6.2f}x"
        )
    if "lsa_dist+compile" in results:
        c = results["lsa_dist+compile"]
        print(
            f"\ntorch.compile: {c['images_per_s'] / results['lsa_dist']['images_per_s']:.2f}x the eager lsa_dist "
            f"step, first step (compilation) {c['first_step_s']:.0f} s"
        )
    if args.json:
        payload = {
            "model": args.model,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "device": args.device,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "macs_per_image": macs,
            "macs_per_image_executed": count_macs(model, "model"),
            "check": check,
            "results": results,
            "failed": failed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
