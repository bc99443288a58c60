"""Faults: what a run does when a rank dies inside a checkpoint save, a checkpoint is damaged, the
disk fills up, the loss turns NaN, or the world size changes between attempts. Real DeepSpeed
ZeRO-3 runs with 2 CPU ranks (marked `distributed`), faults injected at an exact point through
trainer/faults.py; the checkpoint manifest also has quick unit tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import QUICK, ROOT, STRAIGHT, check, read_metrics, run_train, series
from test_distributed import assert_same_steps
from trainer import faults
from trainer.checkpoint import Checkpointer

TAG = "step_00000020"


def _text(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def _copy_run(src: Path, dst: Path, *skip: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("wandb", *skip))
    return dst


def _survivors(out: Path) -> list:
    return subprocess.run(["pgrep", "-f", f"output_dir={out}"], capture_output=True, text=True).stdout.split()


# ---- the manifest (unit) --------------------------------------------------------------------------


def _fake_checkpoint(tmp_path: Path) -> Checkpointer:
    ck = Checkpointer(str(tmp_path), keep_last=2, rank=0, world_size=1)
    path = ck.dir / TAG
    path.mkdir(parents=True)
    for name, size in (("zero_pp_rank_0_mp_rank_00_optim_states.pt", 5000), ("rng_rank0.pt", 300),
                       ("trainer_state.json", 50)):
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
    assert sorted(ck.verify(TAG)) == sorted([
        f"{path / 'rng_rank0.pt'} is missing",
        f"{path / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'} is 2500 bytes, 5000 were written (truncated?)",
        f"{path / 'trainer_state.json'} fails its CRC-32 check (corrupted)"])


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
    monkeypatch.setenv(faults.NAN_LOSS, "3:1,4:0")
    assert faults.nan_loss(3, 1) and faults.nan_loss(4, 0) and not faults.nan_loss(3, 0)
    monkeypatch.setenv(faults.NAN_LOSS, "three")
    with pytest.raises(ValueError, match="STEP:RANK"):
        faults.nan_loss(3, 1)


# ---- real runs (2 ranks) --------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_sigkill_inside_a_save_keeps_the_previous_checkpoint_and_the_rerun_resumes_exactly(straight_run, tmp_path):
    """Rank 1 dies after writing its shards of step 10 and before COMPLETE: the job ends, `latest`
    still names step 5, and the same command again removes the partial step 10, resumes at 5 and
    trains exactly the straight run's steps (grad accumulation 2, packing, third epoch)."""
    out = tmp_path / "run"
    started = time.time()
    proc = run_train("deepspeed", STRAIGHT + [f"output_dir={out}"], env={faults.KILL_IN_SAVE: "10:1"})
    assert proc.returncode != 0, _text(proc)[-3000:]
    assert not _survivors(out)
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000005"
    assert (ckpt / "step_00000010").is_dir() and not (ckpt / "step_00000010/COMPLETE").exists()
    print(f"killed inside the save: job over {time.time() - started:.0f} s after it started")

    rerun = run_train("deepspeed", STRAIGHT + [f"output_dir={out}"])
    check(rerun)
    assert f"removing {ckpt}/step_00000010: a checkpoint save that did not finish" in _text(rerun)
    assert f"resumed from {ckpt}/step_00000005 at step 5" in _text(rerun)
    assert_same_steps(read_metrics(out), read_metrics(straight_run[0]))
    assert _engine_counters(out) == _engine_counters(straight_run[0]) == (20, 160, 0, 20)


