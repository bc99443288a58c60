"""Corrective self-distillation on the stage's own tokens (`regularizer.mft`, MFT: Belcak et al. 2025,
arXiv 2506.15702).

Plain fine-tuning pulls every training token toward a one-hot target: the data's token gets all the
mass, whatever the model knew. Here each training token's target is the stage's start's next-token
distribution q, corrected just enough to learn the data's token y: where q_y < τ, y is raised to τ
and every other token (and the residual mass) is scaled by (1 − τ)/(1 − q_y); where q_y ≥ τ the
target is q itself. The loss per token is KL(target ‖ model), a cross-entropy against the corrected
target less its entropy: τ = 1 is plain fine-tuning, lower τ moves the model away from its start
only as far as the data demands (trainer/objectives/distill.py's `corrected_targets`).

The start's distributions are computed once, before the first step, by the engine just built
(before a resume replaces its weights), for the rows the stage's steps will visit (every source's:
replay rows too, their target the start's corrected the same way; a stage shorter than an epoch
pays for the rows it trains on, not the whole corpus). They are stored with each prepared source as
its top `regularizer.mft.top_k` tokens, the correct token always among them, and the rest of the
mass one residual class (the same coarsening and bias as regularizer.distill's, stated in
trainer/objectives/distill.py):

    <prepared source>/mft/<start key>-top<k>/{rows.npy int64 [n], ids.npy int32, logp.npy float32 [n, seq - 1, k]}

A rerun, a resume and another world size reuse them when they hold every row needed (else they are
computed again, with the start's weights, before the resume). No second model is in memory during
training. A micro-batch's corrected targets are made from them when it is made (`CorrectedTargets`),
on the CPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data_pipeline.mixing import MixSchedule
from data_pipeline.packing import IGNORE
from data_pipeline.prepare import Prepared
from trainer import distributed
from trainer.forgetting import distill
from trainer.objectives.distill import corrected_targets

log = logging.getLogger("trainer")


def rows_needed(sources: Sequence[Prepared], weights: Sequence[float], seed: int, positions: int) -> List[np.ndarray]:
    """The rows of each source at the first `positions` positions of the training stream (what steps
    1..max_steps visit, all ranks together, as the StepLoader lays them out from the start), sorted."""
    pairs = MixSchedule([s.filled for s in sources], weights, seed).at(range(positions))
    return [np.unique(np.asarray([r for j, r in pairs if j == i], dtype=np.int64)) for i in range(len(sources))]


def attach(
    engine,
    sources: Sequence[Prepared],
    names: Sequence[str],
    needed: Sequence[np.ndarray],
    key: str,
    k: int,
    tau: float,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    writer: bool,
) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(rows, ids, logp) of each source: the start's top-k (correct token included) of its `needed`
    rows, read when every rank has them stored, else computed now by all ranks and written by the
    `writer`s (one process per node). Logs, per source, the share of supervised tokens the start
    already gives at least τ (their target is the start's own distribution). Collective."""
    out = []
    for name, src, rows in zip(names, sources, needed):
        where = src.directory / "mft" / f"{key}-top{k}"
        stored = _stored(where, rows)
        if stored is None:
            started = time.time()
            ids, logq = distill.score_rows(
                engine, src, k, micro_batch_size, rank, world_size, device, with_labels=True, which=rows
            )
            if writer:
                distill.write_arrays(where, {"rows": rows, "ids": ids, "logp": logq})
            stored = rows, ids, logq
            log.info(
                "regularizer.mft: the start's top-%d of %d rows of source %s computed once in %.1f s (%.1f MB) -> %s",
                k,
                len(rows),
                name,
                time.time() - started,
                (ids.nbytes + logq.nbytes) / 1e6,
                where,
            )
        else:
            log.info(
                "regularizer.mft: the start's top-%d of %d rows of source %s reused (%s)",
                k,
                len(rows),
                name,
                where,
            )
        kept = _share_at_least(src, *stored, tau)
        log.info(
            "regularizer.mft: source %s: the start gives the correct token >= τ=%g at %.1f%% of its "
            "supervised tokens (target: the start's distribution); the rest are raised to τ",
            name,
            tau,
            100 * kept,
        )
        out.append(stored)
    return out


