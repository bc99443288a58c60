"""Chunked cross-entropy: the LM head and the per-token loss computed a chunk of tokens at a time, and
recomputed in backward, so no [tokens x vocab] tensor is ever kept (trainer.loss_chunk_tokens).

Pure torch (no deepspeed, no torch.distributed); trainer/objectives/head.py runs it inside the LM head's own
forward, where ZeRO-3 has gathered the head's weight (and gathers it again for the backward).

For one 8,192-token row of a 128,256-token vocabulary the plain path holds fp32 logits, their
log-softmax and their gradient: 3 x 8,192 x 128,256 x 4 B = 12.6 GB. Here a chunk of c tokens holds
c x V at a time (c = 512: 0.26 GB, and its exponent in backward), plus one fp32 accumulator for the
head weight's gradient (V x H x 4 B: 2.1 GB at 128k x 4,096; looping over vocabulary slices would
shrink it; not implemented).

Two kernels compute the chunks (trainer.loss_kernel): this file's torch loop (any device), and on a
GPU Liger's fused linear cross-entropy (liger-kernel, the optional `liger` extra: Triton kernels that
write the softmax gradient over the logits in place), wrapped in LigerLinearCrossEntropy so that
both share the contract below (per-token losses, a uniform upstream's gradients in the forward pass,
ZeRO-3's gather of the weight in backward). Liger's own autograd function is not used: for per-token
losses it keeps a detached copy of the weight from forward to backward (under ZeRO-3 a second
gathered head weight) and always recomputes the logits in backward.

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
import functools
import inspect
import os
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
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        gather: Optional[Callable] = None,
        uniform: bool = False,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        nll = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        safe = targets.clamp(min=0)
        eager = uniform and any(ctx.needs_input_grad[:2])
        unit = _Grads(hidden, weight) if eager else None
        for s in range(0, n, chunk):
            z = F.linear(hidden[s : s + chunk], weight).float()
            lse[s : s + chunk] = torch.logsumexp(z, dim=-1)
            nll[s : s + chunk] = lse[s : s + chunk] - z.gather(1, safe[s : s + chunk, None]).squeeze(1)
            if eager:
                unit.add(s, z, lse[s : s + chunk], safe[s : s + chunk], None)
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
        with ctx.gather(weight) if ctx.gather else contextlib.nullcontext():
            grads = _Grads(hidden, weight)  # the weight's gradient dense, even if n == 0
            for s in range(0, n, chunk):
                grads.add(
                    s,
                    F.linear(hidden[s : s + chunk], weight).float(),
                    lse[s : s + chunk],
                    safe[s : s + chunk],
                    g[s : s + chunk],
                )
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
        h = self.hidden[s : s + dz.shape[0]]
        self.grad_hidden[s : s + dz.shape[0]] = (dz.to(self.weight.dtype) @ self.weight).to(self.hidden.dtype)
        self.grad_weight.addmm_(dz.t(), h.float())

    def scaled(self, scale: Optional[torch.Tensor]):
        if scale is None:
            return self.grad_hidden, self.grad_weight.to(self.weight.dtype)
        return (self.grad_hidden * scale).to(self.hidden.dtype), (self.grad_weight * scale).to(self.weight.dtype)


KERNELS = ("torch", "liger")
LIGER_MIN_VERSION = "0.8.5"
"""The first liger-kernel whose fused_linear_cross_entropy_forward takes a per-token upstream gradient
(token_grad_output) and computes gradients on request (compute_gradients): what LigerLinearCrossEntropy calls."""


@functools.lru_cache(maxsize=None)
def liger_problem() -> Optional[str]:
    """Why Liger's kernel cannot run here (None: it can): not installed, too old, or no CUDA device.
    TRITON_INTERPRET=1 (set before liger-kernel is imported) runs its Triton kernels on CPU through
    Triton's interpreter: correct and slow, for tests."""
    try:
        from importlib.metadata import version

        from liger_kernel.ops import fused_linear_cross_entropy as flce
    except ImportError as e:
        return f"liger-kernel is not installed ({e}): pip install 'fullft[liger]' on a CUDA machine"
    params = inspect.signature(flce.fused_linear_cross_entropy_forward).parameters
    if not {"token_grad_output", "compute_gradients", "chunk_mem_const"} <= set(params):
        return (
            f"liger-kernel {version('liger-kernel')} is older than {LIGER_MIN_VERSION} (no per-token upstream "
            f"gradient in fused_linear_cross_entropy_forward): pip install 'liger-kernel>={LIGER_MIN_VERSION}'"
        )
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "Liger's Triton kernels need a CUDA GPU and this machine has none (TRITON_INTERPRET=1 interprets "
            "them on CPU, slowly: for tests)"
        )
    return None


