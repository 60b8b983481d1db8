"""Metrics and where they go: accuracy with padding, evaluation, MFU's peak, the console's
progress line, metrics.jsonl (seconds, in this process)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from lsa_dist.metrics import PEAKS, accuracy_counts, evaluate, gpu_peak, mfu, peak_flops
from lsa_dist.sinks import Console, MetricsFile, Sinks, format_duration, interactive, metrics_line, progress_line
from lsa_dist.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]

PROGRESS = {
    "progress/loss": 1.23456,
    "progress/lr": 0.0012,
    "progress/epoch": 2.5,
    "progress/images_per_s": 812.3,
    "progress/data_wait_ms": 3.21,
    "progress/step_ms": 78.9,
    "progress/peak_mem_mb": 1234.0,
    "progress/eta_s": 3725.0,
}


def test_accuracy_counts_leave_padding_out() -> None:
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0], [1, 2, 3, 4, -9.0, 5], [9.0, 0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 2, 4, -1])  # the last is evaluation padding
    loss, top1, top5, count = accuracy_counts(logits, labels)
    assert (top1, top5, count) == (1, 2, 3)  # label 2 is 2nd in row 1; label 4 last in row 2
    expected = torch.nn.functional.cross_entropy(logits[:3], labels[:3], reduction="sum").item()
    assert loss == pytest.approx(expected)
    assert accuracy_counts(logits[3:], labels[3:]) == (0.0, 0.0, 0.0, 0.0)


def test_evaluate_sums_batches_without_a_process_group() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 3 * 2 * 2)
    batches = [
        (torch.randint(0, 255, (5, 3, 2, 2), dtype=torch.uint8), torch.tensor([0, 1, 2, 3, -1])) for _ in range(3)
    ]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ weight.T

    def to_input(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255

    metrics = evaluate(forward, batches, to_input, torch.device("cpu"))
    sums = [accuracy_counts(forward(to_input(x)), y) for x, y in batches]
    assert metrics["val/images"] == 12
    assert metrics["val/top1"] == pytest.approx(100 * sum(s[1] for s in sums) / 12)
    assert metrics["val/loss"] == pytest.approx(sum(s[0] for s in sums) / 12)


def test_peak_flops_draws_no_random_numbers() -> None:
    """Measured after a resume restored the RNG: a draw here would change every later one."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert peak_flops(torch.device("cpu"), torch.float32) > 1e8
    assert torch.equal(torch.get_rng_state(), before)
    assert mfu(100.0, 1e9, 1e12, 2) == pytest.approx(100 * 6e9 / 2e12)


def test_a_cpus_peak_is_its_fastest_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without bf16 units emulates bf16 matmuls ~100x slower than float32 ones (1.4 against
    152 GFLOP/s measured on an AVX2 EPYC) while the model's bf16 kernels run far faster: against
    the bf16 rate a bf16 run's MFU read 369%. The peak is the faster of the two rates."""
    import lsa_dist.metrics as M

    rates = {torch.float32: 150e9, torch.bfloat16: 1.4e9}
    monkeypatch.setattr(M, "_matmul_rate", lambda dtype: rates[dtype])
    assert peak_flops(torch.device("cpu"), torch.bfloat16) == 150e9
    rates[torch.bfloat16] = 600e9  # a CPU with bf16 units (AMX)
    assert peak_flops(torch.device("cpu"), torch.bfloat16) == 600e9
    assert peak_flops(torch.device("cpu"), torch.float32) == 150e9


def test_progress_line_has_every_field() -> None:
    line = progress_line(PROGRESS, 120, 1100)
    assert line == (
        "step 120/1100  epoch 2.50  loss 1.2346  lr 1.200e-03  812.3 img/s  data 3.2 ms  step 78.9 ms  "
        "mem 1234 MB  eta 1:02:05"
    )
    assert format_duration(0) == "0:00:00" and format_duration(-5) == "0:00:00" and format_duration(86399) == "23:59:59"