def _engine_counters(out: Path):
    """DeepSpeed's own count of optimizer steps, samples, skipped steps, and the lr scheduler's
    position in the final checkpoint (a pickle DeepSpeed wrote: a test may read it)."""
    import torch

    state = torch.load(out / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    return state["global_steps"], state["global_samples"], state["skipped_steps"], state["lr_scheduler"]["last_epoch"]


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_a_damaged_shard_stops_naming_it_and_the_fallback_resumes_from_the_previous_checkpoint(straight_run, tmp_path):
    out = _copy_run(straight_run[0], tmp_path / "run", "hf")
    shard = out / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    started = time.time()
    proc = run_train("deepspeed", STRAIGHT + [f"output_dir={out}"])
    assert proc.returncode != 0
    assert time.time() - started < 120
    assert f"{shard} is {size // 2} bytes, {size} were written (truncated?)" in _text(proc), _text(proc)[-3000:]
    assert "rerun with trainer.resume_fallback=true to resume from the previous complete checkpoint " \
           "(step_00000015)" in _text(proc)
    assert not _survivors(out)

    rerun = run_train("deepspeed", STRAIGHT + [f"output_dir={out}", "trainer.resume_fallback=true"])
    check(rerun)
    assert "falling back to step_00000015" in _text(rerun)
    assert (out / "checkpoints" / f"damaged_{TAG}").is_dir()  # kept aside for a look, never resumed
    assert (out / "checkpoints/latest").read_text() == TAG and (out / "checkpoints" / TAG / "COMPLETE").exists()
    assert_same_steps(read_metrics(out), read_metrics(straight_run[0]))


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB tmpfs (root only): too small for one 2-rank checkpoint of the tiny model (~48 MB)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def _resize(mnt: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_a_full_disk_stops_with_a_clear_error_and_the_previous_checkpoint_intact(straight_run, small_disk):
    out = small_disk / "run"
    # 1. The first save fails halfway (ENOSPC): named, nothing claims to be a checkpoint.
    proc = run_train("deepspeed", STRAIGHT + [f"output_dir={out}"])
    assert proc.returncode != 0
    text = _text(proc)
    assert f"could not write checkpoint {out}/checkpoints/step_00000005" in text, text[-3000:]
    assert "GB free there. checkpoints/latest still points at nothing yet" in text
    assert not (out / "checkpoints/latest").exists() and not _survivors(out)

    # 2. Room for one checkpoint: the rerun removes the partial one, starts afresh (there was no
    # checkpoint), saves step 5, and refuses step 10 before writing a byte of it.
    _resize(small_disk, "70m")
    proc = run_train("deepspeed", STRAIGHT + [f"output_dir={out}"])
    assert proc.returncode != 0
    text = _text(proc)
    assert f"removing {out}/checkpoints/step_00000005: a checkpoint save that did not finish" in text
    assert f"not enough space for checkpoint step_00000010 in {out}/checkpoints" in text, text[-3000:]
    assert "checkpoints/latest still points at step_00000005, which is intact" in text
    assert (out / "checkpoints/latest").read_text() == "step_00000005"
    assert not (out / "checkpoints/step_00000010").exists() and not _survivors(out)

    # 3. Space freed: the same command resumes from step 5 and ends as the straight run did.
    _resize(small_disk, "300m")
    rerun = run_train("deepspeed", STRAIGHT + [f"output_dir={out}"])
    check(rerun)
    assert f"resumed from {out}/checkpoints/step_00000005 at step 5" in _text(rerun)
    assert_same_steps(read_metrics(out), read_metrics(straight_run[0]))


NAN_RUN = QUICK + ["trainer.max_steps=6", "trainer.save_every_steps=0", "trainer.export_hf=false",
                   "eval.at_start=false"]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_a_nan_loss_stops_the_run_naming_the_step_and_the_rows(tmp_path):
    out = tmp_path / "run"
    proc = run_train("deepspeed", NAN_RUN + [f"output_dir={out}"], env={faults.NAN_LOSS: "3:1"})
    assert proc.returncode != 0 and not _survivors(out)
    text = _text(proc)
    assert "non-finite loss/gradient at step 3 (loss=nan, grad_norm=inf): rows with a non-finite loss: main:row " in text
    assert "(rank 1, micro-batch 0)" in text and "(rank 0," not in text
    assert "The update was skipped; the weights are those of step 2. Stopped, without saving" in text
    assert "trainer.on_nonfinite=skip would skip such steps" in text
    assert sorted(series(read_metrics(out), "train/loss")) == [1, 2]  # nothing logged past the bad step


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_skip_mode_counts_skipped_steps_and_stops_past_the_limit(tmp_path):
    out = tmp_path / "run"
    proc = run_train("deepspeed", NAN_RUN + ["trainer.on_nonfinite=skip", "trainer.max_skipped_steps=1",
                                             f"output_dir={out}"], env={faults.NAN_LOSS: "2:1,4:0"})
    assert proc.returncode != 0
    text = _text(proc)
    assert "non-finite loss/gradient at step 2" in text and "Skipped (1 of at most trainer.max_skipped_steps=1)" in text
    assert "OVERFLOW! Skipping step" in text  # DeepSpeed's own word that the update was dropped
    assert "2 steps skipped, more than trainer.max_skipped_steps=1" in text
    rows = read_metrics(out)
    assert series(rows, "train/skipped_steps") == {1: 0, 2: 1, 3: 1}
    loss = series(rows, "train/loss")
    assert loss[2] != loss[2] and loss[3] == loss[3]  # NaN logged at the skipped step, finite after it


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_resuming_on_another_world_size_stops_saying_how_to_go_on(straight_run, tmp_path):
    # 2 -> 1: the straight run's checkpoint under plain python.
    out = _copy_run(straight_run[0], tmp_path / "two", "hf")
    started = time.time()
    proc = run_train("python", STRAIGHT + [f"output_dir={out}"])
    assert proc.returncode != 0, _text(proc)[-3000:]
    assert time.time() - started < 120  # the issue asks for 60 s; measured ~20 s on 2 idle cores
    print(f"2 -> 1 rank: stopped {time.time() - started:.0f} s after the start")
    assert f"{out}/checkpoints/{TAG} was saved by 2 ranks and this run has 1" in _text(proc)
    assert series(read_metrics(out), "train/loss") == series(read_metrics(straight_run[0]), "train/loss")
    # ... and the way on that it names: the step as a Hugging Face model, made on one CPU process,
    # equal to the straight run's own final export of the same weights.
    command = f"python launch/export.py {out}/checkpoints/{TAG} <model dir>"
    assert command in _text(proc)
    exported = tmp_path / "exported"
    subprocess.run(command.replace("<model dir>", str(exported)).split(), cwd=ROOT, check=True, timeout=300,
                   capture_output=True)
    _same_logits(exported, straight_run[0] / "hf")

    # 1 -> 2: a one-rank checkpoint under deepspeed with 2 ranks.
    one = tmp_path / "one"
    check(run_train("python", QUICK + ["trainer.max_steps=1", "trainer.export_hf=false", "eval.at_start=false",
                                       f"output_dir={one}"]))
    started = time.time()
    proc = run_train("deepspeed", QUICK + ["trainer.max_steps=2", f"output_dir={one}"])
    assert proc.returncode != 0, _text(proc)[-3000:]
    assert time.time() - started < 120
    print(f"1 -> 2 ranks: stopped {time.time() - started:.0f} s after the start")
    assert f"{one}/checkpoints/step_00000001 was saved by 1 ranks and this run has 2" in _text(proc)
    assert not _survivors(one)


def _same_logits(a: Path, b: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tokens = torch.arange(5, 60)[None]
    with torch.no_grad():
        la, lb = (AutoModelForCausalLM.from_pretrained(p).eval()(input_ids=tokens).logits for p in (a, b))
    assert torch.allclose(la, lb, atol=1e-5), (la - lb).abs().max()


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_weights_given_and_a_checkpoint_resumed_in_one_run_warn(straight_run, tmp_path):
    out = _copy_run(straight_run[0], tmp_path / "run")
    proc = run_train("deepspeed", STRAIGHT + [f"output_dir={out}", f"model.name_or_path={straight_run[0]}/hf"])
    check(proc)
    assert (f"resuming at step 20: the weights come from the checkpoint, not from model.name_or_path="
            f"{straight_run[0]}/hf") in _text(proc)
