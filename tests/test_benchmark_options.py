"""The benchmark's TILING tokens reach the predictor as the knobs they name."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from benchmark import predictor_options  # noqa: E402

from app.inference import CROP_MARGIN, EnsemblePredictor  # noqa: E402


@pytest.mark.parametrize("token, expected", [
    ("fast", {"tiling": "fast"}),
    ("paper", {"tiling": "paper"}),
    ("whole", {"tiling": "fast", "max_tile": (160, 192, 192), "margin": 8}),
    ("t24x48x64m3", {"tiling": "fast", "max_tile": (24, 48, 64), "margin": 3}),
    ("papershift2", {"tiling": "paper", "crop_margin": CROP_MARGIN + 2}),
    ("fastfixed", {"tiling": "fast", "shift_folds": False}),
    ("t16x32x32m2fixed", {"tiling": "fast", "max_tile": (16, 32, 32), "margin": 2, "shift_folds": False}),
])
def test_tokens_become_predictor_knobs(token, expected):
    options = predictor_options(token)
    assert options == expected
    EnsemblePredictor(device="cpu", **options)  # every token builds a valid predictor


@pytest.mark.parametrize("token", ["t16x32m2", "tiles", "papershift", "t16x32x32", "fixed", "paperfixed"])
def test_unknown_tokens_are_refused(token):
    with pytest.raises(ValueError, match="tiling must be"):
        predictor_options(token)

