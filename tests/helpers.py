"""Shared pieces of the end-to-end tests: the tiny model config and the local launcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# configs/demo.yaml shrunk to a 16-wide, 3-block LSA: fast real training runs
TINY = [
    "model.options.widths=[16,16]",
    "model.options.heads=[2,2]",
    "model.options.depths=[2,1]",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "data.num_workers=0",
    "optim.epochs=2",
    "optim.warmup_epochs=0.5",
    "tracking.log_every=1",
]


def local_command(tmp: Path, name: str, data: Path, *overrides: str, nproc: int = 2) -> list[str]:
    """launch/local.py on the demo config with TINY, then `overrides` (which win)."""
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    return cmd + [
        "--nproc",
        str(nproc),
        f"data.root={data}",
        f"train.output_dir={tmp}",
        f"train.name={name}",
        *TINY,
        *overrides,
    ]


def run_local(
    tmp: Path, name: str, data: Path, *overrides: str, nproc: int = 2, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    return subprocess.run(
        local_command(tmp, name, data, *overrides, nproc=nproc),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
        env=env,
    )