def test_console_prints_progress_lines_when_not_a_terminal(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSA_PROGRESS", "0")
    assert not interactive()
    console = Console(enabled=True, epochs=5, total_steps=1100)
    console.show(PROGRESS, 120)
    console.show({"train/loss": 2.0, "train/lr": 0.1}, 121)  # per-step metrics: files and MLflow only
    console.show({"epoch": 3, "train/epoch_loss": 1.5, "val/top1": 75.0, "val/loss": 0.9}, 330)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 120/1100  epoch 2.50")
    assert lines[1] == "epoch 3/5 step 330  train/epoch_loss 1.5000  val/loss 0.9000  val/top1 75.00%"
    Console(enabled=False, epochs=5, total_steps=1100).show(PROGRESS, 120)  # other ranks say nothing
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("LSA_PROGRESS", "1")
    assert interactive()


def test_one_log_call_feeds_the_file_and_the_console(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LSA_PROGRESS", "0")
    from lsa_dist.config import RunConfig

    sinks = Sinks(
        MetricsFile(tmp_path / "metrics.jsonl", True),
        Tracker(RunConfig(), "", tmp_path / "spool"),
        Console(True, 2, 50),
    )
    sinks.log(PROGRESS, 10)
    sinks.log({"train/loss": 2.5}, 11)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 11] and rows[1]["train/loss"] == 2.5 and rows[0]["progress/loss"] > 1
    assert re.match(r"step 10/50  epoch 2\.50  loss 1\.2346", capsys.readouterr().out)
    assert metrics_line({"val/top5": 99.5, "other": 1}) == "val/top5 99.50%"


def test_gpu_peaks_come_from_datasheets_by_device_name(capsys: pytest.CaptureFixture) -> None:
    """Names as torch reports them; the dense bf16 figure (fp32 runs as TF32); an unknown GPU
    gets no MFU (NaN) and one warning asking for engine.peak_tflops."""
    expected = {
        "NVIDIA H100 80GB HBM3": (989, 495),
        "NVIDIA H100 PCIe": (756, 378),
        "NVIDIA H100 NVL": (835, 418),
        "NVIDIA H200": (989, 495),
        "NVIDIA B200": (2250, 1100),
        "NVIDIA A100-SXM4-40GB": (312, 156),
        "NVIDIA A100 80GB PCIe": (312, 156),
        "NVIDIA L40S": (362, 183),
        "NVIDIA A10": (125, 62.5),
        "Tesla V100-SXM2-32GB": (125, 15.7),
    }
    for name, (bf16, tf32) in expected.items():
        assert gpu_peak(name, torch.bfloat16) == bf16 * 1e12 and gpu_peak(name, torch.float32) == tf32 * 1e12, name
    assert all(peak.source.startswith("NVIDIA ") and "datasheet" in peak.source for peak in PEAKS)
    capsys.readouterr()
    assert math.isnan(gpu_peak("NVIDIA GeForce RTX 9999", torch.bfloat16))
    assert math.isnan(gpu_peak("NVIDIA GeForce RTX 9999", torch.float32))
    err = capsys.readouterr().err
    assert err.count("warning: no peak FLOP/s known for GPU 'NVIDIA GeForce RTX 9999'") == 1
    assert "engine.peak_tflops" in err


class QueuedLoss:
    """A step's loss while the device still works on it: reading it waits for the work."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def item(self) -> float:
        time.sleep(self.seconds)
        return 2.0

    __float__ = item

    def __radd__(self, other: float) -> QueuedLoss:
        return self


def test_throughput_windows_close_when_the_device_has_finished_their_steps() -> None:
    """images/s (and so MFU) counts the time the device takes to finish the window's steps,
    which a GPU reports only when the loss is read, not the time it took to queue them."""
    from lsa_dist.config import load_config
    from lsa_dist.telemetry import Position, StepOutput, Telemetry

    cfg = load_config(
        ROOT / "configs" / "demo.yaml", ["engine.peak_tflops=1", "tracking.log_every=1", "train.log_every=1"]
    )
    telemetry = Telemetry(cfg, macs={32: (10**6, 9 * 10**5)}, world_size=1, device=torch.device("cpu"))
    telemetry.first_step_logged = True
    telemetry.start()
    due = telemetry.count(StepOutput(QueuedLoss(0.3), None), 64, 1, True, lambda: Position(0.5, 0, 1e-3, 32))
    metrics = {k: v for d in due for k, v in d.items()}
    assert metrics["train/loss"] == 2.0 and metrics["progress/loss"] == 2.0
    assert metrics["train/images_per_s"] <= 64 / 0.3 and metrics["progress/images_per_s"] <= 64 / 0.3
    assert metrics["train/mfu"] <= mfu(64 / 0.3, 10**6, 1e12, 1)
    assert metrics["train/mfu_executed"] == pytest.approx(0.9 * metrics["train/mfu"])
