"""Unit: the preference losses by hand, per-document log-probs of packed rows, packed pairs equal to
unpacked pairs (loss and gradients), and the pair-exact normalisation: 8 pairs x 1, 1 x 8
accumulation and 2 ranks x 4 give the same gradient. (Parity with TRL itself: test_preference_trl.py.)"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from data_pipeline.prepare import PrepareOptions, prepare
from helpers import close, tiny_llama
from trainer.config import bundled_path
from trainer.objectives.preference import STATS, PreferenceLoss, document_logps, pair_losses
from trainer.objectives.token import backward_scale, token_nll_from_logits
from trainer.observability.metrics import MetricWindow, StepResult

PREFS = bundled_path("medical_prefs.jsonl")


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_the_three_losses_by_hand():
    # policy log-probs -1 (chosen, 2 tokens) and -3 (rejected, 4 tokens); reference -2 and -2; β = 0.1
    args = (_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), _t(2.0), _t(4.0))
    dpo, stats = pair_losses(*args, loss="dpo", beta=0.1)
    # h = (−1 − −2) − (−3 − −2) = 2: loss = −log σ(0.2)
    assert dpo.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))))
    assert stats["rewards/chosen"].item() == pytest.approx(0.1) and stats["rewards/rejected"].item() == pytest.approx(
        -0.1
    )
    assert stats["rewards/margins"].item() == pytest.approx(0.2) and stats["rewards/accuracies"].item() == 1.0
    assert stats["logps/chosen"].item() == -1.0 and stats["logps/rejected"].item() == -3.0
    smooth, _ = pair_losses(*args, loss="dpo", beta=0.1, label_smoothing=0.25)
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert smooth.item() == pytest.approx(-0.75 * math.log(s(0.2)) - 0.25 * math.log(s(-0.2)))
    # ipo: log-ratios per token, h' = 1/2 − (−1/4) = 0.75; loss = (0.75 − 1/(2·0.1))² = (−4.25)²
    ipo, _ = pair_losses(*args, loss="ipo", beta=0.1)
    assert ipo.item() == pytest.approx(4.25**2)
    # simpo: mean log-probs −0.5 and −0.75, no reference; z = β(−0.5 + 0.75) − γ = 0.025 − 0.5
    simpo, stats = pair_losses(
        _t(-1.0), _t(-3.0), None, None, _t(2.0), _t(4.0), loss="simpo", beta=0.1, simpo_gamma=0.5
    )
    assert simpo.item() == pytest.approx(-math.log(s(0.025 - 0.5)))
    assert stats["rewards/chosen"].item() == pytest.approx(-0.05) and stats["logps/chosen"].item() == -0.5


def test_document_logps_by_hand():
    """Two documents in a row of 6, vocabulary 3, uniform logits except where stated: each supervised
    token's log-prob lands in the document of the token it predicts."""
    logits = torch.zeros(1, 6, 3)
    logits[0, 1, 2] = math.log(2.0)  # at t = 1, token 2 has probability 2/4
    labels = torch.tensor([[-100, 1, 2, -100, 0, -100]])
    document = torch.tensor([[0, 0, 0, 1, 1, -1]])
    sums, counts = document_logps(logits, labels, document, documents=2)
    assert counts.tolist() == [[2.0, 1.0]]
    assert sums[0, 0].item() == pytest.approx(math.log(1 / 3) + math.log(2 / 4))
    assert sums[0, 1].item() == pytest.approx(math.log(1 / 3))


def _batch(prepared, idx, reference_model):
    rows = {k: torch.from_numpy(np.asarray(v)) for k, v in prepared.rows(idx).items()}
    with torch.no_grad():
        ref_logits = reference_model(
            input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False
        ).logits
    rows["reference"] = document_logps(ref_logits, rows["labels"], rows["document"], prepared.documents_per_row)[
        0
    ].double()
    return rows


