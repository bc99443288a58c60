"""EWC on real ZeRO-3 shards with 2 CPU ranks: λ=0 is the plain run exactly, 2 sharded ranks equal 1
unsharded rank, a resume restores the Fisher and anchor instead of re-estimating them."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import LAUNCHER, QUICK, check, read_metrics, run_train, series

# ---- 2 CPU ranks, real DeepSpeed ZeRO-3 ---------------------------------------------------------
RUN = QUICK + [
    "trainer.max_steps=6",
    "trainer.cadence.save_every_steps=3",
    "trainer.cadence.eval_every_steps=3",
    "+eval.sets.general=${bundled:general_text_heldout.txt}",
    "trainer.export_hf=false",
]
EWC = ["regularizer=ewc", "regularizer.ewc.lam=50", "regularizer.ewc.fisher_batches=2"]


@pytest.fixture(scope="module")
def ewc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ewc")
    check(run_train(LAUNCHER, RUN + EWC + [f"output_dir={out}"]))
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
def test_resume_restores_fisher_and_anchor(ewc_run, tmp_path):
    """Rerun from the step-3 checkpoint: steps 4-6 must match the straight run, which they would not
    if the Fisher or the anchor were re-estimated from the step-3 weights."""
    out = tmp_path / "resumed"
    shutil.copytree(ewc_run, out)
    shutil.rmtree(out / "checkpoints/step_00000006")
    (out / "checkpoints/latest").write_text("step_00000003")
    check(run_train(LAUNCHER, RUN + EWC + [f"output_dir={out}"]))
    for key in ("train/loss", "reg/ewc_penalty"):
        assert series(read_metrics(out), key) == series(read_metrics(ewc_run), key), key
