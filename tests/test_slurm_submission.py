"""launch/slurm.py's submission files, with a stand-in sbatch: no cluster needed (the cluster
tests are in test_slurm.py)."""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

import pytest

from lsa_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def slurm_launcher():  # noqa: ANN201 - the launch/slurm.py module
    spec = importlib.util.spec_from_file_location("launch_slurm", ROOT / "launch" / "slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("runs", [1, 2], ids=["job", "array"])
def test_the_submission_script_with_setup_lines_is_the_owners_only(
    runs: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """launch.slurm.setup lines (an exported token) go into the sbatch script submitit keeps in
    the job folder: that folder is 0700 and its files 0600, for one job and for a job array."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'Submitted batch job 4242'\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    slurm = slurm_launcher()
    overrides = [f"train.output_dir={tmp_path / 'runs'}", "tracking.enabled=false"]
    overrides.append("launch.slurm.setup=['export HF_TOKEN=S3CRET']")
    jobs = [load_config(ROOT / "configs" / "demo.yaml", [*overrides, f"train.name=r{i}"]) for i in range(runs)]
    params = slurm.executor_parameters(slurm.build_parser().parse_args(["--config", "x.yaml"]), jobs[0])
    submitted = slurm.submit(jobs, [""] * runs, params, None)
    base = submitted[0][1].paths.folder.parent  # RUN/slurm, or the sweep's folder
    written = [p for p in base.rglob("*") if not p.is_symlink()]
    scripts = [p for p in written if p.name.endswith("_submission.sh")]
    assert len(scripts) == 1 and "export HF_TOKEN=S3CRET" in scripts[0].read_text()
    assert all(job.paths.folder.is_dir() for _, job, _ in submitted)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [base, *written]}
    assert all(mode == (0o700 if p.is_dir() else 0o600) for p, mode in modes.items()), modes
