"""Chunked cross-entropy: the LM head and the per-token loss computed a chunk of tokens at a time, and
recomputed in backward, so no [tokens x vocab] tensor is ever kept (trainer.loss_chunk_tokens).

Pure torch (no deepspeed, no torch.distributed); trainer/loss_head.py runs it inside the LM head's own
forward, where ZeRO-3 has gathered the head's weight (and gathers it again for the backward).

For one 8,192-token row of a 128,256-token vocabulary the plain path holds fp32 logits, their
log-softmax and their gradient: 3 x 8,192 x 128,256 x 4 B = 12.6 GB. Here a chunk of c tokens holds
c x V at a time (c = 512: 0.26 GB, and its exponent in backward), plus one fp32 accumulator for the head weight's gradient (V x H x
4 B: 2.1 GB at 128k x 4,096; looping over vocabulary slices would shrink it, not done yet). Liger's
fused kernel (GPU) is not used: its per-token mode returned wrong weight gradients before mid-2026.

    forward   per chunk: z = h W^T (fp32), lse = logsumexp(z), nll = lse - z[target]; keep lse only
    backward  per chunk: p = exp(z - lse); dz = (p - onehot(target)) * g; dh = dz W; dW += dz^T h

The gradient of the weight is returned once, dense (zeros where no token is supervised), so a
parameter's gradient hook fires once per backward on every rank, which ZeRO-3's bucketed
reduce-scatter needs (firing per chunk, as per-chunk reentrant checkpointing would, trips its
"parameter already in the bucket" assertion or overwrites the first gradient).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from data_pipeline.packing import IGNORE


CHUNK_LOGITS_BYTES = 256 << 20
"""The automatic chunk's fp32 logits: 256 MiB (512 tokens of a 128,256 vocabulary, 1,024 of 49,152)."""


def auto_chunk(tokens: int, vocab: int) -> int:
    """Tokens per chunk: the largest power of two whose fp32 logits fit CHUNK_LOGITS_BYTES, and no more
    than the tokens there are (rounded up to a power of two). Large enough that each chunk is one
    efficient matmul (sizing chunks to the hidden states instead, as Liger does, made 16-token chunks
    for a small model and doubled its step time on CPU), small enough to bound the memory."""
    fit = max(1, CHUNK_LOGITS_BYTES // (4 * max(vocab, 1)))
    fit = 1 << (fit.bit_length() - 1)
    return min(fit, 1 << (max(tokens, 1) - 1).bit_length())


class LinearCrossEntropy(torch.autograd.Function):
    """nll[n] = cross-entropy of (hidden[n] @ weight^T) at targets[n] (0 where targets is IGNORE), fp32.
    `gather` (optional): a context manager factory making `weight` usable in backward (ZeRO-3's
    fallback when the module's pre-backward hook has not gathered it)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                gather: Optional[Callable] = None) -> torch.Tensor:
        n = hidden.shape[0]
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        nll = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        safe = targets.clamp(min=0)
        for s in range(0, n, chunk):
            z = F.linear(hidden[s:s + chunk], weight).float()
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            nll[s:s + chunk] = lse[s:s + chunk] - z.gather(1, safe[s:s + chunk, None]).squeeze(1)
        nll = torch.where(targets != IGNORE, nll, torch.zeros_like(nll))
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.gather = chunk, gather
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, n = ctx.chunk, hidden.shape[0]
        g = torch.where(targets != IGNORE, grad_nll.float(), torch.zeros_like(grad_nll, dtype=torch.float32))
        safe = targets.clamp(min=0)
        grad_hidden = torch.empty_like(hidden)
        with (ctx.gather(weight) if ctx.gather else contextlib.nullcontext()):
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # dense, even if n == 0
            for s in range(0, n, chunk):
                h = hidden[s:s + chunk]
                p = torch.exp(F.linear(h, weight).float() - lse[s:s + chunk, None])
                p.scatter_add_(1, safe[s:s + chunk, None], -torch.ones_like(p[:, :1]))
                dz = p * g[s:s + chunk, None]
                grad_hidden[s:s + chunk] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)  # no fp32 copy of W
                grad_weight.addmm_(dz.t(), h.float())  # fp32 accumulation across chunks (bf16 would bias it)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
              gather: Optional[Callable] = None) -> torch.Tensor:
    """Per-position cross-entropy [batch, seq] of hidden [batch, seq, H] through weight [V, H] at
    targets [batch, seq] (IGNORE = no loss, 0 there). Only supervised positions reach the head."""
    flat_targets = targets.reshape(-1).to(hidden.device)
    where = (flat_targets != IGNORE).nonzero().squeeze(1)
    picked = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]).index_select(0, where), weight,
                                      flat_targets.index_select(0, where), chunk, gather)
    out = torch.zeros(flat_targets.shape[0], dtype=torch.float32, device=hidden.device).index_put((where,), picked)
    return out.view(targets.shape)
