"""Held-out evaluation: token-weighted loss and perplexity per named set, the forgetting metrics, and
the cadence at which a run evaluates (Evaluation: step 0, every eval_every_steps, the last step).

Under ZeRO-3 every forward is collective (parameters are gathered layer by layer), so every rank
runs the same number of forwards; a rank with no rows left runs a fully masked row that adds
nothing to the sums.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, Optional

import torch

from data_pipeline.loader import trim_to_longest
from data_pipeline.packing import IGNORE
from data_pipeline.prepare import Prepared
from trainer import distributed
from trainer.components import Component
from trainer.objectives import head
from trainer.objectives.preference import PreferenceLoss
from trainer.objectives.token import supervised_tokens

log = logging.getLogger("trainer")


@torch.no_grad()
def evaluate(
    engine,
    sets: Dict[str, Prepared],
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    pad_to_multiple_of: Optional[int] = None,
    preference: Optional[PreferenceLoss] = None,
) -> Dict[str, float]:
    """Mean token loss (and perplexity) of each held-out set, over all ranks. pad_to_multiple_of:
    unpacked rows are cut to the longest of each micro-batch (data_pipeline.loader.trim_to_longest).
    A set of preference pairs (in a dpo stage, scored by `preference`) reports the mean pair loss and
    the pair metrics instead: eval/<set>/loss, eval/<set>/rewards/accuracies, ..."""
    metrics: Dict[str, float] = {}
    was_training = engine.module.training
    engine.eval()
    for name, data in sets.items():
        if data.is_preference and preference is not None:
            metrics.update(_evaluate_pairs(engine, name, data, micro_batch_size, rank, world_size, device, preference))
            continue
        per_round = micro_batch_size * world_size
        rounds = math.ceil(len(data) / per_round)
        sums = torch.zeros(2, dtype=torch.float64)
        for r in range(rounds):
            idx = [
                i
                for i in range(r * per_round + rank * micro_batch_size, r * per_round + (rank + 1) * micro_batch_size)
                if i < len(data)
            ]
            real = bool(idx)
            idx = idx or [0]
            rows = data.rows(idx)
            if pad_to_multiple_of:
                rows = trim_to_longest(rows, data.filled[idx], pad_to_multiple_of)
            labels = torch.from_numpy(rows["labels"])
            if not real:
                labels = torch.full_like(labels, IGNORE)
            batch = {
                "input_ids": torch.from_numpy(rows["input_ids"]),
                "labels": labels,
                "position_ids": torch.from_numpy(rows["position_ids"]),
            }
            sums[0] += head.score(engine, batch, device).double().sum().cpu()
            sums[1] += supervised_tokens(labels)
        distributed.all_reduce_sum(sums)
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        metrics[f"eval/{name}/loss"] = loss
        metrics[f"eval/{name}/ppl"] = math.exp(min(loss, 50.0))
    if was_training:
        engine.train()
    return metrics


def _evaluate_pairs(
    engine,
    name: str,
    data: Prepared,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    preference: PreferenceLoss,
) -> Dict[str, float]:
    per_round = micro_batch_size * world_size
    sums = torch.zeros(2 + len(preference.stats), dtype=torch.float64)  # loss, pairs, then the metrics
    for r in range(math.ceil(len(data) / per_round)):
        first = r * per_round + rank * micro_batch_size
        idx = [i for i in range(first, first + micro_batch_size) if i < len(data)]
        batch = {k: torch.from_numpy(v) for k, v in data.rows(idx or [0]).items()}
        if not idx:  # a rank without rows: a fully masked row, no pairs
            batch["labels"] = torch.full_like(batch["labels"], IGNORE)
        rows, row_stats = preference.rows(head.score(engine, batch, device), batch)
        sums[0] += rows.double().sum().cpu()
        sums[1] += preference.count(batch)
        sums[2:] += row_stats.double().sum(0).cpu()
    distributed.all_reduce_sum(sums)
    pairs = max(sums[1].item(), 1.0)
    out = {f"eval/{name}/loss": sums[0].item() / pairs, f"eval/{name}/pairs": sums[1].item()}
    out.update({f"eval/{name}/{k}": v / pairs for k, v in zip(preference.stats, sums[2:].tolist())})
    return out


def forgetting_metrics(scores: Dict[str, float], baseline: Dict[str, float]) -> Dict[str, float]:
    """eval/forgetting = general-set loss now minus at step 0 (> 0: the model forgot);
    eval/domain_gain = domain-set loss at step 0 minus now (> 0: the model learned the domain)."""
    out = {}
    for key, name, sign in (
        ("eval/general/loss", "eval/forgetting", 1.0),
        ("eval/domain/loss", "eval/domain_gain", -1.0),
    ):
        if key in scores and key in baseline:
            out[name] = sign * (scores[key] - baseline[key])
    return out


def general_baseline(earlier_output_dir: Optional[str]) -> Dict[str, float]:
    """The general-set step-0 eval of an earlier stage (its final trainer_state.json), or nothing."""
    if not earlier_output_dir:
        return {}
    ckpt = Path(earlier_output_dir) / "checkpoints"
    state = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "trainer_state.json").read_text())
    return {k: v for k, v in state.get("baseline", {}).items() if k.startswith("eval/general/")}


class Evaluation(Component):
    """A run's evaluations: the base model at step 0 (the reference for eval/forgetting and
    eval/domain_gain), every `every_steps` steps and at the last step; each one scores every
    held-out set and generates the sample prompts. Collective: every rank calls at the same steps."""

    def __init__(
        self,
        engine,
        sets: Dict[str, Prepared],
        micro_batch_size: int,
        every_steps: int,
        at_start: bool,
        baseline_from: Optional[str],
        generator,
        rank: int,
        world_size: int,
        device: torch.device,
        pad_to_multiple_of: Optional[int],
        preference: Optional[PreferenceLoss] = None,
    ) -> None:
        self.engine, self.sets, self.generator, self.preference = engine, sets, generator, preference
        self.micro_batch_size, self.every_steps, self.at_start = micro_batch_size, every_steps, at_start
        self.baseline_from = baseline_from
        self.rank, self.world_size, self.device, self.pad = rank, world_size, device, pad_to_multiple_of

    def scores(self) -> Dict[str, float]:
        """Every held-out set's loss and perplexity now. Collective."""
        return evaluate(
            self.engine,
            self.sets,
            self.micro_batch_size,
            self.rank,
            self.world_size,
            self.device,
            self.pad,
            self.preference,
        )

    def on_start(self, state, tracker) -> None:
        """Step 0: score the model as it starts and keep that as state.baseline. In a recipe,
        forgetting is measured against the first stage's base model (baseline_from)."""
        if state.step != 0 or not self.sets or not self.at_start:
            return
        scores = self.scores()
        state.baseline = {**scores, **general_baseline(self.baseline_from)}
        tracker.log(0, scores)
        tracker.log_samples(0, self.generator.generate(self.engine))
        log.info("eval of the base model: %s", {k: round(v, 4) for k, v in scores.items()})

    def after_step(self, state, tracker, last: bool) -> None:
        """At the cadence: every held-out set, forgetting against state.baseline, the samples."""
        if not self.sets or not (last or (self.every_steps and state.step % self.every_steps == 0)):
            return
        scores = self.scores()
        scores.update(forgetting_metrics(scores, state.baseline))
        tracker.log(state.step, scores)
        tracker.log_samples(state.step, self.generator.generate(self.engine))
        log.info("eval at step %d: %s", state.step, {k: round(v, 4) for k, v in scores.items()})
