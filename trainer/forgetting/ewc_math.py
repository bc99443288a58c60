"""Elastic weight consolidation, the math only: plain tensors in, plain tensors out. No deepspeed,
no torch.distributed; trainer/forgetting/ewc.py applies this to each rank's ZeRO-3 shard.

    penalty(θ)  = λ/2 · Σ_i F_i (θ_i − θ*_i)²
    ∇penalty(θ) = λ · F ⊙ (θ − θ*)

F is the diagonal (empirical) Fisher: the mean over reference batches of the squared gradient of
the loss, F = 1/N Σ_n g_n². θ* is the anchor, the weights at the start of the stage. Because
every term is elementwise, a rank that holds a slice of θ, θ* and F computes exactly its slice of
the gradient and its part of the penalty; the penalty's total is a sum over ranks.

Online EWC across stages (Schwarz et al., 2018) keeps one Fisher: F ← γ·F_old + F_new, with the
anchor moved to the start of the new stage.

Normalising F to mean 1 makes λ mean "how many loss units per squared unit of average parameter
drift", so a λ tuned on a small model transfers to a larger one; the mean is global (all ranks).
Worked example: F = [0, 2, 6] (mean 8/3) normalises to [0, 0.75, 2.25].
"""

from __future__ import annotations

from typing import Sequence

import torch


def penalty(theta: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor, lam: float) -> torch.Tensor:
    """λ/2 · Σ F (θ − θ*)², as a float64 scalar."""
    d = theta.double() - anchor.double()
    return 0.5 * lam * (fisher.double() * d * d).sum()


def penalty_and_grad(
    theta: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor, lam: float
) -> "tuple[torch.Tensor, torch.Tensor]":
    """The penalty and its gradient λ · F ⊙ (θ − θ*) at once, as the training step needs them, in
    one pass and in θ's dtype (no float64 copies): (0-dim penalty, gradient). The penalty is a dot
    product accumulated in θ's dtype; it is only logged, and equals penalty() to ~1e-5 relative in
    float32 (a 1M-element shard: 1.1e-5 summed on one thread, less on two)."""
    d = theta - anchor
    grad = (lam * fisher).mul_(d)
    return 0.5 * torch.dot(grad.flatten(), d.flatten()), grad


def accumulate_fisher(fisher_sum: torch.Tensor, grad: torch.Tensor) -> None:
    """fisher_sum += g² (in place, float32; no temporary the size of g when g is float32)."""
    g = grad.float()
    fisher_sum.addcmul_(g, g)


def online_merge_(new: torch.Tensor, old: torch.Tensor, gamma: float) -> torch.Tensor:
    """F ← γ·F_old + F_new, written into `new` (in place: no second copy of the Fisher) and returned."""
    return new.add_(old.float() * gamma)


def normalise(fishers: Sequence[torch.Tensor], global_sum: float, global_count: int) -> None:
    """Scale every local Fisher slice (in place) so the mean over all ranks' elements is 1."""
    mean = global_sum / max(global_count, 1)
    if mean > 0:
        for f in fishers:
            f.div_(mean)
