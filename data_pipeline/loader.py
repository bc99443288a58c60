"""Deterministic, resumable batches for every rank.

The row stream is a function of the seed only (data_pipeline/mixing.py), and optimizer step s
consumes positions [s*B, (s+1)*B) of it, B = micro_batch x grad_accum x world. So the data
position is the step number: a resume needs nothing but the step; every rank gets exactly
micro_batch x grad_accum rows every step (unequal batch counts would hang ZeRO-3's collectives);
and layouts with the same B (8x1x1, 1x8x1, 4x1x2) train on exactly the same rows in each step.

Within a step, rank r's micro-batch m gets positions [(m*world + r)*micro, ... + micro).

Without packing (one right-padded sample per row), a micro-batch is cut to its longest sample,
rounded up to `pad_to_multiple_of`: the columns past it are padding in every row, and computing
them is pure waste (a row of 1024 holding a 200-token sample). Packed rows keep their full width.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data_pipeline.mixing import MixSchedule


class StepLoader:
    def __init__(
        self,
        sources: Sequence,
        weights: Sequence[float],
        micro_batch_size: int,
        grad_accum_steps: int,
        rank: int,
        world_size: int,
        seed: int,
        pad_to_multiple_of: Optional[int] = None,
        origin: Tuple[int, int] = (0, 0),
    ) -> None:
        """sources: prepared sources (each with `filled` and `rows(idx)`), mixed by token `weights`.
        pad_to_multiple_of: cut each micro-batch to its longest row, rounded up to this (unpacked
        rows); None keeps every row's full width (packed rows).
        origin: (step, row): step `step` starts at row `row` of the stream (a resume that accepted a
        new global batch moves it; (0, 0) otherwise)."""
        self.sources = list(sources)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.micro = micro_batch_size
        self.accum = grad_accum_steps
        self.rank = rank
        self.world = world_size
        self.schedule = MixSchedule([s.filled for s in self.sources], weights, seed)
        self.origin_step, self.origin_row = origin

    @property
    def rows_per_step(self) -> int:
        return self.micro * self.accum * self.world

    def rows(self, step: int) -> List[List[Tuple[int, int]]]:
        """(source, row) pairs for this rank, one list per micro-batch of optimizer step `step` (0-based)."""
        out = []
        for m in range(self.accum):
            first = (
                self.origin_row
                + (step - self.origin_step) * self.rows_per_step
                + (m * self.world + self.rank) * self.micro
            )
            out.append(self.schedule.at(range(first, first + self.micro)))
        return out

    def micro_batches(self, step: int) -> List[Dict[str, torch.Tensor]]:
        return [self.batch(pairs) for pairs in self.rows(step)]

    def batch(self, pairs: List[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        parts = [self.sources[j].rows([i]) for j, i in pairs]
        filled = np.array([int(self.sources[j].filled[i]) for j, i in pairs])
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if self.pad_to_multiple_of:
            arrays = trim_to_longest(arrays, filled, self.pad_to_multiple_of)
        out = {k: torch.from_numpy(v) for k, v in arrays.items()}
        out["source"] = torch.tensor([j for j, _ in pairs])
        out["row"] = torch.tensor([i for _, i in pairs])
        out["filled"] = torch.from_numpy(filled)
        out["real_tokens"] = out["filled"].sum()
        return out


def trim_to_longest(rows: Dict[str, np.ndarray], filled: np.ndarray, multiple: int) -> Dict[str, np.ndarray]:
    """Right-padded rows (real tokens first: `filled` per row) cut to the longest row's real tokens,
    rounded up to a multiple of `multiple`, never wider than they are. What is cut is padding in
    every row, which attends only to itself and carries no label, so the real tokens' logits and
    the loss are those of the full-width rows."""
    width = rows["input_ids"].shape[1]
    keep = min(width, -(-max(int(filled.max(initial=0)), 1) // multiple) * multiple)
    return {k: np.ascontiguousarray(v[:, :keep]) if k in TOKEN_KEYS else v for k, v in rows.items()}


TOKEN_KEYS = ("input_ids", "labels", "position_ids", "document")
"""The per-token arrays of a row (a preference row's `reference` is per document, not per token)."""
