"""Every pair of values of the options that change the training path (tools/combinations.py's
OPTIONS) in at least one case that trains, stops and resumes to the uninterrupted run's weights
bit for bit; every pair the config refuses, refused at load in one line that the docs list.

The compile cases compile with `engine.compile_backend=aot_eager`: dynamo's capture and
AOTAutograd's graphs with every partner option, without inductor's kernel generation (minutes
per graph on this CPU); inductor itself: test_train.py::test_compiled_model_trains_like_the_eager_one,
and `tools/combinations.py` runs these cases with inductor."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from combinations import OPTIONS, Case, Setting, covered_pairs, init_file, pairwise, refusal, run_cases, small_dataset  # noqa: E402

pytestmark = pytest.mark.slow


def test_every_pair_of_options_trains_and_resumes_exactly_or_is_refused_at_load(
    demo_source: Path, tmp_path: Path
) -> None:
    data = small_dataset(demo_source, tmp_path / "data")
    setting = Setting(data, init_file(tmp_path), tmp_path, ["engine.compile_backend=aot_eager"])
    cases = run_cases(pairwise(OPTIONS, setting), setting, progress=False)
    failed = [f"{c.values}: {c.detail}" for c in cases if c.outcome in ("failed", "")]
    assert not failed, "\n".join(failed)
    # bit for bit on WebDataset; on FFCV (its decoder draws the crops unseeded) every step once, in order
    trained = [c for c in cases if c.outcome.startswith("resumed")]
    for case in trained:
        ffcv = case.values["data.format"] == "ffcv"
        assert case.outcome == ("resumed, steps once" if ffcv else "resumed exactly"), case
        if not ffcv:
            same, total = case.identical.split("/")
            assert same == total and int(total) > 0, case
    # every pair of values that the config accepts together (the others at their first value)
    # is in a trained case: checked here without the generator's bookkeeping
    default = {k: v[0] for k, v in OPTIONS.items()}
    covered = covered_pairs(trained)
    for (a, values_a), (b, values_b) in itertools.combinations(sorted(OPTIONS.items()), 2):
        for va, vb in itertools.product(values_a, values_b):
            if (a, va, b, vb) not in covered:  # then the config must refuse the pair
                assert refusal(Case({**default, a: va, b: vb}), setting), f"{a}={va} with {b}={vb} is never trained"
    # each refusal is one line, listed in the docs with its reason, and nothing was started
    docs = (ROOT / "docs" / "combinations.md").read_text()
    refused = [c for c in cases if c.outcome == "refused"]
    assert refused
    for case in refused:
        assert "\n" not in case.detail and case.detail.split(";")[0] in docs, case.detail
        assert not (tmp_path / case.name).exists()
