"""EWC's math (trainer/forgetting/ewc_math.py) against autograd and finite differences, and the
Fisher as the mean squared gradient, sharded or not."""

from __future__ import annotations

import torch

from trainer.forgetting import ewc_math


def test_penalty_gradient_matches_autograd_and_finite_differences():
    torch.manual_seed(0)
    theta = torch.randn(50, dtype=torch.float64, requires_grad=True)
    anchor, fisher, lam = torch.randn(50, dtype=torch.float64), torch.rand(50, dtype=torch.float64), 0.7
    value = ewc_math.penalty(theta, anchor, fisher, lam)
    (auto,) = torch.autograd.grad(value, theta)
    assert torch.allclose(ewc_math.penalty_and_grad(theta.detach(), anchor, fisher, lam)[1].double(), auto, atol=1e-6)
    eps, i = 1e-6, 7
    bumped = theta.detach().clone()
    bumped[i] += eps
    numeric = (ewc_math.penalty(bumped, anchor, fisher, lam) - value.detach()) / eps
    assert abs(float(numeric) - float(auto[i])) < 1e-4
    # by hand: λ/2 · F · d² with F = 2, d = 3, λ = 0.5 -> 4.5
    assert float(ewc_math.penalty(torch.tensor([3.0]), torch.tensor([0.0]), torch.tensor([2.0]), 0.5)) == 4.5


def test_the_fused_step_math_equals_the_reference_functions():
    """penalty_and_grad (float32, one pass; what the training step runs) against penalty (float64)
    and λ·F⊙(θ−θ*) written out, on a 1M-element shard."""
    torch.manual_seed(2)
    theta, anchor = torch.randn(1000, 1000), torch.randn(1000, 1000)
    fisher, lam = torch.rand(1000, 1000), 0.3
    value, grad = ewc_math.penalty_and_grad(theta, anchor, fisher, lam)
    assert grad.dtype == torch.float32 and torch.equal(grad, (lam * fisher) * (theta - anchor))
    reference = float(ewc_math.penalty(theta, anchor, fisher, lam))
    # a float32 sum of 1M terms: 1.1e-5 relative on one thread, less on two (the split changes the order)
    assert abs(float(value) - reference) <= 1e-4 * reference


def test_fisher_is_the_mean_squared_gradient_and_sharding_changes_nothing():
    """Accumulating g² per shard and normalising with global sums equals doing it unsharded."""
    torch.manual_seed(1)
    model = torch.nn.Linear(6, 3)
    batches = [(torch.randn(4, 6), torch.randn(4, 3)) for _ in range(5)]
    full = torch.zeros(sum(p.numel() for p in model.parameters()))
    for x, y in batches:
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        ewc_math.accumulate_fisher(full, torch.cat([p.grad.flatten() for p in model.parameters()]))
    full /= len(batches)
    reference = torch.stack(
        [
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), list(model.parameters()))
                ]
            )
            ** 2
            for x, y in batches
        ]
    ).mean(0)
    assert torch.allclose(full, reference, atol=1e-7)
    shards = [full[:10].clone(), full[10:].clone()]  # two "ranks"
    ewc_math.normalise(shards, float(full.sum()), full.numel())
    assert torch.allclose(torch.cat(shards), full / full.mean(), atol=1e-6)
    f = [torch.tensor([0.0, 2.0, 6.0])]
    ewc_math.normalise(f, 8.0, 3)  # the worked example in ewc_math's docstring
    assert torch.allclose(f[0], torch.tensor([0.0, 0.75, 2.25]))
    new = torch.tensor([1.0, 3.0])
    assert ewc_math.online_merge_(new, torch.tensor([2.0, 4.0]), 0.5) is new  # in place
    assert torch.equal(new, torch.tensor([2.0, 5.0]))  # 0.5 * old + new
