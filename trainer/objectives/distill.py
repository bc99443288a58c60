"""The KL to a teacher's stored next-token distribution, through the LM head a chunk of tokens at a time.

A teacher's distribution over a 49k–128k vocabulary cannot be stored for every token, so it is kept as
its top k tokens with their log-probs; the mass outside them, q_r = 1 − Σ_k q_k, is one more class
(the residual). The loss per token is the KL between the two distributions coarsened to those k + 1
classes:

    KL_k(q ‖ p) = Σ_{v ∈ top-k} q_v (log q_v − log p_v) + q_r (log q_r − log p_r),   p_r = 1 − Σ_{v ∈ top-k} p_v

Its bias, stated: KL_k ≤ KL (the data-processing inequality); what it drops is the teacher-vs-student
KL *within* the residual class, q_r·KL(q|rest ‖ p|rest). It is exact when the top k hold all the
teacher's mass, and the dropped part shrinks with q_r (k = 32 of a chat model's next-token
distribution typically leaves q_r of a few percent or less). Where the student leaves the residual
class's mass where the teacher had it, the gradient pushes nothing within it.

Gradient with respect to the student's logits z (p = softmax(z)):

    v ∈ top-k:  p_v − q_v          v ∉ top-k:  p_v (1 − q_r / p_r)

so, as in trainer/objectives/chunked.py, backward recomputes one chunk of logits at a time from the
hidden states: no [tokens × vocab] tensor is kept, and the head weight's gradient is returned once,
dense. `topk_logprobs` makes the teacher's side the same way, without gradients.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from trainer.objectives.chunked import auto_chunk


def _residual_terms(z: torch.Tensor, ids: torch.Tensor, logq: torch.Tensor):
    """From one chunk's logits z [c, V] (overwritten): lse, the student's log p over the top-k ids, the
    log of its residual mass, and the teacher's residual mass q_r."""
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, ids) - lse[:, None]
    z.scatter_(1, ids, float("-inf"))
    logp_r = torch.logsumexp(z, dim=-1) - lse  # -inf when the top k are the whole vocabulary
    return lse, logp, logp_r, _teacher_rest(logq, logp_r)


def _teacher_rest(logq: torch.Tensor, logp_r: torch.Tensor) -> torch.Tensor:
    """The teacher's residual mass 1 − Σ_k q_k; 0 where the top k are the whole vocabulary (what is
    left there is the rounding of the sum)."""
    q_r = (1.0 - logq.exp().sum(1)).clamp_min(0.0)
    return torch.where(torch.isinf(logp_r), torch.zeros_like(q_r), q_r)


def _kl(logq: torch.Tensor, logp: torch.Tensor, logp_r: torch.Tensor, q_r: torch.Tensor) -> torch.Tensor:
    q = logq.exp()
    top = (q * (logq - logp)).sum(1)
    rest = torch.where(q_r > 0, q_r * (torch.log(q_r.clamp_min(1e-38)) - logp_r), torch.zeros_like(q_r))
    return top + rest


class LinearSparseKL(torch.autograd.Function):
    """kl[n] = KL_k(teacher ‖ softmax(hidden[n] @ weight^T)) with the teacher given by its top-k `ids`
    [n, k] and their log-probs `logq` [n, k] (fp32). `gather`: as LinearCrossEntropy's (ZeRO-3's
    fallback gather of the weight in backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, logq, chunk: int, gather: Optional[Callable] = None):
        n = hidden.shape[0]
        kl = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        logp_r = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            z = F.linear(hidden[s : s + chunk], weight).float()
            c_lse, c_logp, c_logp_r, c_qr = _residual_terms(z, ids[s : s + chunk], logq[s : s + chunk])
            lse[s : s + chunk], logp_r[s : s + chunk] = c_lse, c_logp_r
            kl[s : s + chunk] = _kl(logq[s : s + chunk], c_logp, c_logp_r, c_qr)
        ctx.save_for_backward(hidden, weight, ids, logq, lse, logp_r)
        ctx.chunk, ctx.gather = chunk, gather
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        hidden, weight, ids, logq, lse, logp_r = ctx.saved_tensors
        chunk, n = ctx.chunk, hidden.shape[0]
        g = grad_kl.float()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        with ctx.gather(weight) if ctx.gather else contextlib.nullcontext():
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h = hidden[s:e]
                p = F.linear(h, weight).float().sub_(lse[s:e, None]).exp_()
                q = logq[s:e].exp()
                q_r = _teacher_rest(logq[s:e], logp_r[s:e])
                p_r = logp_r[s:e].exp()
                outside = torch.where(q_r > 0, 1.0 - q_r / p_r.clamp_min(1e-38), torch.ones_like(q_r))
                top = p.gather(1, ids[s:e]) - q
                dz = p.mul_(outside[:, None]).scatter_(1, ids[s:e], top).mul_(g[s:e, None])
                grad_hidden[s:e] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
                grad_weight.addmm_(dz.t(), h.float())
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def sparse_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    logq: torch.Tensor,
    mask: torch.Tensor,
    chunk: Optional[int] = None,
    gather: Optional[Callable] = None,
) -> torch.Tensor:
    """Per-position KL_k [batch, seq] of hidden [batch, seq, H] through weight [V, H] to the teacher
    ids/logq [batch, seq, k] where `mask` [batch, seq] is true (0 elsewhere; only those positions reach
    the head). chunk None: automatic (at most 256 MiB of fp32 logits a chunk)."""
    flat = mask.reshape(-1).to(hidden.device)
    where = flat.nonzero().squeeze(1)
    k = ids.shape[-1]
    chunk = chunk or auto_chunk(int(where.numel()), weight.shape[0])
    picked = LinearSparseKL.apply(
        hidden.reshape(-1, hidden.shape[-1]).index_select(0, where),
        weight,
        ids.reshape(-1, k).to(hidden.device).index_select(0, where),
        logq.reshape(-1, k).to(hidden.device).float().index_select(0, where),
        max(chunk, 1),
        gather,
    )
    out = torch.zeros(flat.shape[0], dtype=torch.float32, device=hidden.device).index_put((where,), picked)
    return out.view(mask.shape)


def topk_kl(logp_all: torch.Tensor, ids: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL_k(teacher ‖ student) per position from the student's full log-probs [..., V] and the teacher's
    top-k ids and log-probs [..., k]: the reference computation on full logits (models whose head is
    not chunked, bench/drift.py's KL from the base, the tests), plain autograd."""
    logp = logp_all.gather(-1, ids.long().to(logp_all.device))
    logq = logq.to(logp_all.device).float()
    p_r = (1.0 - logp.exp().sum(-1)).clamp_min(0.0)
    q = logq.exp()
    q_r = (1.0 - q.sum(-1)).clamp_min(0.0)
    top = (q * (logq - logp)).sum(-1)
    rest = torch.where(q_r > 0, q_r * (torch.log(q_r.clamp_min(1e-38)) - torch.log(p_r.clamp_min(1e-38))), 0.0)
    return top + rest


