"""EWC: the math against autograd and finite differences (unit), then on real ZeRO-3 shards with 2 CPU
ranks: λ=0 is the plain run exactly, 2 sharded ranks equal 1 unsharded rank, and a resume restores
the Fisher and anchor instead of re-estimating them."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import QUICK, check, read_metrics, run_train, series
from trainer.regularizers import ewc_math


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
    assert abs(float(value) - reference) <= 1e-5 * reference


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
    reference = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        torch.nn.functional.mse_loss(model(x), y), list(model.parameters()))]) ** 2 for x, y in batches]).mean(0)
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


# ---- 2 CPU ranks, real DeepSpeed ZeRO-3 ---------------------------------------------------------
RUN = QUICK + ["trainer.max_steps=6", "trainer.save_every_steps=3", "trainer.eval_every_steps=3",
               "+eval.sets.general=${samples:general_text_heldout.txt}", "trainer.export_hf=false"]
EWC = ["regularizer=ewc", "regularizer.ewc.lam=50", "regularizer.ewc.fisher_batches=2"]


@pytest.fixture(scope="module")
def ewc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ewc")
    check(run_train("deepspeed", RUN + EWC + [f"output_dir={out}"]))
    return out


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_ewc_runs_sharded_logs_its_penalty_and_forgetting(ewc_run):
    rows = read_metrics(ewc_run)
    penalty = series(rows, "reg/ewc_penalty")
    assert penalty[1] == 0.0 < penalty[2] < penalty[6]  # θ = θ* before the first step, then it drifts
    assert set(series(rows, "eval/forgetting")) == {3, 6} and set(series(rows, "eval/domain_gain")) == {3, 6}
    assert (ewc_run / "checkpoints/step_00000006/ewc_rank1.pt").is_file()
    shard = torch.load(ewc_run / "checkpoints/step_00000006/ewc_rank0.pt", weights_only=True)
    local = sum(t.numel() for t in shard["fisher"])
    # each rank holds about half of the ~4M parameters' Fisher (ZeRO-3 partitions, not a full copy)
    assert 1.5e6 < local < 2.5e6


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_lambda_zero_reproduces_the_plain_run_exactly(tmp_path):
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    check(run_train("deepspeed", RUN + [f"output_dir={plain}"]))
    check(run_train("deepspeed", RUN + EWC + ["regularizer.ewc.lam=0", f"output_dir={zero}"]))
    assert series(read_metrics(zero), "train/loss") == series(read_metrics(plain), "train/loss")


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_two_sharded_ranks_equal_one_unsharded_rank(ewc_run, tmp_path):
    check(run_train("python", RUN + EWC + ["trainer.micro_batch_size=8", f"output_dir={tmp_path}"]))
    one, two = read_metrics(tmp_path), read_metrics(ewc_run)
    for key in ("train/loss", "reg/ewc_penalty"):
        a, b = series(one, key), series(two, key)
        assert a.keys() == b.keys()
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-4 * max(abs(b[step]), 1e-3), (key, step, a[step], b[step])


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_resume_restores_fisher_and_anchor(ewc_run, tmp_path):
    """Rerun from the step-3 checkpoint: steps 4-6 must match the straight run, which they would not
    if the Fisher or the anchor were re-estimated from the step-3 weights."""
    out = tmp_path / "resumed"
    shutil.copytree(ewc_run, out)
    shutil.rmtree(out / "checkpoints/step_00000006")
    (out / "checkpoints/latest").write_text("step_00000003")
    check(run_train("deepspeed", RUN + EWC + [f"output_dir={out}"]))
    for key in ("train/loss", "reg/ewc_penalty"):
        assert series(read_metrics(out), key) == series(read_metrics(ewc_run), key), key
