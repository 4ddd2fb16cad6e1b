"""Training with compressed saved inputs reaches the accuracy of torch.nn.Linear on digits.

A short run of bench/linear.py's part 3 (the same models and loop): every save mode within 2
points of the torch.nn.Linear model trained with the same seed, steps and optimiser.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from linear import DIGITS_MODELS  # noqa: E402
from _digits import train_digits  # noqa: E402

STEPS = {"mlp-tanh 3x256": 300, "mixer 2x64": 300}


@pytest.mark.parametrize("model", list(STEPS))
def test_every_mode_within_two_points_of_torch(model):
    builder = DIGITS_MODELS[model]
    baseline = train_digits(builder(None), STEPS[model])
    assert baseline > 90.0
    for save in ("asa", "int8", "int4", "int2"):
        accuracy = train_digits(builder(save), STEPS[model])
        # 2 points may be a whole number of test samples: their percentages differ by 2 up to rounding
        assert baseline - accuracy <= 2.0 + 1e-9, (save, accuracy, baseline)
