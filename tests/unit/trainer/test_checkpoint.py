"""trainer/checkpointing/checkpoint.py without a training run: the manifest names a missing, truncated or corrupted
file; a checkpoint without COMPLETE is removed; fault points parse (trainer/faults.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from trainer import faults
from trainer.checkpointing.checkpoint import Checkpointer

TAG = "step_00000020"


# ---- the manifest (unit) --------------------------------------------------------------------------


def _fake_checkpoint(tmp_path: Path) -> Checkpointer:
    ck = Checkpointer(str(tmp_path), keep_last=2, rank=0, world_size=1)
    path = ck.dir / TAG
    path.mkdir(parents=True)
    for name, size in (
        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 5000),
        ("rng_rank0.pt", 300),
        ("trainer_state.json", 50),
    ):
        (path / name).write_bytes(os.urandom(size))
    files = ck._hash_files(TAG, sorted(ck._files(TAG)))
    (path / "COMPLETE").write_text(json.dumps({"files": files}))
    return ck


def test_an_intact_checkpoint_verifies(tmp_path):
    assert _fake_checkpoint(tmp_path).verify(TAG) == []


def test_a_missing_truncated_or_corrupted_file_is_named(tmp_path):
    ck = _fake_checkpoint(tmp_path)
    path = ck.dir / TAG
    (path / "rng_rank0.pt").unlink()
    with open(path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(2500)
    data = bytearray((path / "trainer_state.json").read_bytes())
    data[10] ^= 0xFF  # one flipped byte, same size
    (path / "trainer_state.json").write_bytes(bytes(data))
    assert sorted(ck.verify(TAG)) == sorted(
        [
            f"{path / 'rng_rank0.pt'} is missing",
            f"{path / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'} is 2500 bytes, 5000 were written (truncated?)",
            f"{path / 'trainer_state.json'} fails its CRC-32 check (corrupted)",
        ]
    )


def test_a_checkpoint_without_complete_is_removed_at_the_start_and_latest_is_required(tmp_path, monkeypatch):
    monkeypatch.setattr("trainer.distributed.barrier", lambda: None)  # one process, no group
    ck = _fake_checkpoint(tmp_path)
    (ck.dir / "latest").write_text(TAG)
    partial = ck.dir / "step_00000025"
    partial.mkdir()
    (partial / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half")
    ck._remove_partial()
    assert not partial.exists() and (ck.dir / TAG).is_dir()
    (ck.dir / "latest").unlink()
    with pytest.raises(RuntimeError, match="no `latest` file"):  # never a silent fresh start
        ck._choose()


def test_fault_points_parse_and_refuse_garbage(monkeypatch):
    from trainer.checkpointing.checkpoint import TrainState
    from trainer.objectives.token import TokenLoss

    monkeypatch.setenv(faults.NAN_LOSS, "3:1,4:0")
    plain = TokenLoss()
    assert faults.inject(plain, 2) == (plain, [])  # no fault for this rank: the objective itself
    poisoned, components = faults.inject(plain, 1)
    assert components == [poisoned] and poisoned.uniform and poisoned.count is not None
    nll, batch = torch.ones(2, 3), {}
    for step, nan in ((1, False), (2, True), (3, False)):  # state.step 2 is about to train step 3
        poisoned.pre_step(TrainState(step=step))
        first, _ = poisoned.rows(nll, batch)
        second, _ = poisoned.rows(nll, batch)
        assert bool(torch.isnan(first).all()) is nan and bool(torch.isfinite(second).all())  # first micro-batch only
    monkeypatch.setenv(faults.NAN_LOSS, "three")
    with pytest.raises(ValueError, match="STEP:RANK"):
        faults.inject(plain, 1)


def test_finished_step_reads_a_finished_run_from_its_files(tmp_path):
    """A rerun of a finished run (or recipe stage) is recognised before anything is built: latest ->
    a COMPLETE checkpoint at max_steps or later, and the export when one is asked for."""
    from trainer.checkpointing.checkpoint import finished_step

    out = str(tmp_path)
    assert finished_step(out, 20, export_hf=False) is None  # nothing there
    ck = tmp_path / "checkpoints"
    (ck / TAG).mkdir(parents=True)
    (ck / TAG / "trainer_state.json").write_text(json.dumps({"step": 20}))
    (ck / "latest").write_text(TAG)
    assert finished_step(out, 20, export_hf=False) is None  # the save never finished: no COMPLETE
    (ck / TAG / "COMPLETE").write_text("{}")
    assert finished_step(out, 20, export_hf=False) == 20
    assert finished_step(out, 30, export_hf=False) is None  # more steps asked for: resume, not skip
    assert finished_step(out, 20, export_hf=True) is None  # trained, not yet exported
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert finished_step(out, 20, export_hf=True) == 20
