"""trainer.evaluate.forgetting_metrics: how much the general-set loss rose (eval/forgetting) and the
domain-set loss fell (eval/domain_gain) since the step-0 baseline, on literal losses (binary
fractions, so the differences are exact)."""

from __future__ import annotations

from trainer.evaluate import forgetting_metrics

BASELINE = {"eval/general/loss": 2.0, "eval/general/ppl": 7.39, "eval/domain/loss": 2.25}


def test_forgetting_is_the_general_loss_rise_and_gain_the_domain_loss_fall():
    scores = {"eval/general/loss": 2.5, "eval/general/ppl": 12.18, "eval/domain/loss": 1.5}
    assert forgetting_metrics(scores, BASELINE) == {"eval/forgetting": 0.5, "eval/domain_gain": 0.75}


def test_signs_when_the_model_improves_on_general_and_regresses_on_domain():
    scores = {"eval/general/loss": 1.75, "eval/domain/loss": 2.5}
    assert forgetting_metrics(scores, BASELINE) == {"eval/forgetting": -0.25, "eval/domain_gain": -0.25}


def test_unchanged_losses_give_zero_not_missing():
    assert forgetting_metrics(dict(BASELINE), BASELINE) == {"eval/forgetting": 0.0, "eval/domain_gain": 0.0}


def test_a_metric_needs_its_set_in_both_scores_and_baseline():
    # No step-0 eval (eval.at_start=false): no baseline, nothing to compare with.
    assert forgetting_metrics({"eval/general/loss": 2.5, "eval/domain/loss": 1.5}, {}) == {}
    # Only a general set: forgetting alone.
    assert forgetting_metrics({"eval/general/loss": 2.5}, BASELINE) == {"eval/forgetting": 0.5}
    # Only a domain set in the scores; the baseline's general loss alone is not enough.
    assert forgetting_metrics({"eval/domain/loss": 2.0}, BASELINE) == {"eval/domain_gain": 0.25}


def test_other_sets_and_ppl_are_ignored_and_inputs_untouched():
    scores = {"eval/medical/loss": 9.0, "eval/general/ppl": 100.0, "eval/general/loss": 3.0}
    baseline = {"eval/medical/loss": 1.0, **BASELINE}
    before = (dict(scores), dict(baseline))
    assert forgetting_metrics(scores, baseline) == {"eval/forgetting": 1.0}
    assert (scores, baseline) == before
