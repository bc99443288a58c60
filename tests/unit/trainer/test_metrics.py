"""trainer/observability/metrics.py: a logged line describes every step since the last one."""

from __future__ import annotations

import math

import pytest

from trainer.observability.metrics import MetricWindow, StepResult


def step(loss_sum, supervised, real, slots, sources, lr=1e-3, grad_norm=1.0, penalty=None):
    """A StepResult from per-source (loss_sum, supervised, real) triples; totals must add up."""
    return StepResult(
        loss_sum=loss_sum,
        supervised_tokens=supervised,
        real_tokens=real,
        slots=slots,
        source_loss_sum=[s[0] for s in sources],
        source_supervised=[s[1] for s in sources],
        source_tokens=[s[2] for s in sources],
        lr=lr,
        grad_norm=grad_norm,
        penalties={} if penalty is None else {"ewc": penalty},
    )


def test_losses_are_token_weighted_over_the_window_not_a_mean_of_steps():
    window = MetricWindow(["main"])
    window.add(step(30.0, 10, 12, 16, [(30.0, 10, 12)], lr=1e-3, grad_norm=2.0))
    window.add(step(10.0, 30, 32, 48, [(10.0, 30, 32)], lr=2e-3, grad_norm=4.0))
    out = window.summary()
    assert out["train/loss"] == pytest.approx(40 / 40)  # not (3.0 + 0.333) / 2
    assert out["train/lr"] == 2e-3  # the last
    assert out["train/grad_norm"] == pytest.approx(3.0) and out["train/grad_norm_max"] == 4.0
    assert out["data/packing_efficiency"] == pytest.approx(44 / 64)
    assert out["data/supervised_token_fraction"] == pytest.approx(40 / 64)
    assert "train/main/loss" not in out and "reg/ewc_penalty" not in out  # one source, no EWC
    assert window.summary() == {}  # the window starts anew


def test_replay_fraction_counts_every_step_of_the_window():
    """The issue's case: 5 steps logged at once, replay rows in one of them. The old logger showed
    the last step's 0.0; the window shows the replay share of all five steps' tokens."""
    window = MetricWindow(["main", "replay"])
    for k in range(5):
        replay = 100 if k == 2 else 0
        window.add(
            step(
                2.0 * (1000 - replay) + 1.0 * replay,
                1000,
                1000,
                1024,
                [(2.0 * (1000 - replay), 1000 - replay, 1000 - replay), (1.0 * replay, replay, replay)],
            )
        )
    out = window.summary()
    assert out["data/replay_token_fraction"] == pytest.approx(100 / 5000)
    assert out["data/replay/token_fraction"] == out["data/replay_token_fraction"]
    assert out["data/main/token_fraction"] == pytest.approx(4900 / 5000)
    assert out["train/replay/loss"] == pytest.approx(1.0) and out["train/main/loss"] == pytest.approx(2.0)
    assert out["train/loss"] == pytest.approx((2.0 * 4900 + 100) / 5000)


def test_a_source_without_supervised_tokens_has_no_loss_and_penalties_average():
    window = MetricWindow(["main", "replay"])
    window.add(step(8.0, 4, 4, 8, [(8.0, 4, 4), (0.0, 0, 0)], penalty=1.0))
    window.add(step(8.0, 4, 4, 8, [(8.0, 4, 4), (0.0, 0, 0)], penalty=3.0))
    out = window.summary()
    assert "train/replay/loss" not in out and out["data/replay_token_fraction"] == 0.0
    assert out["reg/ewc_penalty"] == pytest.approx(2.0)


def test_a_non_finite_step_shows_in_its_window():
    window = MetricWindow(["main"])
    window.add(step(float("nan"), 4, 4, 8, [(float("nan"), 4, 4)], grad_norm=float("inf")))
    window.add(step(8.0, 4, 4, 8, [(8.0, 4, 4)]))
    out = window.summary()
    assert math.isnan(out["train/loss"]) and out["train/grad_norm_max"] == float("inf")
    assert not StepResult(float("nan"), 1, 1, 1, [], [], [], 0.0, 0.0).finite
