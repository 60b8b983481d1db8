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
