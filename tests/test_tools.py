"""User tools run end to end (small sizes; speed targets live in the benchmarks' own output)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_benchmark_checks_outputs_and_reports_both_implementations(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    cmd = [sys.executable, "tools/benchmark_model.py", "--model", "lsa_cifar_tiny", "--batch-size", "2"]
    cmd += ["--steps", "2", "--rounds", "1", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "same outputs:" in proc.stdout and "-> ok" in proc.stdout
    assert "reference" in proc.stdout and "lsa_dist" in proc.stdout
    report = json.loads(out.read_text())
    assert report["macs_per_image"] == 2_692_351_872
    assert report["check"]["logits_max_abs_diff"] < 1e-4
    for impl in ("reference", "lsa_dist"):
        result = report["results"][impl]
        assert result["images_per_s"] > 0 and result["steps"] == 2
        assert result["peak_mem_mb"] > 0
    assert report["results"]["reference"]["speedup"] == 1.0
    assert 0 < report["macs_per_image_executed"] < report["macs_per_image"] and report["failed"] == {}


def test_memory_plan_chooses_ddp_then_the_zero_stages_without_recompute_first(tmp_path: Path) -> None:
    """DDP first where the states fit whole, recompute only where nothing fits without it, and a
    batch that fits nowhere said so."""
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "tools/memory_plan.py", "--model", "lsa_cifar_tiny", "--image-size", "32"]
    cmd += ["--nodes", "1", "--gpus-per-node", "2", "--gpu-gb", "2", "--batches", "16,64,8192", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())
    ddp = next(r for r in plan["rows"] if r["engine"] == "ddp")
    assert abs(ddp["states_gb"] * 2**30 - 16 * plan["params"]) < 1  # fp32 weights, gradients, 2 moments
    assert plan["choice"] == {
        "16": {"engine": "ddp", "recompute": "none"},
        "64": {"engine": "ddp", "recompute": "all"},
        "8192": None,
    }
    assert "engine.backend=fairscale engine.zero_stage=0" in proc.stdout


def test_gpu_check_stops_at_once_on_a_gpu_torch_cannot_use(tmp_path: Path) -> None:
    """A machine whose nvidia-smi answers (here a stand-in script) while torch sees no CUDA device:
    one line naming the GPU, the driver and torch's CUDA version, exit 2, no report written; the
    lent GPU's minutes are not spent on a CPU run."""
    import os

    import torch

    if torch.cuda.is_available():
        return  # this machine's GPU is usable: nothing to refuse
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text('#!/bin/sh\necho "NVIDIA H200, 535.104.05"\n')
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{smi.parent}:{os.environ['PATH']}"}
    out = tmp_path / "report.json"
    cmd = [sys.executable, "tools/gpu_check.py", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and not out.exists(), proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "NVIDIA H200, 535.104.05" in lines[0] and f"torch {torch.__version__}" in lines[0]
    assert f"(CUDA {torch.version.cuda})" in lines[0] and "--cpu" in lines[0]


def test_fashion_benchmark_reports_each_evaluation_against_the_published_figures(tmp_path: Path) -> None:
    from lsa_dist.record import append_record

    run = tmp_path / "runs" / "fashion"
    run.mkdir(parents=True)
    record = run / "metrics.jsonl"
    append_record(record, {"train/first_step_s": 0.5}, 1)
    append_record(record, {"train/loss": 1.0}, 10)
    append_record(record, {"epoch": 1, "val/top1": 90.0}, 468)
    append_record(record, {"epoch": 2, "val/top1": 93.0}, 936)
    cmd = [sys.executable, "tools/benchmark_fashion.py", "--reuse", f"train.output_dir={tmp_path / 'runs'}"]
    cmd += ["--json", str(tmp_path / "f.json"), "--plot", str(tmp_path / "f.png"), "--beside", str(run)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "best 0.9300 at epoch 2; 0.925 reached at epoch 2" in proc.stdout
    report = json.loads((tmp_path / "f.json").read_text())
    assert [(r["epoch"], r["top1"]) for r in report["rows"]] == [(1, 0.9), (2, 0.93)]
    assert report["published"]["ResNet-18"] == 0.949 and report["launch_minutes"] is None
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    empty = subprocess.run(
        [*cmd[:3], "train.name=none", f"train.output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True
    )
    assert empty.returncode == 2 and "metrics.jsonl is missing: train the run first" in empty.stderr