def _liger(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    grads: bool,
    weight_grad: bool = True,
    token_grad: Optional[torch.Tensor] = None,
):
    """Liger's chunked forward: (per-token loss fp32, dL/dhidden, dL/dweight); the gradients (when
    `grads`) for the upstream `token_grad` (None: 1 per token), accumulated in fp32. Its chunks are
    sized by a multiple of the hidden states' memory (chunk_mem_const); that multiple is chosen so a
    chunk holds about `chunk` tokens, the torch kernel's bound."""
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    n, h = hidden.shape
    mem_const = max(1, (chunk * weight.shape[0]) // (h * max(n, 1)))
    loss, *_, grad_hidden, grad_weight, _ = fused_linear_cross_entropy_forward(
        _input=hidden,
        weight=weight,
        target=targets,
        ignore_index=IGNORE,
        reduction="none",
        accum_dtype=torch.float32,
        compute_gradients=grads,
        weight_requires_grad=grads and weight_grad,
        token_grad_output=token_grad,
        chunk_mem_const=mem_const,
    )
    return loss, grad_hidden, grad_weight


class LigerLinearCrossEntropy(torch.autograd.Function):
    """LinearCrossEntropy's contract on Liger's kernel: the same arguments, the same per-token losses
    and gradients (fp32 accumulation), the weight saved as the Parameter itself (ZeRO-3 gathers it
    again for backward, `gather` as the fallback), a uniform upstream's gradients formed in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        gather: Optional[Callable] = None,
        uniform: bool = False,
    ) -> torch.Tensor:
        eager = uniform and any(ctx.needs_input_grad[:2]) and hidden.shape[0] > 0
        if hidden.shape[0] == 0:
            nll = torch.zeros(0, dtype=torch.float32, device=hidden.device)
            ctx.unit = None
        else:
            nll, grad_hidden, grad_weight = _liger(
                hidden, weight, targets, chunk, grads=eager, weight_grad=ctx.needs_input_grad[1]
            )
            ctx.unit = (grad_hidden, grad_weight) if eager else None
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.gather = chunk, gather
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        unit, ctx.unit = ctx.unit, None
        if hidden.shape[0] == 0:  # the weight's gradient still dense (zeros): see the module's last paragraph
            return torch.zeros_like(hidden), torch.zeros_like(weight), None, None, None, None
        g = grad_nll.float()
        if unit is not None and bool((g == g[0]).all()):
            grad_hidden, grad_weight = unit  # in the parameters' dtype (Liger casts at the end of its forward)
            scale = float(g[0])  # a Python scale: multiplied in fp32 inside the kernel (a bf16 tensor would round it)
            return grad_hidden.mul_(scale), grad_weight.mul_(scale), None, None, None, None
        with ctx.gather(weight) if ctx.gather else contextlib.nullcontext():
            _, grad_hidden, grad_weight = _liger(
                hidden, weight, targets, ctx.chunk, grads=True, weight_grad=ctx.needs_input_grad[1], token_grad=g
            )
        if grad_weight is None:
            grad_weight = torch.zeros_like(weight)
        return grad_hidden, grad_weight, None, None, None, None


def token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    gather: Optional[Callable] = None,
    uniform: bool = False,
    kernel: str = "torch",
) -> torch.Tensor:
    """Per-position cross-entropy [batch, seq] of hidden [batch, seq, H] through weight [V, H] at
    targets [batch, seq] (IGNORE = no loss, 0 there). Only supervised positions reach the head.
    uniform: see LinearCrossEntropy. kernel: "torch" (LinearCrossEntropy) or "liger" (LigerLinearCrossEntropy)."""
    flat_targets = targets.reshape(-1).to(hidden.device)
    where = (flat_targets != IGNORE).nonzero().squeeze(1)
    fn = LigerLinearCrossEntropy if kernel == "liger" else LinearCrossEntropy
    picked = fn.apply(
        hidden.reshape(-1, hidden.shape[-1]).index_select(0, where),
        weight,
        flat_targets.index_select(0, where),
        chunk,
        gather,
        uniform,
    )
    out = torch.zeros(flat_targets.shape[0], dtype=torch.float32, device=hidden.device).index_put((where,), picked)
    return out.view(targets.shape)
