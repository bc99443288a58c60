"""What a stage minimises. `token` (the mean token loss of pretrain/sft/instruct) and `preference`
(DPO/IPO/SimPO on pairs) are objectives; `head` turns a batch into per-token losses through the LM
head (`chunked`: a chunk of tokens at a time); `reference` computes a preference stage's reference
log-probs once. The loop sees one `Objective`, made by `build_objective`."""

from __future__ import annotations

from typing import Dict, Optional, Protocol, Sequence, Tuple

import torch


class Objective(Protocol):
    """A step's loss as train_step and evaluation use it. The step's loss is the mean over every
    unit (a supervised token, a preference pair) of the step on every rank: `count` is this rank's
    part of the normaliser, counted before the first backward, so any split of the step over
    micro-batches, accumulation and ranks gives the same gradient."""

    unit: str
    """What the loss is a mean over: "tokens" or "pairs" (for the log)."""
    stats: Sequence[str]
    """Names of the per-unit metrics `rows` sums (TRL's rewards/*, logps/* for pairs; none for tokens)."""
    uniform: bool
    """Every token's loss has the same weight in the step: the chunked head may take its gradients in
    forward (trainer/objectives/chunked.py)."""
    needs_reference: bool
    """Batches carry a reference model's log-probs (trainer/objectives/reference.py)."""

    def count(self, batch: Dict[str, torch.Tensor]) -> int:
        """This micro-batch's units."""

    def row_units(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Units per row [batch], float64 (per-source losses)."""

    def rows(self, nll: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """From the per-token losses [batch, seq - 1]: per-row loss sums [batch] and per-row sums of
        `stats` [batch, len(stats)] (None without stats)."""


def build_objective(stage) -> Objective:
    """The objective of a stage config (trainer.config.StageConfig): a preference loss for
    stage=dpo, the token loss for every other stage."""
    from data_pipeline.choices import StageObjective
    from trainer.objectives.preference import PreferenceLoss
    from trainer.objectives.token import TokenLoss

    if stage.objective == StageObjective.dpo:
        return PreferenceLoss(stage.loss, stage.beta, stage.label_smoothing, stage.simpo_gamma)
    return TokenLoss()
