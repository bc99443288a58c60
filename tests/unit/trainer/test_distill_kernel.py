"""The KL to a stored top-k teacher through the chunked LM head (trainer/objectives/distill.py), against
direct computations on full logits: the coarsened KL and its gradients (1e-5), the full KL when the top
k are the whole vocabulary, and the teacher's top-k extraction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.objectives.distill import sparse_kl, sparse_kl_from_logits, topk_logprobs

torch.set_default_dtype(torch.float32)


def _case(k: int, vocab: int = 50, hidden: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 7, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.5
    teacher = torch.randn(2, 7, vocab, generator=g, dtype=torch.float64) * 2
    logq_all = torch.log_softmax(teacher, -1)
    top = torch.topk(logq_all, k, dim=-1)
    mask = torch.rand(2, 7, generator=g) > 0.3
    return h, w, top.indices, top.values, mask, logq_all


def _coarse_kl_direct(h, w, ids, logq, mask):
    """KL between teacher and student both coarsened to top-k + one residual class, from full logits."""
    logp_all = torch.log_softmax(h @ w.T, -1)
    p_k = logp_all.gather(-1, ids).exp()
    q_k = logq.exp()
    q_r, p_r = 1 - q_k.sum(-1), 1 - p_k.sum(-1)
    kl = (q_k * (q_k.log() - p_k.log())).sum(-1) + q_r * (q_r.log() - p_r.log())
    return torch.where(mask, kl, torch.zeros_like(kl))


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_the_chunked_kl_and_its_gradients_match_full_logits(chunk):
    h, w, ids, logq, mask, _ = _case(k=5)
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _coarse_kl_direct(ref_h, ref_w, ids, logq, mask)
    upstream = torch.rand(ref.shape, dtype=torch.float64)
    (ref * upstream).sum().backward()

    ours_h, ours_w = h.float().clone().requires_grad_(), w.float().clone().requires_grad_()
    ours = sparse_kl(ours_h, ours_w, ids, logq.float(), mask, chunk=chunk)
    (ours * upstream.float()).sum().backward()
    assert torch.allclose(ours.double(), ref, atol=1e-5), (ours, ref)
    assert torch.allclose(ours_h.grad.double(), ref_h.grad, atol=1e-5)
    assert torch.allclose(ours_w.grad.double(), ref_w.grad, atol=1e-5)
    assert bool((ours[~mask] == 0).all()) and bool((ours_h.grad[~mask] == 0).all())

    logits_h = h.float().clone().requires_grad_()
    plain = sparse_kl_from_logits(logits_h @ w.float().T, ids, logq.float(), mask)
    (plain * upstream.float()).sum().backward()
    assert torch.allclose(plain.double(), ref, atol=1e-5)
    assert torch.allclose(logits_h.grad.double(), ref_h.grad, atol=1e-5)


def test_with_the_whole_vocabulary_as_top_k_it_is_the_full_kl():
    h, w, ids, logq, mask, logq_all = _case(k=50)
    ours = sparse_kl(h.float(), w.float(), ids, logq.float(), mask)
    logp_all = torch.log_softmax(h @ w.T, -1)
    full = F.kl_div(logp_all, logq_all, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(ours.double(), torch.where(mask, full, torch.zeros_like(full)), atol=1e-5)


def test_the_coarsened_kl_is_a_lower_bound_of_the_full_kl_and_zero_for_the_teacher_itself():
    h, w, ids, logq, mask, logq_all = _case(k=4)
    logp_all = torch.log_softmax(h @ w.T, -1)
    full = F.kl_div(logp_all, logq_all, log_target=True, reduction="none").sum(-1)
    ours = sparse_kl(h.float(), w.float(), ids, logq.float(), mask)
    assert bool((ours.double() <= full + 1e-6)[mask].all()) and bool((ours[mask] > 0).all())
    # the teacher's own hidden states: its stored top-k reproduce it, KL 0
    t_ids, t_logq = topk_logprobs(h.float().reshape(-1, 12), w.float(), 4, chunk=5)
    self_kl = sparse_kl(h.float(), w.float(), t_ids.view(2, 7, 4), t_logq.view(2, 7, 4), mask)
    assert float(self_kl.abs().max()) < 1e-5


def test_topk_logprobs_matches_torch_topk_of_the_log_softmax():
    h, w, *_ = _case(k=3)
    flat = h.float().reshape(-1, 12)
    ids, logp = topk_logprobs(flat, w.float(), 6, chunk=4)
    top = torch.topk(torch.log_softmax(flat @ w.float().T, -1), 6, dim=-1)
    assert torch.equal(ids, top.indices) and torch.allclose(logp, top.values, atol=1e-5)
