#!/usr/bin/env python
"""One prepared check of the GPU path, writing one JSON: what a GPU machine does with lsa_dist.

Parts, each reported as measured, skipped (with why) or failed (with the error), never
stopping the others (one failing implementation or model keeps the rest of its part):

  environment   torch, CUDA, the driver, the device and its datasheet peak, which
                dependencies import
  attention     for the global attention shapes of lsa_tiny and lsa_small (bf16, forward +
                backward): the kernel SDPA picks by default, and each of flash, memory-efficient,
                cuDNN and math attention timed on the same tensors
  model         lsa_tiny and lsa_small bf16 training step, ours against the reference
                implementation and ours under torch.compile: images/s, peak memory, MFU on
                the architecture's and the executed MAC count (tools/benchmark_model.py, one
                process per implementation, training's TF32 and cuDNN settings)
  engines       1-GPU runs of the real training loop on train.synthetic data: DeepSpeed ZeRO-2
                bf16 with overlap_comm off and on, and the fairscale engine (torch DDP):
                images/s and MFU from their metrics
  loaders       WebDataset and FFCV images/s into the device (decode, augment, copy,
                normalise) on a generated photo dataset

A machine with an NVIDIA GPU that torch cannot use (a wheel built for a newer CUDA than the
driver's) stops at once with one line naming the versions; without a GPU it runs the CPU
subset (small sizes) and says what it skipped. The run ends within `--budget-s` + 30 s
(default 270 s): no part, model or engine starts after the budget, and a part's processes are
stopped 30 s after it.

Needs PyTorch and timm; the other parts need deepspeed, fairscale, webdataset, omegaconf,
submitit, mlflow, simplejpeg and (for FFCV's loader) ffcv. `tools/gpu_wheels.sh` gathers them,
with what they depend on beyond torch, into wheels/ for a machine without a package index:

    pip install --no-index --find-links wheels/ -r wheels/requirements.txt
    python tools/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEPENDENCIES = ("timm", "deepspeed", "webdataset", "omegaconf", "submitit", "mlflow", "fairscale", "simplejpeg", "ffcv")
MODELS = (("lsa_tiny", 64), ("lsa_small", 64))  # (model, batch per GPU)


GRACE_S = 30  # a part's processes may run this long past the budget: the whole run ends by budget + 30 s


def seconds_left(deadline: float) -> int:
    """What a part's process may still take: until the budget's end plus the grace."""
    return max(1, int(deadline + GRACE_S - time.time()))


def nvidia_smi(fields: str) -> str:
    """nvidia-smi's first GPU's `fields` (comma-separated, as --query-gpu takes them), or "" where
    there is no nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ""
    query = [smi, f"--query-gpu={fields}", "--format=csv,noheader"]
    rows = subprocess.run(query, capture_output=True, text=True, timeout=60).stdout.strip().splitlines()
    return rows[0] if rows else ""


def unusable_gpu() -> str | None:
    """The one-line reason when this machine has an NVIDIA GPU that torch cannot use, else None."""
    if torch.cuda.is_available():
        return None
    if not shutil.which("nvidia-smi") and not any(Path("/dev").glob("nvidia[0-9]*")):
        return None  # no GPU here: the CPU subset
    found = nvidia_smi("name,driver_version")
    driver = f"{found} (name, driver)" if found else "driver unknown"
    if torch.version.cuda is None:
        why = "it is a CPU-only build"
    else:
        try:
            torch.cuda.init()
            why = "no CUDA device is visible (CUDA_VISIBLE_DEVICES?)"
        except Exception as err:  # noqa: BLE001 - the driver's own words
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"this machine has an NVIDIA GPU ({driver}) that torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}) cannot use: {why}; install a torch build for a CUDA version the "
        f"driver supports (nvidia-smi shows it), or pass --cpu to run the CPU subset"
    )


class CannotRunError(Exception):
    """A part that cannot run on this machine; the message says why."""


def run_part(name: str, fn: Callable[[], dict[str, Any]], deadline: float) -> dict[str, Any]:
    """{"status": measured|skipped|failed, ...}: a part never stops the others."""
    start = time.perf_counter()
    if time.time() > deadline:
        return {"status": "skipped", "why": "time budget spent"}
    print(f"== {name}", flush=True)
    try:
        out = {"status": "measured", **fn()}
    except CannotRunError as why:
        out = {"status": "skipped", "why": str(why)}
    except Exception as err:  # noqa: BLE001 - reported, the next part runs
        out = {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}"[:2000],
            "trace": traceback.format_exc()[-3000:],
        }
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(
        f"   {out['status']} in {out['seconds']} s"
        + (f": {out.get('why') or out.get('error')}" if out["status"] != "measured" else ""),
        flush=True,
    )
    return out