def sparse_kl_from_logits(logits: torch.Tensor, ids: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor):
    """sparse_kl from full logits [batch, seq, V] (0 where `mask` is false)."""
    kl = topk_kl(torch.log_softmax(logits.float(), dim=-1), ids, logq)
    return torch.where(mask.to(logits.device), kl, torch.zeros_like(kl))


@torch.no_grad()
def topk_logprobs(
    hidden: torch.Tensor,
    weight: Optional[torch.Tensor],
    k: int,
    chunk: Optional[int] = None,
    targets: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The teacher's side: the top-k token ids (int64) and log-probs (fp32) of softmax(hidden @ weight^T)
    for hidden [n, H], one chunk of logits at a time (weight None: `hidden` are the logits). With
    `targets` [n], each row's target token is always among the k: where the top k miss it, it takes
    the k-th slot (corrective targets need the target's own probability, trainer/forgetting/mft.py)."""
    n = hidden.shape[0]
    chunk = chunk or auto_chunk(n, hidden.shape[1] if weight is None else weight.shape[0])
    ids = torch.zeros(n, k, dtype=torch.int64, device=hidden.device)
    logp = torch.zeros(n, k, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk):
        z = hidden[s : s + chunk] if weight is None else F.linear(hidden[s : s + chunk], weight)
        z = z.float()
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        top = torch.topk(z, k, dim=-1)
        c_ids, c_logp = top.indices, top.values - lse
        if targets is not None:
            t = targets[s : s + chunk].to(z.device).long()[:, None]
            missing = ~(c_ids == t).any(1)
            c_ids[missing, -1] = t[missing, 0]
            c_logp[missing, -1] = (z.gather(1, t) - lse)[missing, 0]
        ids[s : s + chunk], logp[s : s + chunk] = c_ids, c_logp
    return ids, logp


LOG_ZERO = -1e4
"""A log-probability whose exp is 0 in fp32 and whose product with 0 is 0 (log 0 = −inf is not):
a target class given no mass."""


def corrected_targets(ids: torch.Tensor, logq: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """MFT's corrective target (Belcak et al. 2025) in the top-k + residual form: the teacher's
    log-probs `logq` [..., k] over `ids` [..., k] with the target token (`targets` [...], always one
    of the ids where it is not IGNORE: topk_logprobs(targets=...)) raised to probability τ where the
    teacher gives it less, and every other class (the residual too) scaled by (1 − τ)/(1 − q_y): the
    smallest change of the teacher's distribution, in that direction, that gives the target at least τ.
    Where the teacher already gives it τ or more the target is the teacher's distribution; τ = 1 is
    the one-hot label (plain fine-tuning). Positions whose target is IGNORE keep `logq`. fp32."""
    t = targets.to(ids.device).long()
    slot = ids.long() == t[..., None]
    found = slot.any(-1)
    logq64 = logq.double()
    q_y = torch.where(slot, logq64, torch.zeros_like(logq64)).sum(-1).exp()
    raise_ = found & (q_y < tau)
    factor = torch.where(raise_, (1.0 - tau) / (1.0 - q_y).clamp_min(1e-30), torch.ones_like(q_y))
    others = torch.where(
        factor[..., None] > 0, logq64 + factor.clamp_min(1e-300).log()[..., None], torch.full_like(logq64, LOG_ZERO)
    )
    raised = torch.where(raise_[..., None], torch.where(slot, math.log(tau), others), logq64)
    return raised.float()
