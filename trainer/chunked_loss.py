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

A token-mean loss (every token's upstream gradient the same) gets its gradients in the forward pass
instead, from the logits already there, scaled in backward: no recompute, so the step costs what the
full-logits step costs (the DPO losses weight tokens per pair and use the recompute).

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
    fallback when the module's pre-backward hook has not gathered it). `uniform`: the caller promises
    the same upstream gradient for every token (a token-mean loss), so the gradients are computed in
    the forward pass, where the logits already are, and only scaled in backward: no recompute (a
    non-uniform upstream still gets the exact recomputed gradient)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                gather: Optional[Callable] = None, uniform: bool = False) -> torch.Tensor:
        n = hidden.shape[0]
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        nll = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        safe = targets.clamp(min=0)
        eager = uniform and any(ctx.needs_input_grad[:2])
        unit = _Grads(hidden, weight) if eager else None
        for s in range(0, n, chunk):
            z = F.linear(hidden[s:s + chunk], weight).float()
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            nll[s:s + chunk] = lse[s:s + chunk] - z.gather(1, safe[s:s + chunk, None]).squeeze(1)
            if eager:
                unit.add(s, z, lse[s:s + chunk], safe[s:s + chunk], None)
        nll = torch.where(targets != IGNORE, nll, torch.zeros_like(nll))
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.gather, ctx.unit = chunk, gather, unit
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, n = ctx.chunk, hidden.shape[0]
        supervised = targets != IGNORE
        g = torch.where(supervised, grad_nll.float(), torch.zeros_like(grad_nll, dtype=torch.float32))
        live = g[supervised]
        if ctx.unit is not None and (live.numel() == 0 or bool((live == live[0]).all())):
            scale = live[0] if live.numel() else g.new_zeros(())
            grad_hidden, grad_weight = ctx.unit.scaled(scale)
            ctx.unit = None
            return grad_hidden, grad_weight, None, None, None, None
        ctx.unit = None
        safe = targets.clamp(min=0)
        with (ctx.gather(weight) if ctx.gather else contextlib.nullcontext()):
            grads = _Grads(hidden, weight)  # the weight's gradient dense, even if n == 0
            for s in range(0, n, chunk):
                grads.add(s, F.linear(hidden[s:s + chunk], weight).float(), lse[s:s + chunk], safe[s:s + chunk],
                          g[s:s + chunk])
        return (*grads.scaled(None), None, None, None, None)


class _Grads:
    """Accumulates dL/dhidden and dL/dweight chunk by chunk from each chunk's logits z:
    dz = (softmax(z) - onehot(target)) * g, dh = dz W, dW += dz^T h (fp32 across chunks; bf16 would
    bias it). The logits buffer is turned into dz in place: one [chunk x vocab] tensor at a time."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        self.hidden, self.weight = hidden, weight
        self.grad_hidden = torch.empty_like(hidden)
        self.grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    def add(self, s: int, z: torch.Tensor, lse: torch.Tensor, safe: torch.Tensor, g: Optional[torch.Tensor]) -> None:
        dz = z.sub_(lse[:, None]).exp_()
        dz.scatter_add_(1, safe[:, None], -torch.ones_like(dz[:, :1]))
        if g is not None:
            dz.mul_(g[:, None])
        h = self.hidden[s:s + dz.shape[0]]
        self.grad_hidden[s:s + dz.shape[0]] = (dz.to(self.weight.dtype) @ self.weight).to(self.hidden.dtype)
        self.grad_weight.addmm_(dz.t(), h.float())

    def scaled(self, scale: Optional[torch.Tensor]):
        if scale is None:
            return self.grad_hidden, self.grad_weight.to(self.weight.dtype)
        return (self.grad_hidden * scale).to(self.hidden.dtype), (self.grad_weight * scale).to(self.weight.dtype)


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
              gather: Optional[Callable] = None, uniform: bool = False) -> torch.Tensor:
    """Per-position cross-entropy [batch, seq] of hidden [batch, seq, H] through weight [V, H] at
    targets [batch, seq] (IGNORE = no loss, 0 there). Only supervised positions reach the head.
    uniform: see LinearCrossEntropy."""
    flat_targets = targets.reshape(-1).to(hidden.device)
    where = (flat_targets != IGNORE).nonzero().squeeze(1)
    picked = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]).index_select(0, where), weight,
                                      flat_targets.index_select(0, where), chunk, gather, uniform)
    out = torch.zeros(flat_targets.shape[0], dtype=torch.float32, device=hidden.device).index_put((where,), picked)
    return out.view(targets.shape)
