"""A DPO stage on the real model (the depth-reduced SmolLM2 copy: its real embeddings, tokenizer and
ChatML template) on 2 ranks of real DeepSpeed ZeRO-3: the bundled medical pairs go through the real
chat template, the reference log-probs are scored once by the training engine, and held-out reward
accuracy rises above chance while the held-out pair loss falls below log 2."""

from __future__ import annotations

import math

import pytest

from helpers import LAUNCHER, check, read_metrics, run_train, series

pytestmark = [pytest.mark.real_model, pytest.mark.distributed, pytest.mark.timeout(900)]

STEPS = 6


def test_dpo_on_the_real_model_raises_held_out_reward_accuracy(reduced_dir, tmp_path):
    overrides = [
        "stage=dpo",
        "data=medical_prefs",
        f"model.name_or_path={reduced_dir}",
        "+eval.sets.prefs=${bundled:medical_prefs_heldout.jsonl}",
        "logger=jsonl",
        "logger.dashboard=false",
        "eval.sample_prompts=[]",
        "data.seq_len=512",
        "trainer.micro_batch_size=2",
        "trainer.grad_accum_steps=1",
        f"trainer.max_steps={STEPS}",
        "trainer.schedule.warmup_steps=1",
        "trainer.optim.lr=2e-5",
        "trainer.cadence.log_every_steps=1",
        "trainer.cadence.save_every_steps=0",
        f"trainer.cadence.eval_every_steps={STEPS}",
        "eval.micro_batch_size=4",
        f"output_dir={tmp_path}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]  # its own: the reference is scored here
    proc = run_train(LAUNCHER, overrides, timeout=800)
    check(proc)
    log = proc.stdout + proc.stderr
    assert "reference log-probs of main: 125 pairs scored once" in log
    rows = read_metrics(tmp_path)
    accuracy, loss = series(rows, "eval/prefs/rewards/accuracies"), series(rows, "eval/prefs/loss")
    assert sorted(accuracy) == [0, STEPS] and accuracy[STEPS] > 0.5, accuracy
    assert loss[0] == pytest.approx(math.log(2), abs=1e-5) and loss[STEPS] < loss[0], loss
    assert series(rows, "eval/prefs/rewards/margins")[STEPS] > 0
    assert len(series(rows, "rewards/accuracies")) == STEPS