def environment() -> dict[str, Any]:
    from lsa_dist.metrics import gpu_peak

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=name,
            memory_gb=round(props.total_memory / 2**30, 1),
            bf16_peak_tflops=gpu_peak(name, torch.bfloat16) / 1e12,
            cudnn=torch.backends.cudnn.version(),
        )
        info["driver"] = nvidia_smi("driver_version")
    else:
        info.update(device=f"cpu ({os.cpu_count()} cores)")
    found = {}
    for module in DEPENDENCIES:
        try:
            found[module] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as err:  # noqa: BLE001 - missing or broken (FFCV without its system libraries)
            found[module] = f"not importable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[
                :200
            ]
    info["dependencies"] = found
    return info


def attention() -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise CannotRunError("no GPU: SDPA's fused kernels are CUDA kernels (CPU runs its own)")
    from torch.nn.attention import SDPBackend

    from lsa_dist.dist import cuda_settings
    from lsa_dist.models import create_model

    cuda_settings()
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    names = {int(b.value): label for label, b in backends.items()}
    out: dict[str, Any] = {}
    for name, batch in MODELS:
        cfg = create_model(name).cfg
        for i, (width, heads, grid) in enumerate(zip(cfg.widths, cfg.heads, cfg.grid_sizes)):
            e, kv = width // heads, 1 if cfg.shared_kv else heads
            shape = (batch, heads, grid * grid, e)
            q = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (
                torch.randn(batch, kv, grid * grid, e, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2)
            )
            row: dict[str, Any] = {"batch": batch, "heads": heads, "kv_heads": kv, "tokens": grid * grid, "head_dim": e}
            try:
                choice = torch._fused_sdp_choice(q, k, v, enable_gqa=kv != heads)
                row["default"] = names.get(int(choice), str(choice))
            except Exception as err:  # noqa: BLE001 - a private helper: its absence is reported
                row["default"] = f"unknown ({type(err).__name__})"
            row["default_ms"] = _time_sdpa(q, k, v, None)
            for label, backend in backends.items():
                try:
                    row[f"{label}_ms"] = _time_sdpa(q, k, v, backend)
                except RuntimeError as err:
                    row[f"{label}_ms"] = None
                    row[f"{label}_why"] = str(err).strip().splitlines()[0][:200] if str(err).strip() else "error"
            out[f"{name}/stage{i + 1}"] = row
            del q, k, v
    return out


def _time_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Any, iters: int = 10) -> float:
    """Milliseconds per forward + backward of SDPA on these tensors, with `backend` forced (None:
    SDPA's own choice), timed with CUDA events after a warm-up."""
    import contextlib

    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
    gqa = k.shape[1] != q.shape[1]
    with context:
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa).sum().backward()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa).sum().backward()
        end.record()
        end.synchronize()
    q.grad = k.grad = v.grad = None
    return round(start.elapsed_time(end) / iters, 3)


def model_steps(quick: bool, deadline: float) -> dict[str, Any]:
    """Each model in its own benchmark run: one that fails (or a compile that fails within it)
    keeps the others' figures."""
    gpu = torch.cuda.is_available()
    cases = list(MODELS) if gpu else [("lsa_cifar_tiny", 2)]  # CPU: the path, at a size that runs in a minute
    if quick:
        cases = cases[:1]
    out: dict[str, Any] = {}
    for name, batch in cases:
        if time.time() > deadline:
            out[name] = {"status": "skipped", "why": "time budget spent"}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "model.json"
            cmd = [sys.executable, str(ROOT / "tools" / "benchmark_model.py"), "--model", name]
            cmd += ["--batch-size", str(batch), "--dtype", "bf16" if gpu else "fp32", "--json", str(report)]
            cmd += ["--steps", "20", "--rounds", "2", "--compile"] if gpu else ["--steps", "2", "--rounds", "1"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds_left(deadline))
            except subprocess.TimeoutExpired:
                out[name] = {"status": "failed", "error": "out of the time budget"}
                continue
            if not report.exists():
                lines = (proc.stderr or proc.stdout).strip().splitlines()
                out[name] = {"status": "failed", "error": lines[-1] if lines else f"exit {proc.returncode}"}
                continue
            out[name] = _with_mfu(json.loads(report.read_text()))
    if not gpu:
        out["skipped"] = "lsa_tiny, lsa_small, bf16 and torch.compile (CPU: minutes each)"
    return out


