"""trainer.engine.optim.lr_multiplier: the warmup + cosine/constant schedule, on literal steps with values
worked out by hand from its definition (step is the 0-based optimizer step):

    warmup  (step < W):  (step + 1) / W
    cosine  (after):     m + (1 - m) · ½ · (1 + cos(π · p)),  p = min(1, (step - W) / max(1, S - 1 - W))
    constant (after):    1
"""

from __future__ import annotations

import math

import pytest

from trainer.config import LRSchedule
from trainer.engine.optim import lr_multiplier


def schedule(kind: str, warmup: int, max_steps: int, min_ratio: float = 0.1):
    return [
        lr_multiplier(s, warmup_steps=warmup, max_steps=max_steps, schedule=kind, min_ratio=min_ratio)
        for s in range(max_steps)
    ]


def test_linear_warmup_reaches_the_peak_at_its_last_step():
    # W = 4: 1/4, 2/4, 3/4, 4/4, then the decay starts from the peak (p = 0 at step W).
    assert schedule("cosine", warmup=4, max_steps=10)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert schedule("constant", warmup=4, max_steps=6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_the_peak_to_min_ratio_at_the_last_step():
    # W = 2, S = 7: p = (step - 2) / 4 -> 0, 1/4, 1/2, 3/4, 1 for steps 2..6.
    # p = 1/4: 0.1 + 0.9 · ½ · (1 + cos(π/4)) = 0.1 + 0.45 · (1 + √2/2)
    # p = 1/2: 0.1 + 0.9 · ½ · (1 + 0)      = 0.55
    # p = 3/4: 0.1 + 0.45 · (1 - √2/2)
    # p = 1:   0.1 + 0.9 · ½ · (1 - 1)      = 0.1 (min_ratio, at step S - 1)
    half_root2 = math.sqrt(2) / 2
    expected = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + half_root2), 0.55, 0.1 + 0.45 * (1 - half_root2), 0.1]
    assert schedule("cosine", warmup=2, max_steps=7) == pytest.approx(expected, abs=1e-12)


def test_cosine_without_warmup_starts_at_the_peak_and_min_ratio_scales_the_floor():
    # W = 0, S = 3: p = 0, 1/2, 1.
    assert schedule("cosine", warmup=0, max_steps=3, min_ratio=0.0) == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert schedule("cosine", warmup=0, max_steps=3, min_ratio=0.5) == pytest.approx([1.0, 0.75, 0.5], abs=1e-12)
    # min_ratio 1 makes the cosine flat
    assert schedule("cosine", warmup=1, max_steps=5, min_ratio=1.0) == [1.0] * 5


def test_past_max_steps_the_cosine_stays_at_min_ratio():
    # p is clamped at 1: a run resumed with a smaller trainer.max_steps does not climb back up.
    assert lr_multiplier(20, warmup_steps=2, max_steps=7, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)


def test_the_config_enum_selects_the_schedule():
    """build_optimizer passes TrainerConfig.schedule.decay, an LRSchedule member, not a str: it must
    select the same branch (a member of a str Enum compares equal to its value)."""
    assert lr_multiplier(5, 2, 7, LRSchedule.constant, 0.1) == 1.0
    assert lr_multiplier(6, 2, 7, LRSchedule.cosine, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "max_steps, warmup, expected",
    [
        (1, 0, [1.0]),  # a single step: p = 0 / max(1, 0) = 0, the peak
        (2, 1, [1.0, 1.0]),  # warmup ends at the last step: no step left to decay in
        (2, 0, [1.0, 0.1]),  # S - 1 - W = 1: the second step is already the floor
        (3, 5, [0.2, 0.4, 0.6]),  # warmup longer than the run: the peak is never reached
    ],
)
def test_very_short_runs(max_steps, warmup, expected):
    assert schedule("cosine", warmup=warmup, max_steps=max_steps) == pytest.approx(expected, abs=1e-12)
