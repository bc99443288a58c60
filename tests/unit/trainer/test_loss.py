"""Unit: token-exact loss normalisation. The gradient of a step must not depend on how its rows are
split into micro-batches and ranks."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.objectives.token import backward_scale, sampled_labels, supervised_tokens, token_loss_sum


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
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
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
    mean = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    mean.backward()
    for a, p in zip(bsz8_ga1, model.parameters()):
        assert rel_diff(a, p.grad) < 1e-5


def test_per_micro_batch_mean_would_differ():
    """The shortcut the normalisation replaces really is wrong here (so the test above can fail)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).double()
    ids, labels = _rows()
    model.zero_grad()
    for i in range(8):
        loss = token_loss_sum(model(input_ids=ids[[i]]).logits, labels[[i]]) / supervised_tokens(labels[[i]]) / 8
        loss.backward()
    naive = [p.grad.clone() for p in model.parameters()]
    exact = _grads(model, ids, labels, [[list(range(8))]])
    assert max(rel_diff(a, b) for a, b in zip(naive, exact)) > 1e-2


# ---- EWC's Fisher on the model's own predictions (regularizer.ewc.fisher_labels=sampled) -------------


def test_sampled_labels_draw_only_where_a_loss_is_taken_and_repeat_with_the_seed():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=g)
    labels = torch.tensor([[7, -100, 2, 3, -100, 1], [0, 4, 4, -100, -100, -100]])
    a = sampled_labels(logits, labels, torch.Generator().manual_seed(1))
    b = sampled_labels(logits, labels, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(a[:, 0], labels[:, 0])  # position 0 is never a target
    assert torch.equal(a == -100, labels == -100)  # masked positions stay masked, supervised ones stay supervised
    drawn = a[:, 1:][labels[:, 1:] != -100]
    assert 0 <= int(drawn.min()) and int(drawn.max()) < 5  # drawn from the vocabulary
    # A prediction that is certain is what gets drawn, whatever the data's label was.
    sure = torch.full((1, 3, 5), -1e4)
    sure[0, 0, 2] = sure[0, 1, 4] = 0.0
    assert sampled_labels(sure, torch.tensor([[0, 0, 0]]), torch.Generator().manual_seed(2)).tolist() == [[0, 2, 4]]


def test_sampled_labels_follow_the_predicted_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(1, n + 1, 4).clone()
    drawn = sampled_labels(logits, torch.zeros(1, n + 1, dtype=torch.long), torch.Generator().manual_seed(3))[0, 1:]
    freq = torch.bincount(drawn, minlength=4).double() / n
    assert torch.allclose(freq, probs.double(), atol=0.015), freq  # 4+ standard errors at n=20,000


def test_the_squared_batch_gradient_on_sampled_labels_estimates_the_summed_per_token_fisher():
    """Why sampling makes the batch gradient a Fisher estimate: each position's score has mean zero
    under the model's own distribution and the draws are independent, so E[(sum_i g_i)^2] =
    sum_i E[g_i^2] (the diagonal Fisher summed over tokens). With the data's labels the cross terms stay
    (the squared gradient of the loss, the empirical Fisher of the batch), and they dominate."""
    torch.manual_seed(0)
    vocab, dim, n = 5, 4, 6
    x = torch.randn(1, n, dim)
    w = torch.randn(vocab, dim, requires_grad=True)
    logits = x @ w.T  # [1, n, vocab]: a softmax regression, one prediction per position

    def grad_sq(labels):
        (g,) = torch.autograd.grad(token_loss_sum(torch.cat([logits, logits[:, :1]], 1), labels), w, retain_graph=True)
        return g * g

    # Exact per-token Fisher diagonal, summed over positions: sum_i sum_y p_iy (d log p_iy / dw)^2.
    p = torch.softmax(logits.detach()[0], -1)
    exact = torch.zeros_like(w)
    for i in range(n):
        for y in range(vocab):
            score = torch.outer(torch.nn.functional.one_hot(torch.tensor(y), vocab) - p[i], x[0, i])
            exact += p[i, y] * score * score
    draws = torch.Generator().manual_seed(4)
    data_labels = torch.cat([torch.zeros(1, 1, dtype=torch.long), torch.randint(0, vocab, (1, n))], 1)
    mc = torch.stack(
        [
            grad_sq(sampled_labels(torch.cat([logits.detach(), logits.detach()[:, :1]], 1), data_labels, draws))
            for _ in range(3000)
        ]
    ).mean(0)
    assert torch.allclose(mc.sum(), exact.sum(), rtol=0.05), (mc.sum(), exact.sum())
    assert float(torch.corrcoef(torch.stack([mc.flatten(), exact.flatten()]))[0, 1]) > 0.95
