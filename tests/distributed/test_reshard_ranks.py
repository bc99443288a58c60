"""Resharding a checkpoint to another world size, in process (inprocess.run_distributed) on the
trainer's own tiny ZeRO-3 engine (test_collectives._engine: AdamW with weight decay on one of its two
param groups, a warmup-then-cosine schedule): 2 -> 1 and 1 -> 2 ranks.

Right after the reshard, the full fp32 weights and both Adam moments equal those the saving run held
bit for bit (torch.equal), as do the step count of every optimizer sub-group, each group's own weight
decay, the schedule's position and DeepSpeed's counters, and EWC's Fisher and anchor; EWC's penalty is
equal to float32 summation order (1e-6 relative: it is a float32 dot product per rank's slice, and
another world size cuts the slices elsewhere). The steps after it match the saving run's own next
steps to 1e-5 relative: the same rows and the same state, but the gradients of 2 ranks are reduced in
another order than 1 rank adds them (measured: ~1e-7).
"""

from __future__ import annotations

import json

import pytest
import torch
from inprocess import DistributedFailure, run_distributed
from test_collectives import FISHER_BATCHES, _engine, _reference_loss, _rows, _train_step

pytestmark = pytest.mark.distributed

LAM = 0.5
SAVED_STEPS = 3
NEXT = (4, 5)
TAG = "step_00000003"


def _full_state(engine) -> dict:
    """Every parameter's whole fp32 tensor and Adam moments (collective: ZeRO-3 gathers them)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    return {
        key: {
            n: (safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)).clone()
            for n, p in params
        }
        for key in ("fp32", "exp_avg", "exp_avg_sq")
    }


def _optimizer_facts(engine) -> dict:
    zero = engine.optimizer
    return {
        "steps": [float(zero.optimizer.state[f]["step"]) for f in zero.fp32_partitioned_groups_flat],
        "step_tensors_shared": len({id(zero.optimizer.state[f]["step"]) for f in zero.fp32_partitioned_groups_flat})
        < len(zero.fp32_partitioned_groups_flat),
        "weight_decay": [g["weight_decay"] for g in zero.optimizer.param_groups],
        "lr": engine.get_lr(),
        "last_epoch": engine.lr_scheduler.last_epoch,
        "counters": (engine.global_steps, engine.global_samples),
    }


def _penalty(ewc) -> float:
    """λ/2 Σ F(θ − θ*)² over every rank's slice (float64 sum of the ranks' float32 parts)."""
    from deepspeed.utils import safe_get_local_fp32_param

    from trainer import distributed
    from trainer.forgetting import ewc_math

    local = sum(
        float(ewc_math.penalty_and_grad(safe_get_local_fp32_param(p).detach(), a, f, ewc.lam)[0])
        for p, a, f in zip(ewc.params, ewc.anchor, ewc.fisher)
    )
    return float(distributed.all_reduce_sum(torch.tensor([local], dtype=torch.float64)))


def _full_ewc(ewc, world: int) -> dict:
    """EWC's Fisher and anchor as whole tensors per parameter (gathered from every rank's slice)."""
    from trainer import distributed

    mine = {"fisher": ewc.fisher, "anchor": ewc.anchor}
    ranks = distributed.all_gather_object(mine)
    return {
        key: [torch.cat([r[key][i] for r in ranks])[: p.ds_numel] for i, p in enumerate(ewc.params)] for key in mine
    }


def _train_and_save(rank, world, out):
    """SAVED_STEPS steps with EWC, a checkpoint, then the run's own next steps (the reference)."""
    from trainer.checkpointing.checkpoint import Checkpointer, TrainState
    from trainer.forgetting.ewc import EWC

    engine = _engine(world)
    ewc = EWC(engine, lam=LAM)
    ewc.start(
        engine,
        [{"input_ids": _rows(100 + n, rank, world)} for n in range(FISHER_BATCHES)],
        _reference_loss,
        engine.device,
    )
    for step in range(1, SAVED_STEPS + 1):
        _train_step(engine, step, rank, world, before_step=ewc.before_step)
    state = TrainState(
        step=SAVED_STEPS, tokens_seen=123, world_size=world, micro_batch_size=4 // world, grad_accum_steps=1
    )
    Checkpointer(out, keep_last=2, rank=rank, world_size=world, extras={"ewc": ewc}).save(engine, state)
    saved = {
        "state": _full_state(engine),
        "optimizer": _optimizer_facts(engine),
        "penalty": _penalty(ewc),
        "ewc": _full_ewc(ewc, world),
    }
    saved["next"] = [_train_step(engine, s, rank, world, before_step=ewc.before_step) for s in NEXT]
    return saved


def _resume(rank, world, out, env_note=""):
    """A fresh engine of another world size (other initial weights) resumes the checkpoint."""
    from trainer.checkpointing.checkpoint import Checkpointer
    from trainer.forgetting.ewc import EWC

    engine = _engine(world, seed=1)
    ewc = EWC(engine, lam=LAM)
    state = Checkpointer(out, keep_last=2, rank=rank, world_size=world, extras={"ewc": ewc}).resume(engine)
    got = {
        "state": _full_state(engine),
        "optimizer": _optimizer_facts(engine),
        "penalty": _penalty(ewc),
        "ewc": _full_ewc(ewc, world),
        "train_state": state,
    }
    got["next"] = [_train_step(engine, s, rank, world, before_step=ewc.before_step) for s in NEXT]
    got["steps_after"] = _optimizer_facts(engine)["steps"]
    return got


