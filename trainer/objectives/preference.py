"""The preference losses of a DPO stage (`stage=dpo`, `stage.loss=dpo|ipo|simpo`), on packed rows.

Pure math on plain tensors (no deepspeed, no torch.distributed). A row holds whole pairs as
documents (data_pipeline/preference.py): pair k = document 2k (prompt + chosen) and 2k+1 (prompt +
rejected). A document's log-prob is the sum of its completion tokens' log-probs; the loss of a pair
compares the policy's log-probs with the reference model's, computed once before training
(trainer/objectives/reference.py), so no second model is ever in memory.

With h the difference of the chosen and rejected log-ratios, log π(y|x) − log π_ref(y|x):

    dpo    −(1−ε)·log σ(β·h) − ε·log σ(−β·h)                     (Rafailov et al. 2023; ε = label smoothing)
    ipo    (h' − 1/(2β))²   h' with each log-ratio divided by its completion's tokens   (Azar et al. 2023)
    simpo  −(1−ε)·log σ(β·(m_c − m_r) − γ) − ε·log σ(−(β·(m_c − m_r) − γ))   m = mean token log-prob, no
           reference                                                         (Meng et al. 2024; γ = simpo_gamma)

as TRL computes them (DPOTrainer for dpo and ipo, CPOTrainer's loss_type=simpo), so a user's β
carries over; tests/unit/trainer/test_preference_trl.py checks the parity with TRL itself. One
difference: with ε > 0 ours is conservative DPO (Mitchell 2023; TRL 0.x's sigmoid loss), while TRL
1.16's "sigmoid" ignores label_smoothing; the test matches it to TRL's sigmoid + robust terms.

Metrics carry TRL's names: rewards/chosen = β·(chosen log-ratio) (β·mean log-prob for simpo),
rewards/rejected likewise, rewards/margins their difference, rewards/accuracies the fraction of pairs
whose chosen reward is higher, logps/chosen and logps/rejected the policy's log-probs (summed; mean
per token for simpo).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from data_pipeline.packing import IGNORE
from trainer.objectives.token import token_nll_from_logits

STATS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
"""Per-pair metrics, summed over pairs by `PreferenceLoss.rows` and divided by the pair count for a log line."""


def document_logps(
    logits: torch.Tensor, labels: torch.Tensor, document: torch.Tensor, documents: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row and document: the sum of the supervised tokens' log-probs, and their count; both
    [batch, documents]. Position t's logits predict token t+1, which belongs to document[t+1]
    (a document's first token is never supervised, so t is in the same document).

        document [0 0 0 1 1 -1], labels [- c c - r -]: column 0 sums log p(c) at t = 0, 1 (predicting
        tokens 1, 2); column 1 sums log p(r) at t = 3.
    """
    return document_sums(-token_nll_from_logits(logits, labels), labels, document, documents)


def document_sums(
    token_logp: torch.Tensor, labels: torch.Tensor, document: torch.Tensor, documents: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """document_logps from the per-token log-probs [batch, seq - 1] (0 where the label is IGNORE), as
    trainer/objectives/head.py's `score` gives them negated."""
    targets = labels[:, 1:].to(token_logp.device)
    where = document[:, 1:].to(token_logp.device).clamp(min=0)
    mask = (targets != IGNORE).to(token_logp.dtype)
    sums = token_logp.new_zeros(token_logp.size(0), documents).scatter_add(1, where, token_logp)
    counts = token_logp.new_zeros(token_logp.size(0), documents).scatter_add(1, where, mask)
    return sums, counts


def pair_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: Optional[torch.Tensor],
    ref_rejected: Optional[torch.Tensor],
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    loss: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Each pair's loss and its metrics (STATS, unreduced), from the policy's summed log-probs of the
    chosen and rejected completions, the reference's (None for simpo) and the completions' token counts."""
    eps = label_smoothing
    if loss == "simpo":
        chosen_lp = chosen / chosen_tokens.clamp(min=1)
        rejected_lp = rejected / rejected_tokens.clamp(min=1)
        chosen_reward, rejected_reward = beta * chosen_lp, beta * rejected_lp
        z = beta * (chosen_lp - rejected_lp - simpo_gamma / beta)
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    else:
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
        chosen_lp, rejected_lp = chosen, rejected
        if loss == "dpo":
            z = beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        elif loss == "ipo":
            h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            losses = (h - 1 / (2 * beta)) ** 2
        else:
            raise ValueError(f"stage.loss={loss!r}: use dpo, ipo or simpo")
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    stats = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).to(chosen_reward.dtype),
        "logps/chosen": chosen_lp.detach(),
        "logps/rejected": rejected_lp.detach(),
    }
    return losses, stats


def pairs_per_row(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The pairs in each row: documents with supervised tokens, halved (a fully masked row has none)."""
    _, present = _documents_present(batch)
    return present[:, 0::2].sum(1)


def _documents_present(batch: Dict[str, torch.Tensor]) -> Tuple[int, torch.Tensor]:
    document = batch["document"]
    documents = int(document.max()) + 1 if document.numel() else 0
    documents += documents % 2
    if "reference" in batch:
        documents = max(documents, batch["reference"].shape[1])
    supervised = (batch["labels"][:, 1:] != IGNORE).double()
    present = (
        torch.zeros(document.size(0), documents, dtype=torch.float64).scatter_add(
            1, document[:, 1:].clamp(min=0), supervised
        )
        > 0
    )
    return documents, present


class PreferenceLoss:
    """A DPO stage's loss for train_step and evaluation: the step's loss is the mean over every
    pair of the step on every rank (counted before the first backward, like the token-exact loss of
    trainer/objectives/token.py), so 8 pairs x 1, 1 x 8 accumulation and 2 ranks x 4 give the same gradient."""

    unit = "pairs"
    stats = STATS
    uniform = False  # a token's weight depends on its pair's margin

    def __init__(self, loss: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> None:
        self.loss, self.beta, self.label_smoothing, self.simpo_gamma = str(loss), beta, label_smoothing, simpo_gamma

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"

    def count(self, batch: Dict[str, torch.Tensor]) -> int:
        return int(pairs_per_row(batch).sum())

    def row_units(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return pairs_per_row(batch).double()

    def rows(self, nll: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per row: the sum of its pairs' losses [batch], and of their metrics [batch, len(STATS)], from
        the per-token losses [batch, seq - 1] (trainer/objectives/head.py)."""
        documents, present = _documents_present(batch)
        sums, counts = document_sums(-nll, batch["labels"], batch["document"], documents)
        ref = None
        if self.needs_reference:
            if "reference" not in batch:
                raise RuntimeError(
                    "stage.loss=%s needs the reference log-probs (trainer/objectives/reference.py); none are "
                    "attached to this batch" % self.loss
                )
            ref = batch["reference"].to(sums.device, sums.dtype)
            ref = F.pad(ref, (0, documents - ref.shape[1]))
        valid = (present[:, 0::2] & present[:, 1::2]).to(sums.device)
        losses, stats = pair_losses(
            sums[:, 0::2],
            sums[:, 1::2],
            None if ref is None else ref[:, 0::2],
            None if ref is None else ref[:, 1::2],
            counts[:, 0::2],
            counts[:, 1::2],
            self.loss,
            self.beta,
            self.label_smoothing,
            self.simpo_gamma,
        )
        zero = torch.zeros((), dtype=losses.dtype, device=losses.device)
        row_losses = torch.where(valid, losses, zero).sum(1)
        row_stats = torch.stack([torch.where(valid, stats[k], zero).sum(1) for k in STATS], dim=1)
        return row_losses, row_stats
