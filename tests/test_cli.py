"""The front door the entry points share: arguments, one-line errors with exit code 2, and the
checks made before any process starts (in seconds; the launchers' own runs are in test_train)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsa_dist import cli
from lsa_dist.config import ConfigError
from lsa_dist.data import DatasetError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def test_parser_takes_config_and_overrides_and_shows_the_docstring() -> None:
    parser = cli.config_parser("Do a thing.\n\n    usage line\n\nMore words.")
    args = parser.parse_args(["--config", "x.yaml", "optim.lr=1", "data.root=/d"])
    assert args.config == Path("x.yaml") and args.overrides == ["optim.lr=1", "data.root=/d"]
    assert parser.description == "Do a thing." and "More words." in parser.epilog
    with pytest.raises(SystemExit):
        cli.config_parser("Doc.").parse_args([])  # --config is required by default


def test_fail_is_one_line_on_stderr_with_exit_code_2(capsys) -> None:
    assert cli.fail(ConfigError("optim.lr: must be > 0")) == cli.EXIT_BAD_INPUT == 2
    assert capsys.readouterr().err == "error: optim.lr: must be > 0\n"


def test_preflight_checks_dataset_hardware_and_checkpoint(demo_shards: Path, tmp_path: Path, monkeypatch) -> None:
    overrides = [f"data.root={demo_shards}", f"train.output_dir={tmp_path}", "data.batch_size=256"]
    cfg = cli.load(cli.config_parser("Doc.").parse_args(["--config", str(DEMO), *overrides]))
    assert cli.preflight(cfg, world_size=2).folder is None  # 1438 training images feed 2 x 256
    with pytest.raises(DatasetError, match="fewer than 8 ranks x batch 256 = 2048"):
        cli.preflight(cfg, world_size=8)
    assert cli.preflight(cfg, world_size=8, dataset=False).run_id == ""  # SLURM: the nodes see the data
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    cfg.engine.precision = "fp16"
    with pytest.raises(ConfigError, match="^engine.precision: fp16 needs a GPU"):
        cli.preflight(cfg, world_size=2)
    assert cli.preflight(cfg, world_size=2, hardware=False).folder is None  # the job's nodes are not this machine


def test_prepare_run_writes_the_resolved_config(tmp_path: Path) -> None:
    cfg = cli.load(cli.config_parser("Doc.").parse_args(["--config", str(DEMO), f"train.output_dir={tmp_path}"]))
    cfg.tracking.enabled = False
    path, run_id = cli.prepare_run(cfg, "", "launch_config.yaml")
    assert path == (tmp_path / "demo" / "launch_config.yaml").resolve() and run_id == ""
    assert cli.load(cli.config_parser("Doc.").parse_args(["--config", str(path)])) == cfg


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "lsa_dist.train"],
        [sys.executable, str(ROOT / "launch" / "local.py")],
        [sys.executable, str(ROOT / "launch" / "slurm.py"), "--dry-run"],
        [sys.executable, str(ROOT / "tools" / "benchmark_train.py")],
    ],
    ids=["module", "local", "slurm", "benchmark"],
)
def test_every_entry_point_reports_a_bad_key_in_one_line(command: list[str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [*command, "--config", str(DEMO), "optim.lrr=1"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: optim.lrr: unknown key")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"mlflow.db"}  # nothing written (the database was there)


def test_a_header_in_a_url_override_is_kept_and_never_printed(capsys: pytest.CaptureFixture) -> None:
    """The training command with `data.urls=pipe:curl -H 'Authorization: Bearer ...' ...` reads
    the value as a string; the one-line error about another key, and what a dry run of
    launch/slurm.py prints of the config, show *** for the token."""
    from lsa_dist.train import command

    urls = "data.urls=pipe:curl -s -H 'Authorization: Bearer T0KEN' https://h/x-{000..009}.tar"
    assert command(["--config", str(DEMO), urls, "optim.lr=X-Api-Key: K3Y"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: optim.lr: ") and "K3Y" not in err and len(err.strip().splitlines()) == 1
    assert command(["--config", str(DEMO), urls, "train.resume=/nowhere"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: train.resume: '/nowhere' is neither") and "T0KEN" not in err
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "slurm.py"), "--dry-run", "--config", str(DEMO), urls],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "urls: 'pipe:curl -s -H ''Authorization: ***'' https://h/x-{000..009}.tar'" in proc.stdout
    assert "T0KEN" not in proc.stdout + proc.stderr