def _assert_exact_reshard(saved: dict, got: dict) -> None:
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        unequal = [n for n, t in saved["state"][key].items() if not torch.equal(t, got["state"][key][n])]
        assert not unequal, f"{key} differs after the reshard: {unequal}"
    s, g = saved["optimizer"], got["optimizer"]
    assert g["steps"] == s["steps"] == [float(SAVED_STEPS)] * len(s["steps"])
    assert not g["step_tensors_shared"], "the sub-groups share one step tensor: Adam would count each step twice"
    assert g["weight_decay"] == s["weight_decay"] and len(set(s["weight_decay"])) == 2, (g, s)
    assert (g["lr"], g["last_epoch"]) == (s["lr"], s["last_epoch"])
    assert g["counters"][0] == s["counters"][0] == SAVED_STEPS
    for key in ("fisher", "anchor"):
        assert all(torch.equal(a, b) for a, b in zip(saved["ewc"][key], got["ewc"][key])), key
    assert got["penalty"] > 0 and abs(got["penalty"] - saved["penalty"]) <= 1e-6 * saved["penalty"]
    for step, (ours, ref) in enumerate(zip(got["next"], saved["next"]), start=NEXT[0]):
        assert abs(ours - ref) <= 1e-5 * ref, (step, ours, ref)
    assert got["steps_after"] == [float(SAVED_STEPS + len(NEXT))] * len(s["steps"])
    assert got["train_state"].step == SAVED_STEPS and got["train_state"].tokens_seen == 123


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_checkpoint_reshards_to_another_world_size_exactly(tmp_path, before, after):
    saved = run_distributed(_train_and_save, before, str(tmp_path))
    got = run_distributed(_resume, after, str(tmp_path))
    for rank in range(after):
        _assert_exact_reshard(saved[0], got[rank])
    universal = tmp_path / "checkpoints/universal" / TAG
    assert (universal / "COMPLETE").is_file() and sorted(p.name for p in universal.parent.iterdir()) == [TAG]
    made_from = json.loads((universal / "source.json").read_text())
    assert made_from["saved_by"] == before and made_from["source"] == TAG and made_from["converted_by"] == after
    # The conversion is kept: the next reshard of the same checkpoint reuses it (and is as exact).
    stamp = (universal / "COMPLETE").stat().st_mtime_ns
    again = run_distributed(_resume, after, str(tmp_path))
    assert (universal / "COMPLETE").stat().st_mtime_ns == stamp
    _assert_exact_reshard(saved[0], again[0])


def _resume_expecting_failure(rank, world, out):
    from trainer.checkpointing.checkpoint import Checkpointer
    from trainer.forgetting.ewc import EWC

    engine = _engine(world, seed=1)
    Checkpointer(out, keep_last=2, rank=rank, world_size=world, extras={"ewc": EWC(engine, lam=LAM)}).resume(engine)


def test_a_kill_during_the_conversion_leaves_the_checkpoint_usable_and_the_next_start_converts_again(tmp_path):
    from trainer import faults
    from trainer.checkpointing.checkpoint import Checkpointer

    saved = run_distributed(_train_and_save, 2, str(tmp_path))
    ckpt = tmp_path / "checkpoints"
    source = {p.name: p.read_bytes() for p in (ckpt / TAG).iterdir() if p.is_file()}
    for phase in ("convert", "finalize"):
        with pytest.raises(DistributedFailure) as failed:
            run_distributed(_resume_expecting_failure, 1, str(tmp_path), env={faults.KILL_IN_RESHARD: f"{phase}:0"})
        assert failed.value.exitcodes[0] == -9, failed.value  # SIGKILL, where the fault put it
        assert (ckpt / f"universal/{TAG}.tmp").is_dir() and not (ckpt / "universal" / TAG).exists(), phase
        assert (ckpt / "latest").read_text() == TAG
        assert {p.name: p.read_bytes() for p in (ckpt / TAG).iterdir() if p.is_file()} == source, phase
    # The checkpoint itself verifies on its own world size, and the next start converts and resumes exactly.
    problems = run_distributed(_verify, 2, str(tmp_path))
    assert problems == [[], []]
    (got,) = run_distributed(_resume, 1, str(tmp_path))
    assert not (ckpt / f"universal/{TAG}.tmp").exists() and not (ckpt / f"universal/{TAG}.sync").exists()
    _assert_exact_reshard(saved[0], got)

    # A damaged conversion (a moment file cut short) is found by its manifest and made again.
    moment = next((ckpt / "universal" / TAG / "zero").glob("*/exp_avg.pt"))
    with open(moment, "r+b") as f:
        f.truncate(moment.stat().st_size // 2)
    (got,) = run_distributed(_resume, 1, str(tmp_path))
    _assert_exact_reshard(saved[0], got)
    assert Checkpointer(str(tmp_path), 2, 0, 1).verify(f"universal/{TAG}") == []


def _verify(rank, world, out):
    from trainer.checkpointing.checkpoint import Checkpointer

    return Checkpointer(out, keep_last=2, rank=rank, world_size=world).verify(TAG)
