"""Faults on 2 real ZeRO-3 ranks through the whole trainer: a full disk, a NaN loss; faults injected
at an exact point through trainer/faults.py. Another world size, and weights given with a
checkpoint present, resume the reference run (test_training.py, which owns the runs that share it).
A rank killed inside a checkpoint save and a damaged checkpoint are tested on the Checkpointer
itself, in process (test_collectives.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import LAUNCHER, QUICK, STRAIGHT, read_metrics, run_train, series
from trainer import faults


def _text(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def _survivors(out: Path) -> list:
    return subprocess.run(["pgrep", "-f", f"output_dir={out}"], capture_output=True, text=True).stdout.split()


# ---- real runs (2 ranks) --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB tmpfs (root only): too small for one 2-rank checkpoint of the tiny model (~48 MB)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def _resize(mnt: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_a_full_disk_stops_with_a_clear_error_and_the_previous_checkpoint_intact(small_disk):
    out = small_disk / "run"
    # 1. The first save fails halfway (ENOSPC): named, nothing claims to be a checkpoint.
    proc = run_train(LAUNCHER, STRAIGHT + [f"output_dir={out}"])
    assert proc.returncode != 0
    text = _text(proc)
    assert f"could not write checkpoint {out}/checkpoints/step_00000005" in text, text[-3000:]
    assert "GB free there. checkpoints/latest still points at nothing yet" in text
    assert not (out / "checkpoints/latest").exists() and not _survivors(out)

    # 2. Room for one checkpoint: the rerun removes the partial one, starts afresh (there was no
    # checkpoint), saves step 5, and refuses step 10 before writing a byte of it.
    _resize(small_disk, "70m")
    proc = run_train(LAUNCHER, STRAIGHT + [f"output_dir={out}"])
    assert proc.returncode != 0
    text = _text(proc)
    assert f"removing {out}/checkpoints/step_00000005: a checkpoint save that did not finish" in text
    assert f"not enough space for checkpoint step_00000010 in {out}/checkpoints" in text, text[-3000:]
    assert "checkpoints/latest still points at step_00000005, which is intact" in text
    assert (out / "checkpoints/latest").read_text() == "step_00000005"
    assert not (out / "checkpoints/step_00000010").exists() and not _survivors(out)

    # 3. What it left is a checkpoint the same command resumes from once there is space: complete
    # by its manifest (resuming from a checkpoint is what the kill-in-save test above proves).
    from trainer.checkpointing.checkpoint import Checkpointer

    assert Checkpointer(str(out), keep_last=2, rank=0, world_size=1).verify("step_00000005") == []


NAN_RUN = QUICK + [
    "trainer.max_steps=6",
    "trainer.cadence.save_every_steps=0",
    "trainer.export_hf=false",
    "eval.at_start=false",
]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_a_nan_loss_stops_the_run_naming_the_step_and_the_rows(tmp_path):
    out = tmp_path / "run"
    proc = run_train(LAUNCHER, NAN_RUN + [f"output_dir={out}"], env={faults.NAN_LOSS: "3:1"})
    assert proc.returncode != 0 and not _survivors(out)
    text = _text(proc)
    assert (
        "non-finite loss/gradient at step 3 (loss=nan, grad_norm=inf): rows with a non-finite loss: main:row " in text
    )
    assert "(rank 1, micro-batch 0)" in text and "(rank 0," not in text
    assert "The update was skipped; the weights are those of step 2. Stopped, without saving" in text
    assert "trainer.failure.on_nonfinite=skip would skip such steps" in text
    assert sorted(series(read_metrics(out), "train/loss")) == [1, 2]  # nothing logged past the bad step


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_skip_mode_counts_skipped_steps_and_stops_past_the_limit(tmp_path):
    out = tmp_path / "run"
    proc = run_train(
        LAUNCHER,
        NAN_RUN + ["trainer.failure.on_nonfinite=skip", "trainer.failure.max_skipped_steps=1", f"output_dir={out}"],
        env={faults.NAN_LOSS: "2:1,4:0"},
    )
    assert proc.returncode != 0
    text = _text(proc)
    assert (
        "non-finite loss/gradient at step 2" in text
        and "Skipped (1 of at most trainer.failure.max_skipped_steps=1)" in text
    )
    assert "OVERFLOW! Skipping step" in text  # DeepSpeed's own word that the update was dropped
    assert "2 steps skipped, more than trainer.failure.max_skipped_steps=1" in text
    rows = read_metrics(out)
    assert series(rows, "train/skipped_steps") == {1: 0, 2: 1, 3: 1}
    loss = series(rows, "train/loss")
    assert loss[2] != loss[2] and loss[3] == loss[3]  # NaN logged at the skipped step, finite after it
