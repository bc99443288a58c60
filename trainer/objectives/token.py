"""Token-exact loss normalisation.

The loss of an optimizer step is the mean over every supervised token in that step: all
micro-batches, all ranks. Averaging per micro-batch (the common shortcut) weights a token in a
short-answer batch more than one in a long-answer batch, and makes the gradient depend on how the
batch is split. Here each micro-batch contributes sum(token losses) / N_step, where N_step is
counted before the first backward, so bsz 8 x accum 1, bsz 1 x accum 8 and 2 ranks x bsz 4 give
the same gradient.

DeepSpeed averages gradients over ranks (divides by world size), so the per-rank loss handed to
backward is multiplied by world size to undo that:

    sum over ranks r of  world * S_r / N_step  / world  =  (sum_r S_r) / N_step
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.packing import IGNORE


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions (labels shifted left by one)."""
    return row_loss_sums(logits, labels).sum()


def row_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sums of next-token cross-entropy over supervised positions, shape [batch]."""
    return token_nll_from_logits(logits, labels).sum(1)


def token_nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every position, [batch, seq - 1] (0 where the label is IGNORE):
    position t's logits against label t + 1. trainer/objectives/chunked.py computes the same without the logits."""
    logits = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(logits.device)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return losses.view(targets.shape)


def supervised_tokens(labels: torch.Tensor) -> int:
    """Positions that contribute to token_loss_sum."""
    return int((labels[:, 1:] != IGNORE).sum())


def backward_scale(step_tokens: int, world_size: int) -> float:
    """Factor turning a rank's token_loss_sum into its share of the step's mean loss, given that
    DeepSpeed averages gradients over `world_size` ranks."""
    return world_size / max(step_tokens, 1)


@torch.no_grad()
def sampled_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`labels` with each supervised next token replaced by one drawn from the model's own prediction
    there, softmax(logits) (positions that take no loss stay IGNORE). The squared gradient of the loss
    on these labels estimates the Fisher of the model's predictive distribution; each position's draw
    is independent, so the cross terms between positions vanish in expectation (EWC's
    regularizer.ewc.fisher_labels=sampled)."""
    out = labels.clone()
    targets = labels[:, 1:].to(logits.device)
    where = targets != IGNORE
    if bool(where.any()):
        probs = torch.softmax(logits[:, :-1][where].float(), dim=-1)
        draws = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        shifted = targets.clone()
        shifted[where] = draws
        out[:, 1:] = shifted.to(out.device)
    return out


class TokenLoss:
    """The next-token loss of pretrain / sft / instruct stages, in the interface train_step and
    evaluation share with trainer/objectives/preference.py's PreferenceLoss: `count` (the step's normaliser,
    here supervised tokens), `row_units` (that count per row) and `rows` (from the per-token losses
    [batch, seq - 1] of trainer/objectives/head.py: per-row loss sums, and per-row metric sums: none here)."""

    unit = "tokens"
    stats = ()
    needs_reference = False
    uniform = True
    """Every token's loss has the same weight in the step (trainer/objectives/chunked.py may use it)."""

    def count(self, batch) -> int:
        return supervised_tokens(batch["labels"])

    def row_units(self, batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE).sum(1).double()

    def rows(self, nll: torch.Tensor, batch):
        return nll.sum(1), None
