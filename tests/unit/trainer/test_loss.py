"""Unit: token-exact loss normalisation. The gradient of a step must not depend on how its rows are
split into micro-batches and ranks."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.loss import backward_scale, supervised_tokens, token_loss_sum


def test_token_loss_sum_by_hand():
    # Two positions predict (labels shifted left): position 0 -> label[1]=1, position 1 -> label[2] ignored.
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, -100]])
    expected = -math.log(3.0 / 4.0)
    assert token_loss_sum(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert supervised_tokens(labels) == 1


def _rows(n=8, length=24, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    # Very different supervised counts per row: row i keeps its last 2 + 2*i labels.
    for i in range(n):
        labels[i, : length - (2 + 2 * i)] = -100
    return ids, labels


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _grads(model, ids, labels, layout):
    """Gradients of one step where `layout` = [rank][micro] lists of row indices; ranks' gradients are
    averaged as DeepSpeed does, and each micro-batch's loss is scaled by backward_scale."""
    world = len(layout)
    total = sum(supervised_tokens(labels[idx]) for rank in layout for idx in rank)
    per_rank = []
    for rank in layout:
        model.zero_grad()
        for idx in rank:
            loss = token_loss_sum(model(input_ids=ids[idx]).logits, labels[idx])
            (loss * backward_scale(total, world)).backward()
        per_rank.append([p.grad.clone() for p in model.parameters()])
    return [sum(g) / world for g in zip(*per_rank)]


def test_micro_batch_and_rank_splits_give_the_same_gradient():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.double()  # (RMSNorm still computes in float32 inside, hence a relative tolerance)
    ids, labels = _rows()
    r = list(range(8))
    bsz8_ga1 = _grads(model, ids, labels, [[r]])
    bsz1_ga8 = _grads(model, ids, labels, [[[i] for i in r]])
    ranks2_bsz4 = _grads(model, ids, labels, [[r[:4]], [r[4:]]])
    ranks2_bsz2_ga2 = _grads(model, ids, labels, [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    for other in (bsz1_ga8, ranks2_bsz4, ranks2_bsz2_ga2):
        for a, b in zip(bsz8_ga1, other):
            assert rel_diff(a, b) < 1e-5
    # And it is the true mean over tokens, not a mean of per-micro-batch means.
    model.zero_grad()
    logits = model(input_ids=ids).logits
    mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    mean.backward()
    for a, p in zip(bsz8_ga1, model.parameters()):
        assert rel_diff(a, p.grad) < 1e-5


def test_per_micro_batch_mean_would_differ():
    """The shortcut the normalisation replaces really is wrong here (so the test above can fail)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).double()
    ids, labels = _rows()
    model.zero_grad()
    for i in range(8):
        loss = token_loss_sum(model(input_ids=ids[[i]]).logits, labels[[i]]) / supervised_tokens(labels[[i]]) / 8
        loss.backward()
    naive = [p.grad.clone() for p in model.parameters()]
    exact = _grads(model, ids, labels, [[list(range(8))]])
    assert max(rel_diff(a, b) for a, b in zip(naive, exact)) > 1e-2
