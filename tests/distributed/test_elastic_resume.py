"""Elastic resume through the real entry point: a run of 2 ranks resumed on 1, and that one resumed on
2 again, with packing, replay and EWC on (regularizer=ewc_replay), the global batch kept by deriving
the gradient accumulation. The exactness of the reshard itself (weights, moments, steps, EWC state)
is checked bit for bit in test_reshard_ranks.py; here, what a user sees: the same command on another
number of ranks goes on where the checkpoint stopped, and trains as the uninterrupted run does.

Tolerance: 1e-4 relative on the per-step loss and gradient norm, over 20 and 10 steps. The rows, the
weights, Adam's state and the schedule are those of the uninterrupted run, but 1 rank accumulates
the step's gradients in another order than 2 ranks reduce them, so the float32 sums differ in the
last bits and the difference grows slowly through the steps (measured on 2 CPU ranks: at most 2.5e-6,
printed with -s). The token
counts and the learning rate depend only on the rows and the step: equal exactly.
"""

from __future__ import annotations

import shutil
import sys

import pytest

from helpers import LAUNCHER, QUICK, ROOT, check, read_metrics, run_train, series

sys.path.insert(0, str(ROOT / "bench"))
import reshard as reshard_bench  # noqa: E402  (bench/reshard.py)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

RUN = QUICK + [
    "regularizer=ewc_replay",
    "regularizer.ewc.fisher_batches=2",
    "trainer.max_steps=30",
    "trainer.micro_batch_size=2",
    "trainer.cadence.save_every_steps=10",
    "trainer.cadence.keep_last=3",
    "trainer.cadence.eval_every_steps=0",
    "trainer.export_hf=false",
]
TOLERANCE = 1e-4
MEASURED = {}  # filled by the test, printed for the record


def _assert_continues(rows, ref_rows, first: int, last: int, what: str) -> None:
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, last + 1)), f"{what}: metrics.jsonl has a gap or a duplicate step"
    for key in ("train/tokens_seen", "train/supervised_tokens_seen", "train/lr", "data/packing_efficiency"):
        ours, ref = series(rows, key), series(ref_rows, key)
        assert all(ours[s] == ref[s] for s in range(1, last + 1)), (what, key)
    worst = 0.0
    for key in ("train/loss", "train/grad_norm", "reg/ewc_penalty"):
        ours, ref = series(rows, key), series(ref_rows, key)
        assert sorted(ours) == list(range(1, last + 1)), (what, key)
        for s in range(1, first):
            assert ours[s] == ref[s], (what, key, s)  # before the resume: the copied lines
        for s in range(first, last + 1):
            gap = abs(ours[s] - ref[s]) / max(abs(ref[s]), 1e-12)
            worst = max(worst, gap)
            assert gap <= TOLERANCE, (what, key, s, ours[s], ref[s])
    MEASURED[what] = worst


def test_the_same_command_on_another_number_of_ranks_goes_on_where_the_checkpoint_stopped(tmp_path):
    two = tmp_path / "two"
    # 2 ranks x micro 2 x accumulation 1: 4 rows a step; W&B offline (its run must go on after the reshard).
    check(run_train(LAUNCHER, RUN + [f"output_dir={two}", "logger=wandb"]))
    ref = read_metrics(two)

    # 2 -> 1: the run's checkpoint at step 10 under plain python; the accumulation is derived (2).
    one = tmp_path / "one"
    shutil.copytree(two, one)
    for tag in ("step_00000020", "step_00000030"):
        shutil.rmtree(one / "checkpoints" / tag)
    (one / "checkpoints/latest").write_text("step_00000010")
    proc = run_train("python", RUN + [f"output_dir={one}", "logger=wandb"])
    check(proc)
    log = proc.stdout + proc.stderr
    assert "reshard: step_00000010 from 2 to 1 ranks in" in log
    # bench/reshard.py reads its figures from these lines: they must keep the shape it parses.
    assert reshard_bench.RESHARDED.search(log).group(1, 2, 3) == ("step_00000010", "2", "1")
    assert reshard_bench.CONVERTED.search(log).group(1) == "step_00000010"
    assert (
        "resuming a checkpoint of 2 ranks x micro 2 x accumulation 1 = 4 rows a step on 1 ranks: micro 2 x "
        "accumulation 2 x 1 ranks = 4 rows a step" in log
    )
    assert "EWC: Fisher from" not in log  # the Fisher and anchor came from the checkpoint, resharded
    _assert_continues(read_metrics(one), ref, 11, 30, "2 -> 1")
    assert (one / "checkpoints/universal/step_00000010/COMPLETE").is_file()
    # W&B continued the same run: one offline directory per start, one run id.
    segments = sorted(p.name for p in (one / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and len({s.rsplit("-", 1)[1] for s in segments}) == 1, segments

    # 1 -> 2: the one-rank run's own checkpoint at step 20 under 2 ranks again (accumulation 1).
    back = tmp_path / "back"
    shutil.copytree(one, back, ignore=shutil.ignore_patterns("wandb"))
    shutil.rmtree(back / "checkpoints/step_00000030")
    (back / "checkpoints/latest").write_text("step_00000020")
    proc = run_train(LAUNCHER, RUN + [f"output_dir={back}", "trainer.cadence.keep_last=2"])
    check(proc)
    assert "reshard: step_00000020 from 1 to 2 ranks in" in proc.stdout + proc.stderr
    _assert_continues(read_metrics(back), read_metrics(one), 21, 30, "1 -> 2")
    # A conversion goes when its checkpoint goes (keep_last=2: the save at 30 pruned step 10 and its conversion).
    assert sorted(p.name for p in (back / "checkpoints").glob("step_*")) == ["step_00000020", "step_00000030"]
    assert sorted(p.name for p in (back / "checkpoints/universal").iterdir()) == ["step_00000020"]
    print(f"largest relative gap to the uninterrupted run: {MEASURED}")

    # A fixed accumulation that cannot keep the global batch stops at once, naming what would.
    proc = run_train("python", RUN + [f"output_dir={back}", "trainer.grad_accum_steps=3", "trainer.max_steps=40"])
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert (
        "the checkpoint to resume was trained with a global batch of 2 ranks x micro 2 x accumulation 1 = 4 rows "
        "a step, and this run asks for trainer.micro_batch_size=2 x trainer.grad_accum_steps=3 x 1 ranks = 6"
    ) in message
    assert "trainer.micro_batch_size=2 trainer.grad_accum_steps=2" in message
    assert "trainer.resume.allow_new_global_batch=true" in message
