"""Distributed tier, in process: a stage grows through trainer/components.py without editing the loop.

On 2 real ZeRO-3 ranks, a Run built by trainer.build gets two things the loop has never heard of:
- a BatchSource that makes each step's rows from the current policy, as an online-RL stage would
  (here: the loader's rows, relabelled with the policy's own greedy next tokens, computed by a
  collective forward of the engine that trains), and
- a Component that records every hook and returns a penalty at the optimizer-step boundary.
trainer.loop.Trainer trains it unchanged: the hooks come in the documented order, the source makes
every step's batch, and the penalty is reduced over ranks and logged as reg/<name>_penalty.
"""

from __future__ import annotations

import json

import pytest
from inprocess import run_distributed

from helpers import QUICK

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

STEPS = 3


def _grow_a_stage(rank, world, out_dir):
    import torch

    from data_pipeline.packing import IGNORE
    from trainer.build import build
    from trainer.cli import load_config
    from trainer.components import Component
    from trainer.loop import Trainer

    class OwnPredictions:
        """Each step's rows, labelled by the policy's greedy predictions (the rows the loader gives)."""

        def __init__(self, loader, engine) -> None:
            self.loader, self.engine, self.made = loader, engine, []
            self.rows_per_step = loader.rows_per_step

        def micro_batches(self, step):
            batches = self.loader.micro_batches(step)
            for b in batches:
                with torch.no_grad():  # collective under ZeRO-3: every rank makes the same forwards
                    out = self.engine(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
                own = out.logits.argmax(-1)[:, :-1]
                supervised = b["labels"][:, 1:] != IGNORE
                b["labels"][:, 1:] = torch.where(supervised, own, torch.full_like(own, IGNORE))
            self.made.append(step)
            return batches

        def rows(self, step):
            return self.loader.rows(step)

    class Recorder(Component):
        name = "probe"

        def __init__(self) -> None:
            self.calls = []

        def on_start(self, state, tracker):
            self.calls.append(["on_start", state.step])

        def pre_step(self, state):
            self.calls.append(["pre_step", state.step])

        def before_optimizer_step(self):
            self.calls.append(["before_optimizer_step"])
            return 0.25 * (rank + 1)  # this rank's part: 0.25 + 0.5 over 2 ranks

        def after_step(self, state, tracker, last):
            self.calls.append(["after_step", state.step, last])

        def on_end(self, state, tracker):
            self.calls.append(["on_end", state.step])

    cfg = load_config(
        QUICK
        + [
            f"trainer.max_steps={STEPS}",
            "trainer.micro_batch_size=2",
            "trainer.grad_accum_steps=1",
            "trainer.cadence.save_every_steps=0",
            "trainer.export_hf=false",
            "eval.at_start=false",
            f"output_dir={out_dir}",
        ]
    )
    run = build(cfg)
    recorder = Recorder()
    run.batches = OwnPredictions(run.batches, run.engine)
    run.components.insert(0, recorder)
    outcome = Trainer(run).run()
    run.close()
    return {"outcome": outcome.value, "calls": recorder.calls, "made": run.batches.made}


def test_a_stage_supplies_its_own_batches_and_a_component_without_editing_the_loop(tmp_path):
    ranks = run_distributed(_grow_a_stage, 2, str(tmp_path))
    expected = [["on_start", 0]]
    for step in range(STEPS):
        expected += [["pre_step", step], ["before_optimizer_step"], ["after_step", step + 1, step + 1 == STEPS]]
    expected += [["on_end", STEPS]]
    for got in ranks:
        assert got["outcome"] == "done"
        assert got["calls"] == expected
        assert got["made"] == list(range(STEPS))  # every step's batch came from the stage's source
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    penalties = [r["reg/probe_penalty"] for r in rows if "reg/probe_penalty" in r]
    assert penalties == [pytest.approx(0.75)] * STEPS  # reduced over both ranks, logged every step
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == STEPS and all(loss == loss for loss in losses)  # finite: trained on the made rows
