#!/usr/bin/env python
"""One prepared check of the GPU path, writing one JSON: what a GPU machine does with lsa_dist.

Parts, each reported as measured, skipped (with why) or failed (with the error), never
stopping the others:

  environment   torch, CUDA, the device and its datasheet peak, which dependencies import
  attention     the SDPA kernel bf16 global attention takes (flash, memory-efficient, math)
  model         lsa_tiny and lsa_small bf16 training step, ours against the reference
                implementation and ours under torch.compile: images/s, peak memory, MFU
                (tools/benchmark_model.py, one process per implementation)
  deepspeed     a 1-GPU DeepSpeed ZeRO-2 bf16 run of the real engine and loop on
                train.synthetic data: images/s and MFU from its metrics
  loaders       WebDataset and FFCV images/s into the device (decode, augment, copy,
                normalise) on a generated photo dataset

On a machine without a GPU it runs the CPU subset (small sizes) and says what it skipped.
Only PyTorch and timm are needed beforehand; the rest (deepspeed, webdataset, omegaconf,
submitit, mlflow, fairscale, simplejpeg, ffcv: see docs/benchmarks.md) may come as wheels:

    pip install --no-index --find-links wheels/ deepspeed webdataset omegaconf submitit ...
    python tools/gpu_check.py --out gpu_check.json [--budget-s 420]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
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
        )
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
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lsa_dist.models import create_model

    taken = {}
    for name in ("lsa_tiny", "lsa_cifar_tiny"):
        model = create_model(name).cuda().to(torch.bfloat16).train()
        size = model.cfg.image_size
        images = torch.randn(8, 3, size, size, device="cuda", dtype=torch.bfloat16)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    model(images).float().sum().backward()
                taken[name] = backend.name.lower()
                break
            except RuntimeError:
                continue
    return {"backend": taken}


def model_steps(quick: bool) -> dict[str, Any]:
    gpu = torch.cuda.is_available()
    cases = [("lsa_tiny", 64 if gpu else 4), ("lsa_small", 64 if gpu else 2)]
    if quick or not gpu:
        cases = cases[:1]
    out = {}
    for name, batch in cases:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "model.json"
            cmd = [
                sys.executable,
                str(ROOT / "tools" / "benchmark_model.py"),
                "--model",
                name,
                "--batch-size",
                str(batch),
            ]
            cmd += [
                "--dtype",
                "bf16",
                "--steps",
                "20" if gpu else "2",
                "--rounds",
                "2" if gpu else "1",
                "--json",
                str(report),
            ]
            if gpu:
                cmd.append("--compile")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
            result = json.loads(report.read_text())
        out[name] = _with_mfu(result)
    if not gpu:
        out["skipped"] = "lsa_small and torch.compile (CPU: minutes each)"
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
        }
    return {"batch_size": result["batch_size"], "same_outputs": result["check"], "implementations": rows}


def _finite(value: float) -> float | None:
    """`value` rounded, or None where there is none (MFU without a datasheet peak: on CPU)."""
    return round(value, 4) if math.isfinite(value) else None


def deepspeed_step(quick: bool) -> dict[str, Any]:
    for module in ("deepspeed", "omegaconf"):
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            raise CannotRunError(f"{module} not importable ({type(err).__name__}); install the wheels") from err
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["train.synthetic=true", "model.num_classes=1000", "engine.zero_stage=2", "engine.precision=bf16"]
        overrides += [f"train.output_dir={tmp}", "train.name=gpu_check", "tracking.enabled=false", "data.num_workers=0"]
        overrides += ["checkpoint.export_at_end=false", "train.log_every=5", "tracking.log_every=5"]
        if gpu:
            overrides += ["data.batch_size=128", f"train.max_steps={20 if quick else 60}"]
        else:  # a small model and batch: the CPU subset checks the path, not the speed
            overrides += ["data.batch_size=8", "data.image_size=64", "train.max_steps=6"]
            overrides += [
                "model.options.depths=[1,1,1,1]",
                "model.options.widths=[32,64,128,256]",
                "model.options.heads=[1,2,4,8]",
            ]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29517"]
        cmd = [*launcher, "-m", "lsa_dist.train", "--config", str(ROOT / "configs" / "lsa_tiny.yaml"), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=tmp)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(" | ".join(tail))
        rows = [json.loads(line) for line in (Path(tmp) / "gpu_check" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/images_per_s" in r][1:]  # the first window holds start-up
    return {
        "config": "lsa_tiny, ZeRO-2 bf16, 1 rank, synthetic data" if gpu else "a small lsa_tiny at 64 px, CPU",
        "images_per_s": round(statistics.median(r["train/images_per_s"] for r in train), 1) if train else None,
        "mfu": round(statistics.median(r["train/mfu"] for r in train), 4) if train else None,
        "first_step_s": next((round(r["train/first_step_s"], 1) for r in rows if "train/first_step_s" in r), None),
        "final_loss": next((r["train/loss"] for r in reversed(rows) if "train/loss" in r), None),
    }


def loaders(quick: bool) -> dict[str, Any]:
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
        "--budget-s", type=int, default=420, help="no part starts after this many seconds (default 420)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer sizes and steps")
    parser.add_argument(
        "--parts", default="environment,attention,model,deepspeed,loaders", help="which parts, in order"
    )
    args = parser.parse_args(argv)
    deadline = time.time() + args.budget_s
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gpu": torch.cuda.is_available()}
    parts = {
        "environment": environment,
        "attention": attention,
        "model": lambda: model_steps(args.quick),
        "deepspeed": lambda: deepspeed_step(args.quick),
        "loaders": lambda: loaders(args.quick),
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
