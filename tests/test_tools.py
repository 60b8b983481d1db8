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


def test_memory_plan_chooses_the_engine_that_communicates_least_and_fits(tmp_path: Path) -> None:
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
