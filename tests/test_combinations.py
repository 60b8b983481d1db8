"""Every pair of values of the options that change the training path, in at least one case that
trains, stops and resumes to the uninterrupted run's weights bit for bit; every pair the config
refuses, refused at load in one line that the docs list (tools/combinations.py's cases)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from combinations import OPTIONS, Case, Setting, covered_pairs, init_file, pairwise, refusal, run_cases, small_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_every_pair_of_options_trains_and_resumes_exactly_or_is_refused_at_load(
    demo_source: Path, tmp_path: Path
) -> None:
    data = small_dataset(demo_source, tmp_path / "data")
    setting = Setting(data, init_file(tmp_path), tmp_path)
    cases = run_cases(pairwise(OPTIONS, setting), setting, progress=False)
    failed = [f"{c.values}: {c.detail}" for c in cases if c.outcome in ("failed", "")]
    assert not failed, "\n".join(failed)
    # bit for bit on WebDataset; on FFCV (unseeded crops in its decoder) every step once, in order
    trained = [c for c in cases if c.outcome.startswith("resumed")]
    for case in trained:
        ffcv = case.values["data.format"] == "ffcv"
        assert case.outcome == ("resumed, steps once" if ffcv else "resumed exactly"), case
        assert ffcv or case.identical.split("/")[0] == case.identical.split("/")[1]
    # every pair of values that the config accepts together (the others at their first value)
    # is in a trained case: checked here without the generator's bookkeeping
    default = {k: v[0] for k, v in OPTIONS.items()}
    covered = covered_pairs(trained)
    for (a, values_a), (b, values_b) in itertools.combinations(sorted(OPTIONS.items()), 2):
        for va, vb in itertools.product(values_a, values_b):
            if not refusal(Case({**default, a: va, b: vb}), setting):
                assert (a, va, b, vb) in covered, f"{a}={va} with {b}={vb} is accepted but never trained"
    docs = (ROOT / "docs" / "combinations.md").read_text()
    for case in (c for c in cases if c.outcome == "refused"):
        assert "\n" not in case.detail and case.detail.split(";")[0] in docs, case.detail
        assert not (tmp_path / case.name).exists()  # nothing started