def _with_mfu(result: dict[str, Any]) -> dict[str, Any]:
    from lsa_dist.metrics import gpu_peak, mfu

    peak = gpu_peak(torch.cuda.get_device_name(0), torch.bfloat16) if torch.cuda.is_available() else float("nan")
    rows = {}
    for impl, r in result["results"].items():
        rows[impl] = {
            "images_per_s": round(r["images_per_s"], 1),
            "peak_mem_mb": round(r["peak_mem_mb"]),
            "speedup_vs_reference": round(r["speedup"], 3),
            "memory_vs_reference": round(r["memory_ratio"], 3),
            "first_step_s": round(r["first_step_s"], 1),
            "mfu": _finite(mfu(r["images_per_s"], result["macs_per_image"], peak, 1)),
            "mfu_executed": _finite(mfu(r["images_per_s"], result["macs_per_image_executed"], peak, 1)),
        }
    for impl, error in result.get("failed", {}).items():
        rows[impl] = {"status": "failed", "error": error}
    return {"batch_size": result["batch_size"], "same_outputs": result["check"], "implementations": rows}


def _finite(value: float) -> float | None:
    """`value` rounded, or None where there is none (MFU without a datasheet peak: on CPU)."""
    return round(value, 4) if math.isfinite(value) else None


ENGINES = {
    "deepspeed_zero2": ["engine.backend=deepspeed", "engine.zero_stage=2", "engine.overlap_comm=false"],
    "deepspeed_zero2_overlap": ["engine.backend=deepspeed", "engine.zero_stage=2", "engine.overlap_comm=true"],
    "fairscale_ddp": ["engine.backend=fairscale"],
}


def engines(quick: bool, deadline: float) -> dict[str, Any]:
    """Each engine in its own 1-GPU run of the real loop; one that fails keeps the others."""
    for module in ("deepspeed", "fairscale", "omegaconf"):
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            raise CannotRunError(f"{module} not importable ({type(err).__name__}); install the wheels") from err
    gpu = torch.cuda.is_available()
    chosen = ENGINES if gpu else {k: v for k, v in ENGINES.items() if "overlap" not in k}  # no streams on CPU
    out: dict[str, Any] = {}
    for port, (label, engine) in enumerate(chosen.items(), start=29517):
        if time.time() > deadline:
            out[label] = {"status": "skipped", "why": "time budget spent"}
            continue
        try:
            out[label] = {"status": "measured", **_engine_run(engine, gpu, quick, port, deadline)}
        except Exception as err:  # noqa: BLE001 - reported, the next engine runs
            out[label] = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:1000]}
    return out


