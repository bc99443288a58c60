"""Corrective self-distillation on the stage's own tokens (`regularizer.mft`, MFT: Belcak et al. 2025,
arXiv 2506.15702).

Plain fine-tuning pulls every training token toward a one-hot target: the data's token gets all the
mass, whatever the model knew. Here each training token's target is the stage's start's next-token
distribution q, corrected just enough to learn the data's token y: where q_y < τ, y is raised to τ
and every other token (and the residual mass) is scaled by (1 − τ)/(1 − q_y); where q_y ≥ τ the
target is q itself. The loss per token is KL(target ‖ model), a cross-entropy against the corrected
target less its entropy: τ = 1 is plain fine-tuning, lower τ moves the model away from its start
only as far as the data demands (trainer/objectives/distill.py's `corrected_targets`).

The start's distributions are stored once, before the first step, for every row of every training
source (replay rows too: their target is the start's, corrected the same way), as its top
`regularizer.mft.top_k` tokens with the correct token always among them and the rest of the mass one
residual class (the same coarsening and bias as regularizer.distill's, stated in
trainer/objectives/distill.py):

    <prepared source>/mft/<start key>-top<k>/{ids.npy int32, logp.npy float32}   [rows, seq - 1, k]

computed by the engine just built, before a resume replaces its weights, so a rerun, a resume and
another world size reuse them and no second model is in memory during training. The corrected target
of a micro-batch is made from them when the micro-batch is made (`CorrectedTargets`), on the CPU.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from data_pipeline.packing import IGNORE
from data_pipeline.prepare import Prepared
from trainer.forgetting import distill
from trainer.objectives.distill import corrected_targets

log = logging.getLogger("trainer")


def attach(
    engine,
    sources: Sequence[Prepared],
    names: Sequence[str],
    key: str,
    k: int,
    tau: float,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    writer: bool,
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """The start's top-k (correct token included) of every row of every training source: read when
    stored, else computed now by all ranks (trainer/forgetting/distill.py's `attach`). Logs, per
    source, the share of supervised tokens the start already gives at least τ (their target is the
    start's own distribution). Collective."""
    out = []
    for name, src in zip(names, sources):
        ids, logq = distill.attach(engine, src, key, k, micro_batch_size, rank, world_size, device, writer, kind="mft")
        kept = _share_at_least(src, ids, logq, tau)
        log.info(
            "regularizer.mft: source %s: the start gives the correct token >= τ=%g at %.1f%% of its "
            "supervised tokens (target: the start's distribution); the rest are raised to τ",
            name,
            tau,
            100 * kept,
        )
        out.append((ids, logq))
    return out


def _share_at_least(src: Prepared, ids: np.ndarray, logq: np.ndarray, tau: float, rows: int = 256) -> float:
    """Over the first `rows` rows: the share of supervised positions where the stored q_y ≥ τ."""
    n = min(rows, len(src))
    labels = torch.from_numpy(np.ascontiguousarray(src.rows(list(range(n)))["labels"][:, 1:]))
    stored_ids, stored_logq = torch.from_numpy(np.asarray(ids[:n])), torch.from_numpy(np.asarray(logq[:n]))
    slot = stored_ids.long() == labels.long()[..., None]
    q_y = torch.where(slot, stored_logq.double(), torch.zeros(())).sum(-1).exp()
    where = labels != IGNORE
    return float((q_y[where] >= tau).double().mean()) if bool(where.any()) else 0.0


class CorrectedTargets:
    """A BatchSource (trainer/components.py): the stage's micro-batches, each with the corrective
    target of every position (target_ids, target_logp [batch, seq - 1, k]) made from the stored top-k
    of its rows' sources. train_step scores such a micro-batch by the KL to its targets instead of the
    cross-entropy to its labels; its normalisation (supervised tokens of the step) is the same."""

    def __init__(self, inner, teachers: Sequence[Tuple[np.ndarray, np.ndarray]], tau: float) -> None:
        self.inner, self.teachers, self.tau = inner, list(teachers), tau
        self.rows_per_step = inner.rows_per_step

    def with_targets(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        width = batch["labels"].shape[1] - 1  # unpacked rows may be cut to the micro-batch's longest
        pairs = list(zip(batch["source"].tolist(), batch["row"].tolist()))
        ids = np.stack([self.teachers[s][0][r, :width] for s, r in pairs])
        logq = np.stack([self.teachers[s][1][r, :width] for s, r in pairs])
        ids_t = torch.from_numpy(ids).long()
        batch["target_ids"] = ids_t
        batch["target_logp"] = corrected_targets(ids_t, torch.from_numpy(logq), batch["labels"][:, 1:], self.tau)
        return batch

    def micro_batches(self, step: int) -> List[Dict[str, torch.Tensor]]:
        return [self.with_targets(b) for b in self.inner.micro_batches(step)]

    def rows(self, step: int):
        return self.inner.rows(step)
