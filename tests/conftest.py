"""Shared fixtures: the demo dataset, built once per test session, on disk."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_demo_dataset import make_demo_dataset  # noqa: E402

from lsa_dist.data.convert import ConvertOptions, convert  # noqa: E402
from lsa_dist.log import setup_logging  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def library_logging() -> None:
    """What every entry point does first: the library's lines on stdout and stderr, where tests
    read them (capsys), as rank 0."""
    setup_logging(0)


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "imagenet"
    counts = make_demo_dataset(out)
    assert counts == {"train": 1438, "val": 359}
    return out


@pytest.fixture(scope="session")
def demo_shards(demo_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    convert(demo_source, out, "both", options=ConvertOptions(samples_per_shard=150), workers=2)
    return out


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow database with its tables made, once: a new one runs MLflow's migrations (~8 s)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def mlflow_db_in_tmp_path(request: pytest.FixtureRequest) -> None:
    """A test's tmp_path starts with an empty, ready mlflow.db: where its runs track by default
    (the launch folder) and where the tests point tracking.uri."""
    if "tmp_path" in request.fixturenames:
        tmp_path = request.getfixturevalue("tmp_path")
        shutil.copy(request.getfixturevalue("empty_mlflow_db"), tmp_path / "mlflow.db")