def _engine_run(engine: list[str], gpu: bool, quick: bool, port: int, deadline: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["train.synthetic=true", "model.num_classes=1000", "engine.precision=bf16", *engine]
        overrides += [f"train.output_dir={tmp}", "train.name=gpu_check", "tracking.enabled=false", "data.num_workers=0"]
        overrides += ["checkpoint.export_at_end=false", "train.log_every=5", "tracking.log_every=5"]
        if gpu:
            overrides += ["data.batch_size=128", f"train.max_steps={20 if quick else 40}"]
        else:  # a small model and batch: the CPU subset checks the path, not the speed
            overrides += ["data.batch_size=8", "data.image_size=64", "train.max_steps=6"]
            overrides += [
                "model.options.depths=[1,1,1,1]",
                "model.options.widths=[32,64,128,256]",
                "model.options.heads=[1,2,4,8]",
            ]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={port}"]
        cmd = [*launcher, "-m", "lsa_dist.train", "--config", str(ROOT / "configs" / "lsa_tiny.yaml"), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds_left(deadline), env=env, cwd=tmp)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(" | ".join(tail))
        rows = [json.loads(line) for line in (Path(tmp) / "gpu_check" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/images_per_s" in r][1:]  # the first window holds start-up
    return {
        "config": "lsa_tiny bf16, 1 rank, synthetic data" if gpu else "a small lsa_tiny at 64 px, CPU",
        "images_per_s": round(statistics.median(r["train/images_per_s"] for r in train), 1) if train else None,
        "mfu": round(statistics.median(r["train/mfu"] for r in train), 4) if train else None,
        "mfu_executed": round(statistics.median(r["train/mfu_executed"] for r in train), 4) if train else None,
        "first_step_s": next((round(r["train/first_step_s"], 1) for r in rows if "train/first_step_s" in r), None),
        "final_loss": next((r["train/loss"] for r in reversed(rows) if "train/loss" in r), None),
    }


def loaders(quick: bool, deadline: float) -> dict[str, Any]:
    try:
        importlib.import_module("webdataset")
    except Exception as err:  # noqa: BLE001
        raise CannotRunError(f"webdataset not importable ({type(err).__name__}); install the wheels") from err
    from lsa_dist.config import AugmentConfig, DataConfig
    from lsa_dist.data import build_loader
    from lsa_dist.data.convert import ConvertOptions, convert

    sys.path.insert(0, str(ROOT / "tools"))
    from make_photo_dataset import make_photo_dataset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = min(8, os.cpu_count() or 1)
    out: dict[str, Any] = {"workers": workers, "device": str(device)}
    with tempfile.TemporaryDirectory() as tmp:
        src, shards = Path(tmp) / "photos", Path(tmp) / "shards"
        make_photo_dataset(src, classes=4, per_class=64 if quick else 160, val_per_class=4)
        try:
            importlib.import_module("ffcv")
            formats = "both"
        except Exception as err:  # noqa: BLE001
            formats = "wds"
            out["ffcv"] = {"status": "skipped", "why": f"ffcv not importable ({type(err).__name__}: {err})"[:300]}
        convert(src, shards, formats, ("train", "val"), ConvertOptions(samples_per_shard=64), workers=workers)
        for fmt in ("wds", "ffcv") if formats == "both" else ("wds",):
            if time.time() > deadline + GRACE_S:
                out[fmt] = {"status": "skipped", "why": "time budget spent"}
                continue
            cfg = DataConfig(
                format=fmt, root=str(shards), batch_size=32, num_workers=workers, augment=AugmentConfig(recipe="basic")
            )
            loader = build_loader(cfg, "train", 0, 1, True)
            for _ in loader.epoch(0):  # warm-up: workers, FFCV's compilation
                pass
            start, images = time.perf_counter(), 0
            for batch, _labels in loader.epoch(1):
                x = loader.to_model_input(batch.to(device, non_blocking=True))
                images += x.shape[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[fmt] = {"status": "measured", "images_per_s": round(images / (time.perf_counter() - start), 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("gpu_check.json"), help="the JSON report (default gpu_check.json)"
    )
    parser.add_argument(
        "--budget-s", type=int, default=270, help="no part starts after this many seconds (default 270)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer sizes and steps")
    parser.add_argument("--cpu", action="store_true", help="run the CPU subset even where a GPU is unusable")
    parser.add_argument("--parts", default="environment,attention,model,engines,loaders", help="which parts, in order")
    args = parser.parse_args(argv)
    unusable = None if args.cpu else unusable_gpu()
    if unusable:
        print(f"error: {unusable}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("no GPU on this machine: the CPU subset runs (small sizes, no compile, no SDPA kernels)", flush=True)
    deadline = time.time() + args.budget_s
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gpu": torch.cuda.is_available()}
    parts = {
        "environment": environment,
        "attention": attention,
        "model": lambda: model_steps(args.quick, deadline),
        "engines": lambda: engines(args.quick, deadline),
        "loaders": lambda: loaders(args.quick, deadline),
    }
    for name in args.parts.split(","):
        if name not in parts:
            parser.error(f"unknown part {name!r}; choose from {', '.join(parts)}")
        report[name] = run_part(name, parts[name], deadline)
        args.out.write_text(json.dumps(report, indent=2, default=str))  # what was measured survives a kill
    skipped = [f"{n} ({p['why']})" for n, p in report.items() if isinstance(p, dict) and p.get("status") == "skipped"]
    failed = [n for n, p in report.items() if isinstance(p, dict) and p.get("status") == "failed"]
    print(f"\nwrote {args.out}; skipped: {', '.join(skipped) or 'nothing'}; failed: {', '.join(failed) or 'nothing'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