def _stored(where: Path, rows: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The stored (rows, ids, logp), memory-mapped, when every rank has them with every row in `rows`,
    else None. Collective."""
    have = None
    if all((where / f"{name}.npy").exists() for name in ("rows", "ids", "logp")):
        have = np.load(where / "rows.npy")
    missing = torch.tensor([0.0 if have is not None and np.isin(rows, have).all() else 1.0], dtype=torch.float64)
    distributed.all_reduce_sum(missing)
    if missing.item():
        return None
    return have, np.load(where / "ids.npy", mmap_mode="r"), np.load(where / "logp.npy", mmap_mode="r")


def _share_at_least(
    src: Prepared, rows: np.ndarray, ids: np.ndarray, logq: np.ndarray, tau: float, most: int = 256
) -> float:
    """Over the first `most` stored rows: the share of supervised positions where the stored q_y ≥ τ."""
    n = min(most, len(rows))
    if n == 0:
        return 0.0
    labels = torch.from_numpy(np.ascontiguousarray(src.rows(rows[:n].tolist())["labels"][:, 1:]))
    stored_ids, stored_logq = torch.from_numpy(np.asarray(ids[:n])), torch.from_numpy(np.asarray(logq[:n]))
    slot = stored_ids.long() == labels.long()[..., None]
    q_y = torch.where(slot, stored_logq.double(), torch.zeros(())).sum(-1).exp()
    where = labels != IGNORE
    return float((q_y[where] >= tau).double().mean()) if bool(where.any()) else 0.0


class CorrectedTargets:
    """A BatchSource (trainer/components.py): the stage's micro-batches, each with the corrective
    target of every position (target_ids, target_logp [batch, seq - 1, k]) made from the stored top-k
    of its rows. train_step scores such a micro-batch by the KL to its targets instead of the
    cross-entropy to its labels; its normalisation (supervised tokens of the step) is the same."""

    def __init__(
        self, inner, teachers: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]], tau: float, names: Sequence[str]
    ) -> None:
        self.inner, self.teachers, self.tau, self.names = inner, list(teachers), tau, list(names)
        self.rows_per_step = inner.rows_per_step

    def _slot(self, source: int, row: int) -> int:
        rows = self.teachers[source][0]
        i = int(np.searchsorted(rows, row))
        if i == len(rows) or rows[i] != row:
            raise RuntimeError(
                f"regularizer.mft: row {row} of source {self.names[source]} has no stored target: the start's "
                f"pass covered the {len(rows)} rows its steps visit as the stage was first laid out, and a "
                "resume changed that layout (another global batch). Resume with the global batch the stage "
                "started with, or start the stage again in a new output_dir."
            )
        return i

    def with_targets(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        width = batch["labels"].shape[1] - 1  # unpacked rows may be cut to the micro-batch's longest
        slots = [(s, self._slot(s, r)) for s, r in zip(batch["source"].tolist(), batch["row"].tolist())]
        ids = torch.from_numpy(np.stack([self.teachers[s][1][i, :width] for s, i in slots])).long()
        logq = torch.from_numpy(np.stack([self.teachers[s][2][i, :width] for s, i in slots]))
        batch["target_ids"] = ids
        batch["target_logp"] = corrected_targets(ids, logq, batch["labels"][:, 1:], self.tau)
        return batch

    def micro_batches(self, step: int) -> List[Dict[str, torch.Tensor]]:
        return [self.with_targets(b) for b in self.inner.micro_batches(step)]

    def rows(self, step: int):
        return self.inner.rows(step)
