"""trainer/checkpointing/reshard.py without ranks: re-cutting ZeRO-3 partitions, keeping the global batch (and the
errors that say how), reading a checkpoint's layout from its files, EWC's state re-cut, and the
conversion directory's place in the checkpoint protocol. The conversion and load on a real engine:
tests/distributed/test_reshard_ranks.py."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from trainer.checkpointing.checkpoint import Checkpointer
from trainer.checkpointing.reshard import Layout, ReshardError, partition, repartition, resolve_batch, saved_layout
from trainer.forgetting.ewc import EWC

# ---- partitions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 2, 7, 12, 13, 64])
@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (3, 2), (2, 3), (4, 3), (1, 5)])
def test_repartition_equals_cutting_the_whole_tensor_for_the_new_world(numel, old, new):
    full = torch.randn(numel)
    slices = [partition(full, old, r) for r in range(old)]
    assert all(s.numel() == math.ceil(numel / old) for s in slices)
    for rank in range(new):
        got = repartition(slices, numel, new, rank)
        assert torch.equal(got, partition(full, new, rank))
        assert got.numel() == math.ceil(numel / new)
    whole = torch.cat([repartition(slices, numel, new, r) for r in range(new)])
    assert torch.equal(whole[:numel], full) and not whole[numel:].any()  # padding is zeros


def test_a_slice_of_the_wrong_size_is_refused():
    with pytest.raises(ReshardError, match="rank 1's slice has 3 elements, 4 expected"):
        repartition([torch.zeros(4), torch.zeros(3)], 7, 1, 0)


def test_ewc_state_is_recut_for_the_new_world_element_for_element():
    numels = [5, 8, 1]
    fisher = [torch.rand(n) for n in numels]
    anchor = [torch.randn(n) for n in numels]
    states = [
        {"fisher": [partition(f, 2, r) for f in fisher], "anchor": [partition(a, 2, r) for a in anchor]}
        for r in range(2)
    ]
    for world in (1, 3):
        for rank in range(world):
            ewc = EWC.__new__(EWC)
            ewc.params = [SimpleNamespace(ds_numel=n) for n in numels]
            ewc.load_resharded(states, world, rank)
            assert all(torch.equal(got, partition(f, world, rank)) for got, f in zip(ewc.fisher, fisher))
            assert all(torch.equal(got, partition(a, world, rank)) for got, a in zip(ewc.anchor, anchor))
    ewc.params = ewc.params[:2]
    with pytest.raises(ValueError, match="3 anchor partitions saved, this model has 2"):
        ewc.load_resharded(states, 1, 0)


# ---- the global batch -----------------------------------------------------------------------------


TWO = Layout(world_size=2, micro_batch_size=2, grad_accum_steps=2)  # 8 rows a step


def test_a_fresh_run_takes_the_accumulation_it_is_given_or_one_or_the_global_batch():
    assert resolve_batch(4, None, None, 2, None) == 1
    assert resolve_batch(4, 3, None, 2, None) == 3
    assert resolve_batch(2, None, 16, 4, None) == 2
    assert resolve_batch(2, 2, 16, 4, None) == 2
    with pytest.raises(
        ReshardError,
        match=r"global_batch_size=12 is not a multiple of trainer.micro_batch_size=4 x "
        r"2 ranks = 8.*micro-batches that divide it: 1, 2, 3, 6",
    ):
        resolve_batch(4, None, 12, 2, None)
    with pytest.raises(ReshardError, match="grad_accum_steps=3 and trainer.global_batch_size=16 disagree"):
        resolve_batch(2, 3, 16, 4, None)


def test_a_resume_keeps_the_checkpoints_global_batch_on_any_world_size():
    assert resolve_batch(2, None, None, 2, TWO) == 2  # same world: as saved
    assert resolve_batch(2, None, None, 1, TWO) == 4  # 2 -> 1: derived
    assert resolve_batch(2, None, None, 4, TWO) == 1  # 2 -> 4
    assert resolve_batch(1, None, None, 4, TWO) == 2  # another micro-batch too
    assert resolve_batch(2, 4, None, 1, TWO) == 4  # fixed, and it keeps B
    assert resolve_batch(2, None, 8, 1, TWO) == 4  # from the global batch, and it keeps B


def test_a_global_batch_that_cannot_be_kept_stops_naming_the_settings_that_would():
    with pytest.raises(ReshardError) as fixed:
        resolve_batch(2, 2, None, 1, TWO)
    message = str(fixed.value)
    assert (
        "trained with a global batch of 2 ranks x micro 2 x accumulation 2 = 8 rows a step, and this run asks for "
        "trainer.micro_batch_size=2 x trainer.grad_accum_steps=2 x 1 ranks = 4"
    ) in message
    assert "trainer.micro_batch_size=2 trainer.grad_accum_steps=4" in message
    assert "trainer.resume.allow_new_global_batch=true" in message
    with pytest.raises(ReshardError, match=r"trainer.micro_batch_size=3 x 1 ranks does not divide it"):
        resolve_batch(3, None, None, 1, TWO)
    with pytest.raises(ReshardError, match=r"not possible \(8 rows are not divisible by 3 ranks\)"):
        resolve_batch(2, None, None, 3, TWO)
    with pytest.raises(ReshardError, match="this run asks for trainer.global_batch_size=4"):
        resolve_batch(2, None, 4, 1, TWO)
    # Accepted: the new batch as asked (or the nearest the world allows).
    assert resolve_batch(2, 2, None, 1, TWO, allow_new=True) == 2
    assert resolve_batch(2, None, None, 3, TWO, allow_new=True) == 1
    # Elastic resume off: no derivation for another world (the checkpointer refuses it with its message).
    assert resolve_batch(2, None, None, 1, TWO, elastic=False) == 2


def test_the_layout_is_read_from_the_checkpoint_or_for_older_ones_from_the_config(tmp_path):
    assert saved_layout(str(tmp_path)) is None
    tag = tmp_path / "checkpoints/step_00000010"
    tag.mkdir(parents=True)
    (tmp_path / "checkpoints/latest").write_text("step_00000010")
    (tag / "trainer_state.json").write_text(
        json.dumps({"step": 10, "world_size": 4, "micro_batch_size": 1, "grad_accum_steps": 3})
    )
    assert saved_layout(str(tmp_path)) == Layout(4, 1, 3) and Layout(4, 1, 3).global_batch == 12
    # Written before the layout was recorded: world from the optimizer shards, batch from config.yaml.
    (tag / "trainer_state.json").write_text(json.dumps({"step": 10}))
    for r in range(2):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (tmp_path / "config.yaml").write_text("trainer:\n  micro_batch_size: 2\n  grad_accum_steps: 5\n")
    assert saved_layout(str(tmp_path)) == Layout(2, 2, 5)
    (tmp_path / "config.yaml").unlink()
    assert saved_layout(str(tmp_path)) is None  # unknown: nothing is derived or checked


# ---- the conversion in the checkpoint protocol --------------------------------------------------------


def test_an_unfinished_conversion_is_removed_at_the_start_and_a_conversion_goes_with_its_checkpoint(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("trainer.distributed.barrier", lambda: None)  # one process, no group
    ck = Checkpointer(str(tmp_path), keep_last=1, rank=0, world_size=1)
    for tag in ("step_00000010", "step_00000020"):
        (ck.dir / tag).mkdir(parents=True)
        (ck.dir / tag / "COMPLETE").write_text("{}")
        (ck.dir / "universal" / tag).mkdir(parents=True)
        (ck.dir / "universal" / tag / "COMPLETE").write_text("{}")
    (ck.dir / "latest").write_text("step_00000020")
    (ck.dir / "universal/step_00000020.tmp/zero").mkdir(parents=True)
    ck._remove_partial()
    assert not (ck.dir / "universal/step_00000020.tmp").exists()
    assert (ck.dir / "universal/step_00000020").is_dir()  # a finished conversion stays
    ck._prune(keep="step_00000020")
    assert sorted(p.name for p in ck.dir.glob("step_*")) == ["step_00000020"]
    assert sorted(p.name for p in (ck.dir / "universal").iterdir()) == ["step_00000020"]


def test_the_reshard_fault_point_names_a_phase_and_a_rank(monkeypatch):
    from trainer import faults

    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setenv(faults.KILL_IN_RESHARD, "convert:0")
    faults.kill_in_reshard("finalize", 0)
    faults.kill_in_reshard("convert", 1)
    assert killed == []
    faults.kill_in_reshard("convert", 0)
    assert len(killed) == 1


def test_online_ewc_reads_an_earlier_stage_saved_by_another_number_of_ranks(tmp_path):
    from trainer.forgetting.ewc import load_previous

    numels = [5, 8]
    fisher, anchor = [torch.rand(n) for n in numels], [torch.randn(n) for n in numels]
    tag = tmp_path / "checkpoints/step_00000020"
    tag.mkdir(parents=True)
    (tmp_path / "checkpoints/latest").write_text("step_00000020")
    for r in range(2):
        torch.save(
            {"fisher": [partition(f, 2, r) for f in fisher], "anchor": [partition(a, 2, r) for a in anchor]},
            tag / f"ewc_rank{r}.pt",
        )
    same = load_previous(str(tmp_path), 1, 2, numels)
    assert all(torch.equal(got, partition(f, 2, 1)) for got, f in zip(same["fisher"], fisher))
    for world in (1, 3):
        for rank in range(world):
            got = load_previous(str(tmp_path), rank, world, numels)
            assert all(torch.equal(g, partition(f, world, rank)) for g, f in zip(got["fisher"], fisher))
    with pytest.raises(ValueError, match="2 partitions, this model has 3"):
        load_previous(str(tmp_path), 0, 1, numels + [4])


def test_accepting_a_new_global_batch_moves_the_data_origin_to_the_row_where_the_checkpoint_stopped():
    from trainer.checkpointing.checkpoint import TrainState
    from trainer.checkpointing.layout import continue_data as _continue_data

    state = TrainState(step=10, world_size=2, micro_batch_size=2, grad_accum_steps=2)  # 8 rows a step
    same = TrainState(step=10, world_size=2, micro_batch_size=2, grad_accum_steps=2)
    _continue_data(
        same,
        SimpleNamespace(
            micro_batch_size=4, grad_accum_steps=2, resume=SimpleNamespace(allow_new_global_batch=False), max_steps=20
        ),
        1,
    )  # another layout, the same 8 rows: nothing moves
    assert same.data_origin == [0, 0] and same.layout() == Layout(1, 4, 2)
    with pytest.raises(
        ReshardError,
        match="trained with 2 ranks x micro 2 x accumulation 2 = 8 rows a step, this run has 6 rows a step",
    ):
        _continue_data(
            TrainState(step=10, world_size=2, micro_batch_size=2, grad_accum_steps=2),
            SimpleNamespace(
                micro_batch_size=2,
                grad_accum_steps=3,
                resume=SimpleNamespace(allow_new_global_batch=False),
                max_steps=20,
            ),
            1,
        )
    _continue_data(
        state,
        SimpleNamespace(
            micro_batch_size=2, grad_accum_steps=3, resume=SimpleNamespace(allow_new_global_batch=True), max_steps=20
        ),
        1,
    )  # 6 rows a step from step 10 = row 80
    assert state.data_origin == [10, 80] and state.layout() == Layout(1, 2, 3)
    state.step = 15  # and again at step 15, after 5 steps of 6 rows
    _continue_data(
        state,
        SimpleNamespace(
            micro_batch_size=1, grad_accum_steps=1, resume=SimpleNamespace(allow_new_global_batch=True), max_steps=20
        ),
        4,
    )
    assert state.data_origin == [15, 110]


def test_a_conversion_that_cannot_fit_is_refused_and_a_failed_rank_ends_the_others_wait(tmp_path, monkeypatch):
    from collections import namedtuple

    from trainer.checkpointing import reshard

    source = tmp_path / "checkpoints/step_00000010"
    source.mkdir(parents=True)
    for r in range(2):
        (source / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(reshard.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 3000, 3000))
    refusal = reshard._no_room(source, tmp_path / "checkpoints")
    assert refusal.startswith(
        f"not enough space to convert {source} for another world size in {tmp_path / 'checkpoints'}: "
        "about 0.000 GB needed (twice its optimizer shards), 0.000 GB free"
    )
    monkeypatch.setattr(reshard.shutil, "disk_usage", lambda path: usage(10**6, 0, 4000))
    assert reshard._no_room(source, tmp_path / "checkpoints") is None
    # A rank's failure reaches every rank waiting on the filesystem, at once.
    sync = tmp_path / "checkpoints/universal/step_00000010.sync"
    sync.mkdir(parents=True)
    (sync / "FAILED.1").write_text("OSError: [Errno 5] Input/output error")
    with pytest.raises(ReshardError, match=r"waited for rank 0 to finish the conversion .* but rank 1 failed: OSError"):
        reshard._wait_for(tmp_path / "checkpoints/universal/step_00000010", sync, 2)


def test_deepspeeds_loader_maps_the_parameter_files_so_each_rank_reads_only_its_slice(monkeypatch):
    from deepspeed.runtime.zero import stage3

    from trainer.checkpointing import deepspeed_patches

    calls = []
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: calls.append((os.path.basename(f), kw.get("mmap"))))
    with deepspeed_patches.mapped_parameter_files():
        for name in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt", "optimizer_state.pt"):
            stage3.torch.load(f"/ckpt/universal/step_00000010/zero/model.norm.weight/{name}", weights_only=False)
        assert stage3.torch.zeros(2).shape == (2,)  # everything else is torch itself
    assert calls == [("fp32.pt", True), ("exp_avg.pt", True), ("exp_avg_sq.pt", True), ("optimizer_state.pt", None)]
    assert stage3.torch is torch