def _loss_and_grads(model, batches, objective, world=1):
    """The step's loss as train_step computes it (each micro-batch's pair-loss sum times world / the
    step's pairs), and the gradient DeepSpeed would hold (summed over micro-batches, averaged over ranks)."""
    model.zero_grad()
    pairs = sum(objective.count(b) for b in batches)
    total = 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        rows, _ = objective.rows(token_nll_from_logits(logits, b["labels"]), b)
        (rows.sum() * backward_scale(pairs, world) / world).backward()
        total += rows.sum().item()
    return total / pairs, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_packed_pairs_equal_unpacked_pairs_in_loss_and_gradients(tmp_path, tiny_tokenizer, loss):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(open(PREFS).readlines()[:6]))
    packed = prepare(str(src), tiny_tokenizer, PrepareOptions(objective="dpo", seq_len=512), str(tmp_path))
    single = prepare(
        str(src), tiny_tokenizer, PrepareOptions(objective="dpo", seq_len=512, packing=False), str(tmp_path)
    )
    assert len(packed) < len(single) == 6
    policy, reference = tiny_llama(len(tiny_tokenizer)), tiny_llama(len(tiny_tokenizer), seed=1)
    objective = PreferenceLoss(loss, beta=0.1)
    a, ga = _loss_and_grads(policy, [_batch(packed, np.arange(len(packed)), reference)], objective)
    b, gb = _loss_and_grads(policy, [_batch(single, np.arange(6), reference)], objective)
    assert a == pytest.approx(b, rel=1e-5)
    for name in ga:
        assert close(gb[name], ga[name]), name


def test_pair_exact_normalisation_across_layouts(tmp_path, tiny_tokenizer):
    """Unpacked rows, one pair each: 8 pairs as one micro-batch, as 8 accumulated ones, and as 2 ranks
    of 4 (each rank's loss times world, DeepSpeed's mean over ranks) give one gradient."""
    src = tmp_path / "p.jsonl"
    src.write_text("".join(open(PREFS).readlines()[:8]))
    rows = prepare(str(src), tiny_tokenizer, PrepareOptions(objective="dpo", seq_len=256, packing=False), str(tmp_path))
    policy, reference = tiny_llama(len(tiny_tokenizer)), tiny_llama(len(tiny_tokenizer), seed=1)
    objective = PreferenceLoss("dpo", beta=0.5)
    whole = _loss_and_grads(policy, [_batch(rows, np.arange(8), reference)], objective)
    accumulated = _loss_and_grads(policy, [_batch(rows, [i], reference) for i in range(8)], objective)
    # Two ranks: each backward-scales by world / (pairs of the whole step); DeepSpeed averages the two
    # ranks' gradients, i.e. their sum / 2.
    halves = [
        _loss_and_grads(policy, [_batch(rows, np.arange(4 * r, 4 * r + 4), reference)], objective, world=2)
        for r in range(2)
    ]
    per_rank_pairs = 4
    ranks = {n: (halves[0][1][n] + halves[1][1][n]) * per_rank_pairs / 8 for n in whole[1]}  # both ranks count 8 pairs
    for name, g in whole[1].items():
        assert close(accumulated[1][name], g) and close(ranks[name], g), name
    assert whole[0] == pytest.approx(accumulated[0], rel=1e-6)


def test_a_dpo_log_line_is_pair_weighted():
    """Two steps of 2 and 6 pairs: train/loss and rewards/* are sums over pairs / pairs, not means of steps."""
    window = MetricWindow(["main"])
    for pairs, loss_sum, acc in ((2, 1.0, 2.0), (6, 1.2, 3.0)):
        stats = dict.fromkeys(STATS, 0.0)
        stats["rewards/accuracies"] = acc
        window.add(
            StepResult(
                loss_sum,
                supervised_tokens=100,
                real_tokens=120,
                slots=128,
                source_loss_sum=[loss_sum],
                source_supervised=[pairs],
                source_tokens=[120],
                lr=1e-3,
                grad_norm=1.0,
                units=pairs,
                stats=stats,
            )
        )
    out = window.summary()
    assert out["train/loss"] == pytest.approx(2.2 / 8) and out["rewards/accuracies"] == pytest.approx(5 / 8)
    assert out["data/supervised_token_fraction"] == pytest.approx(200 / 256)


def test_a_missing_reference_is_an_error_not_a_zero(tmp_path, tiny_tokenizer):
    rows = prepare(PREFS, tiny_tokenizer, PrepareOptions(objective="dpo", seq_len=256), str(tmp_path))
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in rows.rows([0]).items()}
    logits = token_nll_from_logits(torch.zeros(1, batch["input_ids"].shape[1], len(tiny_tokenizer)), batch["labels"])
    with pytest.raises(RuntimeError, match="reference log-probs"):
        PreferenceLoss("dpo", 0.1).rows(logits, batch)
    PreferenceLoss("simpo", 2.0).rows(logits, batch)  # reference-free


def test_metrics_names_are_trls():
    assert set(STATS) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    }
    assert json.dumps(list(STATS))  # plain strings, as metrics.jsonl keys
    assert copy.copy(STATS) == STATS
