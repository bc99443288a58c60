"""Distributed tier: a DPO stage under real DeepSpeed ZeRO-3 on 2 CPU ranks. The reference
log-probs are computed once by the training engine and reused by a resume, a rerun and another
world size (a changed start computes its own); a run killed inside a checkpoint save resumes and
reproduces the straight run step for step; 1 rank x micro 8 and 2 ranks x micro 2 x accumulation 2
give the same first step (the loss is the mean over the step's pairs); held-out reward accuracy
rises above chance; EWC works in the stage."""

from __future__ import annotations

import re

import pytest

from helpers import check, read_metrics, run_train, series
from wandb_records import offline_runs

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

# 8 rows a step (86 packed rows of 125 bundled pairs: about an epoch in 10 steps), checkpoints at 5
# and 10, held-out pairs and general text evaluated at 0, 5 and 10, EWC against the start.
DPO = [
    "stage=dpo",
    "data=medical_prefs",
    "+eval.sets.prefs=${bundled:medical_prefs_heldout.jsonl}",
    "+eval.sets.general=${bundled:general_text_heldout.txt}",
    "regularizer=ewc",
    "regularizer.ewc.fisher_batches=2",
    "logger.dashboard=false",
    "eval.sample_prompts=[]",
    "trainer.cadence.log_every_steps=1",
    "trainer.schedule.warmup_steps=2",
    "trainer.optim.lr=5e-4",
    "trainer.max_steps=10",
    "trainer.micro_batch_size=2",
    "trainer.grad_accum_steps=2",
    "trainer.cadence.save_every_steps=5",
    "trainer.cadence.eval_every_steps=5",
]
SCORED = re.compile(r"reference log-probs of (\S+): \d+ pairs scored once .*\(start (\w+)\)")
REUSED = re.compile(r"reference log-probs of (\S+): reused \(\d+ rows, start (\w+)\)")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    # its own cache: the first run of the session computes the reference, whatever ran before
    proc = run_train(
        "torchrun", DPO + ["logger=wandb", f"output_dir={out}", f"data.cache_dir={out.parent / 'dpo_cache'}"]
    )
    check(proc)
    return out, proc


def _cache(out) -> str:
    return f"data.cache_dir={out.parent / 'dpo_cache'}"


def test_dpo_trains_reports_trls_metrics_and_held_out_accuracy_rises(dpo_run):
    out, proc = dpo_run
    log = proc.stdout + proc.stderr
    assert {m.group(1) for m in SCORED.finditer(log)} == {"main", "eval/prefs"} and not REUSED.search(log)
    rows = read_metrics(out)
    assert sorted(series(rows, "train/loss")) == list(range(1, 11))
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "reg/ewc_penalty",
        "data/packing_efficiency",
    ):
        assert len(series(rows, key)) == 10, key
    accuracy = series(rows, "eval/prefs/rewards/accuracies")
    assert sorted(accuracy) == [0, 5, 10] and accuracy[0] == 0.0 and accuracy[10] > 0.5, accuracy
    loss = series(rows, "eval/prefs/loss")
    assert loss[0] == pytest.approx(0.693147, abs=1e-5) and loss[10] < loss[0]  # log 2 at the start: policy = reference
    margins = series(rows, "eval/prefs/rewards/margins")
    assert margins[10] > margins[0] == 0.0
    assert "eval/general/loss" in rows[0] and "eval/forgetting" in rows[-1]
    assert (out / "hf" / "model.safetensors").is_file()
    # the same names in the W&B run (offline, read from its records), at the trainer's steps
    (run,) = offline_runs(out)
    assert run.runs[0].job_type == "dpo"
    steps = lambda key: [int(h["trainer/step"]) for h in run.history if key in h]  # noqa: E731
    assert steps("rewards/accuracies") == steps("logps/rejected") == list(range(1, 11))
    assert steps("eval/prefs/rewards/margins") == [0, 5, 10]


def test_a_kill_inside_a_save_resumes_and_reproduces_the_straight_run(dpo_run, tmp_path):
    """Rank 1 dies inside the step-10 save: the run fails, step 5 stays the latest complete checkpoint,
    and the same command resumes from it (reusing the reference) with the straight run's numbers."""
    out = tmp_path / "killed"
    args = DPO + ["logger=jsonl", f"output_dir={out}", _cache(dpo_run[0])]
    killed = run_train("torchrun", args, env={"FULLFT_FAULT_KILL_IN_SAVE": "10:1"})
    assert killed.returncode != 0
    assert (out / "checkpoints" / "latest").read_text() == "step_00000005"
    resumed = run_train("torchrun", args)
    check(resumed)
    log = killed.stdout + killed.stderr + resumed.stdout + resumed.stderr
    assert not SCORED.search(log), "the reference was computed again"
    assert {m.group(1) for m in REUSED.finditer(resumed.stdout + resumed.stderr)} == {"main", "eval/prefs"}
    ours, ref = read_metrics(out), read_metrics(dpo_run[0])
    assert [r["step"] for r in ours if "train/loss" in r] == list(range(1, 11))
    for key in (
        "train/loss",
        "train/grad_norm",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "reg/ewc_penalty",
        "eval/prefs/rewards/accuracies",
    ):
        assert series(ours, key) == series(ref, key), key


def test_one_rank_takes_the_same_first_step_and_another_start_scores_its_own_reference(dpo_run, tmp_path):
    """1 rank x micro 8 reads the same 8 rows in step 1 as 2 ranks x micro 2 x accumulation 2 and reuses
    the reference (same start); its loss and gradient norm agree (the mean over the step's pairs). Another
    seed is another random start: its reference is scored anew."""
    one = run_train(
        "python",
        DPO
        + [
            "logger=jsonl",
            f"output_dir={tmp_path / 'one'}",
            _cache(dpo_run[0]),
            "trainer.max_steps=1",
            "trainer.micro_batch_size=8",
            "trainer.grad_accum_steps=1",
            "trainer.export_hf=false",
            "~eval.sets.general",
            "regularizer=none",
        ],
    )
    check(one)
    assert REUSED.search(one.stdout + one.stderr) and not SCORED.search(one.stdout + one.stderr)
    straight = read_metrics(dpo_run[0])
    ours = read_metrics(tmp_path / "one")
    # step 1's EWC penalty is 0 (the weights are the anchor) and its gradient is 0: no EWC is the same step
    for key in ("train/loss", "train/grad_norm", "rewards/margins"):
        a, b = series(ours, key)[1], series(straight, key)[1]
        assert abs(a - b) <= 1e-4 * max(abs(b), 1e-6), (key, a, b)
    other = run_train(
        "python",
        DPO
        + [
            "logger=jsonl",
            f"output_dir={tmp_path / 'other'}",
            _cache(dpo_run[0]),
            "trainer.max_steps=1",
            "trainer.seed=7",
            "trainer.micro_batch_size=8",
            "trainer.grad_accum_steps=1",
            "trainer.export_hf=false",
            "~eval.sets.general",
            "regularizer=none",
            "trainer.cadence.eval_every_steps=0",
            "eval.at_start=false",
        ],
    )
    check(other)
    starts = {m.group(2) for m in SCORED.finditer(other.stdout + other.stderr)}
    first = {m.group(2) for m in SCORED.finditer(dpo_run[1].stdout + dpo_run[1].stderr)}
    assert len(starts) == 1 and starts != first
